"""Nav1D: the one-dimensional navigation toy task of "Maximize Your Diffusion" (Huh & Mohapatra), made concrete.

An agent at position s in [-1, 1] moves by at most DELTA per step for HORIZON steps and is rewarded for staying
close to a target that follows one period of a sine wave. The task is small enough that the optimal expected return
is computed exactly (dynamic programming over a fine grid), which makes it the ground truth for the alignment
studies: a normalised score of 100 means "as good as the optimal controller", 0 means "as good as random actions".

Three offline datasets (1000 episodes each, fixed seed) are stored as local Minari datasets:
  nav1d/full-v0     uniform-random actions, s_0 ~ U[-1, 1]
  nav1d/partial-v0  uniform-random actions, s_0 ~ U[-1, 0]  (the upper half of the state space is rarely seen)
  nav1d/expert-v0   greedy tracker plus N(0, EXPERT_NOISE^2) action noise, clipped

Coherency (paper eqs. 15-16) scores whether generated plans obey the dynamics and whether generated actions are
plausible under the behaviour policy. The scripts load the datasets by name (`--env nav1d-full`); the top-level
`nav1d.py` makes, describes and draws them:

    python nav1d.py --dataset full --figure runs/nav1d-full.png
"""
from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

from common.data import make_local_dataset

DELTA = 0.4  # largest move per step
HORIZON = 8  # steps per episode
SIGMA = 0.15  # width of the reward bump around the target
AMPLITUDE = 0.6  # amplitude of the target's sine wave
KAPPA = 0.05  # tolerance of plan coherency
EXPERT_NOISE = 0.1  # std of the expert dataset's action noise

ENV_ID = "Nav1D-v0"
DATASET_KINDS = ("partial", "full", "expert")
BOX_TOLERANCE = 1e-5  # float round-off allowed at the action bounds by policy coherency
DATASET_EPISODES = 1000
DATASET_SEED = 20240  # generation seed; each kind draws from its own stream of it
DP_GRID_POINTS = 4001  # grid spacing 5e-4; DELTA is a whole number of grid steps, so the DP is exact on the grid
RANDOM_RETURN_EPISODES = 200_000  # Monte Carlo episodes for the random-policy return (standard error ~0.003)
RANDOM_RETURN_SEED = 7


# ------------------------------------------------------------------------------------------------------------------
# Dynamics and reward (vectorised over any array shape)
# ------------------------------------------------------------------------------------------------------------------
def step_state(s, a):
    """Next position: s + DELTA * a with the action clipped to [-1, 1] (as the env does) and the result to [-1, 1]."""
    return np.clip(np.asarray(s) + DELTA * np.clip(a, -1.0, 1.0), -1.0, 1.0)


def target(t):
    """Target position mu_t = AMPLITUDE * sin(2 pi t / HORIZON) that the position after step t should reach."""
    return AMPLITUDE * np.sin(2.0 * np.pi * np.asarray(t, dtype=np.float64) / HORIZON)


def reward(s_next, t):
    """Reward of step t, a Gaussian bump around the target: exp(-(s_{t+1} - mu_t)^2 / (2 SIGMA^2))."""
    return np.exp(-((np.asarray(s_next) - target(t)) ** 2) / (2.0 * SIGMA**2))


def greedy_action(s, t):
    """The greedy tracker: the action that moves as close to this step's target as one step allows."""
    return np.clip((target(t) - np.asarray(s)) / DELTA, -1.0, 1.0)


def observation(s, t) -> np.ndarray:
    """Observation [s_t, t / HORIZON] as float32 (the time feature makes the task Markov)."""
    s = np.asarray(s, dtype=np.float32)
    return np.stack([s, np.broadcast_to(np.float32(t / HORIZON), s.shape)], axis=-1).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------------
class Nav1DEnv(gym.Env):
    """Gymnasium env of the task: observation [s_t, t/T], Box(1) action in [-1, 1], terminates after HORIZON steps."""

    metadata = {"render_modes": []}

    def __init__(self):
        self.observation_space = gym.spaces.Box(
            low=np.array([-1.0, 0.0], dtype=np.float32), high=np.array([1.0, 1.0], dtype=np.float32), dtype=np.float32
        )
        self.action_space = gym.spaces.Box(low=-1.0, high=1.0, shape=(1,), dtype=np.float32)
        self._position = 0.0
        self._t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._position = float(self.np_random.uniform(-1.0, 1.0))
        self._t = 0
        return observation(self._position, self._t), {}

    def step(self, action):
        action_value = float(np.asarray(action, dtype=np.float64).reshape(-1)[0])
        self._position = float(step_state(self._position, action_value))
        step_reward = float(reward(self._position, self._t))
        self._t += 1
        terminated = self._t >= HORIZON
        return observation(self._position, self._t), step_reward, terminated, False, {}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="common.nav1d:Nav1DEnv")


# ------------------------------------------------------------------------------------------------------------------
# Reference returns
# ------------------------------------------------------------------------------------------------------------------
def _expectation_over_start(values: np.ndarray) -> float:
    """Mean of values given on the uniform grid of s_0 over [-1, 1] (trapezoid rule), i.e. E_{s_0~U[-1,1]}."""
    return float(np.sum(values[1:] + values[:-1]) / (2.0 * (len(values) - 1)))


@functools.lru_cache(maxsize=None)
def _optimal_values() -> np.ndarray:
    """V_t(s) for t = 0..HORIZON on the DP grid, shape (HORIZON + 1, DP_GRID_POINTS).

    From s every next position within DELTA (clipped to [-1, 1]) is reachable, so
    V_t(s) = max_{|s' - s| <= DELTA} [reward(s', t) + V_{t+1}(s')]: a sliding-window maximum on the grid.
    """
    grid = np.linspace(-1.0, 1.0, DP_GRID_POINTS)
    window = int(round(DELTA / (grid[1] - grid[0])))
    values = np.zeros((HORIZON + 1, DP_GRID_POINTS))
    for t in reversed(range(HORIZON)):
        gain = reward(grid, t) + values[t + 1]
        padded = np.pad(gain, window, constant_values=-np.inf)
        values[t] = np.lib.stride_tricks.sliding_window_view(padded, 2 * window + 1).max(axis=1)
    return values


@functools.lru_cache(maxsize=None)
def optimal_return() -> float:
    """Optimal expected return for s_0 ~ U[-1, 1] (exact DP on a grid of spacing 5e-4); cached."""
    return _expectation_over_start(_optimal_values()[0])


@functools.lru_cache(maxsize=None)
def greedy_return() -> float:
    """Expected return of the (deterministic) greedy tracker for s_0 ~ U[-1, 1], by quadrature over s_0."""
    positions = np.linspace(-1.0, 1.0, 20001)
    total = np.zeros_like(positions)
    for t in range(HORIZON):
        positions = step_state(positions, greedy_action(positions, t))
        total += reward(positions, t)
    return _expectation_over_start(total)


@functools.lru_cache(maxsize=None)
def random_return() -> float:
    """Expected return of uniform-random actions (Monte Carlo, RANDOM_RETURN_EPISODES episodes, fixed seed)."""
    rng = np.random.default_rng(RANDOM_RETURN_SEED)
    positions = rng.uniform(-1.0, 1.0, RANDOM_RETURN_EPISODES)
    total = np.zeros_like(positions)
    for t in range(HORIZON):
        positions = step_state(positions, rng.uniform(-1.0, 1.0, positions.shape))
        total += reward(positions, t)
    return float(total.mean())


# ------------------------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------------------------
def dataset_kind(name: str) -> str:
    """The kind of a Nav1D dataset name: nav1d-full, nav1d/full-v0 -> "full"."""
    match = re.search(r"nav1d[-/](\w+?)(?:-v0)?$", name)
    if match is None or match.group(1) not in DATASET_KINDS:
        raise ValueError(f"{name!r} is not a Nav1D dataset name (nav1d-partial, nav1d-full, nav1d-expert)")
    return match.group(1)


def dataset_id(kind: str) -> str:
    return f"nav1d/{kind}-v0"


def generate_rollouts(kind: str, episodes: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Roll out the behaviour policy of a dataset kind: positions (episodes, HORIZON + 1), actions (episodes, HORIZON)."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown Nav1D dataset kind {kind!r}; expected one of {DATASET_KINDS}")
    low = -1.0
    high = 0.0 if kind == "partial" else 1.0
    positions = np.empty((episodes, HORIZON + 1))
    actions = np.empty((episodes, HORIZON))
    positions[:, 0] = rng.uniform(low, high, episodes)
    for t in range(HORIZON):
        if kind == "expert":
            noisy = greedy_action(positions[:, t], t) + EXPERT_NOISE * rng.standard_normal(episodes)
            actions[:, t] = np.clip(noisy, -1.0, 1.0)
        else:
            actions[:, t] = rng.uniform(-1.0, 1.0, episodes)
        positions[:, t + 1] = step_state(positions[:, t], actions[:, t])
    return positions, actions


def make_dataset(kind: str) -> minari.MinariDataset:
    """Load the local Minari dataset nav1d/{kind}-v0, creating it first (deterministically, ~1 s) if it is missing.
    Its content is fully determined by DATASET_SEED."""
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown Nav1D dataset kind {kind!r}; expected one of {DATASET_KINDS}")
    name = dataset_id(kind)
    return make_local_dataset(name, f"the Nav1D dataset {name} being made", lambda: _create_dataset(kind, name),
                              complete=lambda dataset: dataset.total_episodes == DATASET_EPISODES)


def _create_dataset(kind: str, name: str) -> minari.MinariDataset:
    rng = np.random.default_rng([DATASET_SEED, DATASET_KINDS.index(kind)])
    positions, actions = generate_rollouts(kind, DATASET_EPISODES, rng)
    rewards = reward(positions[:, 1:], np.arange(HORIZON))
    observations = observation(positions, np.arange(HORIZON + 1))  # (episodes, HORIZON + 1, 2)
    terminations = np.zeros(HORIZON, dtype=bool)
    terminations[-1] = True
    buffers = [
        EpisodeBuffer(
            id=episode,
            observations=observations[episode],
            actions=actions[episode, :, None].astype(np.float32),
            rewards=rewards[episode],
            terminations=terminations,
            truncations=np.zeros(HORIZON, dtype=bool),
        )
        for episode in range(DATASET_EPISODES)
    ]
    behaviour = {
        "full": "uniform-random actions, s_0 ~ U[-1, 1]",
        "partial": "uniform-random actions, s_0 ~ U[-1, 0]",
        "expert": f"greedy tracker + N(0, {EXPERT_NOISE}^2) action noise, clipped, s_0 ~ U[-1, 1]",
    }[kind]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(code_permalink|author_email).*")
        return minari.create_dataset_from_buffers(
            dataset_id=name,
            buffer=buffers,
            env=ENV_ID,
            eval_env=ENV_ID,
            algorithm_name=f"nav1d-{kind}",
            author="nav1d.py",
            description=f"Nav1D {kind}: {DATASET_EPISODES} episodes of {HORIZON} steps, {behaviour}; seed "
            f"{DATASET_SEED}. Reference returns: uniform-random actions (min) and the DP optimum (max).",
            ref_min_score=random_return(),
            ref_max_score=optimal_return(),
        )


# ------------------------------------------------------------------------------------------------------------------
# Coherency (paper eqs. 15-16)
# ------------------------------------------------------------------------------------------------------------------
def plan_coherency(s, a, s_next) -> float:
    """Mean over generated transitions of exp(-(s' - f(s, a))^2 / (2 KAPPA^2)): 1 when a plan obeys the dynamics."""
    gap = np.asarray(s_next, dtype=np.float64) - step_state(np.asarray(s, dtype=np.float64), a)
    return float(np.mean(np.exp(-(gap**2) / (2.0 * KAPPA**2))))


def plans_coherency(observations: np.ndarray, positions: np.ndarray, moves: np.ndarray) -> list[float]:
    """plan_coherency of each plan made from observations[i] (position, t / T): positions (B, H) and moves (B, H) in
    environment units, scored only over the steps left in the episode (later plan steps are padding)."""
    scores = []
    for row, start_time in enumerate(np.rint(observations[:, 1] * HORIZON).astype(int)):
        valid = min(HORIZON - 1 - start_time, positions.shape[1] - 1)
        if valid > 0:
            scores.append(plan_coherency(positions[row, :valid], moves[row, :valid], positions[row, 1:valid + 1]))
    return scores


def policy_coherency(kind: str, states, actions) -> float:
    """Mean behaviour-policy density of generated actions relative to its maximum.

    states are observations [s, t/T] (..., 2), actions (...,) or (..., 1). For the uniform datasets the density is
    1 inside [-1, 1] and 0 outside (up to BOX_TOLERANCE: an action clipped to the bound in float32 and mapped back
    to the environment's units lands a few 1e-7 past it); for the expert it is exp(-(a - a*(s, t))^2 /
    (2 EXPERT_NOISE^2)) around the greedy action.
    """
    states = np.asarray(states, dtype=np.float64)
    actions = np.asarray(actions, dtype=np.float64).reshape(states.shape[:-1])
    if kind in ("full", "partial"):
        return float(np.mean(np.abs(actions) <= 1.0 + BOX_TOLERANCE))
    if kind == "expert":
        steps = np.rint(states[..., 1] * HORIZON)
        greedy = greedy_action(states[..., 0], steps)
        return float(np.mean(np.exp(-((actions - greedy) ** 2) / (2.0 * EXPERT_NOISE**2))))
    raise ValueError(f"unknown Nav1D dataset kind {kind!r}; expected one of {DATASET_KINDS}")


# ------------------------------------------------------------------------------------------------------------------
# Figure (in the style of the paper's Figure 4)
# ------------------------------------------------------------------------------------------------------------------
def plot_task(path, trajectories: Sequence[np.ndarray] | np.ndarray | None = None, title: str | None = None) -> None:
    """Write a PNG: the reward of every step as a heat band over (time, position), plus trajectories.

    trajectories: position sequences of length HORIZON + 1 (s_0 .. s_T) or observation arrays (HORIZON + 1, 2).
    The reward of step t depends on s_{t+1}, so its band is drawn at time t + 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.linspace(-1.0, 1.0, 401)
    steps = np.arange(HORIZON)
    band = reward(positions[:, None], steps[None, :])  # (positions, steps)
    figure, axes = plt.subplots(figsize=(7, 4))
    mesh = axes.pcolormesh(steps + 1, positions, band, cmap="Greens", vmin=0.0, vmax=1.0, shading="nearest")
    figure.colorbar(mesh, ax=axes, label="reward of the step")
    axes.plot(steps + 1, target(steps), "k--", linewidth=1, label="target $\\mu_t$")
    for index, trajectory in enumerate([] if trajectories is None else trajectories):
        trajectory = np.asarray(trajectory)
        states = trajectory[:, 0] if trajectory.ndim == 2 else trajectory
        axes.plot(np.arange(len(states)), states, "-o", color="tab:blue", alpha=0.5, markersize=2, linewidth=1,
                  label="trajectories" if index == 0 else None)
    axes.set_xlim(-0.2, HORIZON + 0.5)
    axes.set_ylim(-1.05, 1.05)
    axes.set_xlabel("time step t")
    axes.set_ylabel("position s")
    axes.set_title(title or "Nav1D: per-step reward bands")
    axes.legend(loc="lower left", fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class Args:
    dataset: Literal["partial", "full", "expert"] = "full"
    """which Nav1D dataset to make (or load) and describe"""
    figure: Path | None = None
    """where to write the figure (default runs/nav1d-{dataset}.png)"""
    trajectories: int = 20
    """how many dataset episodes to draw in the figure"""


def describe_dataset(dataset: minari.MinariDataset) -> dict:
    """Episodes, transitions, return statistics and state coverage (share of 20 equal bins of [-1, 1] visited)."""
    episodes = list(dataset.iterate_episodes())
    returns = np.array([episode.rewards.sum() for episode in episodes])
    positions = np.concatenate([episode.observations[:, 0] for episode in episodes])
    visited, _ = np.histogram(positions, bins=20, range=(-1.0, 1.0))
    return {
        "episodes": len(episodes),
        "transitions": int(sum(len(episode) for episode in episodes)),
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "start_min": float(min(episode.observations[0, 0] for episode in episodes)),
        "start_max": float(max(episode.observations[0, 0] for episode in episodes)),
        "state_min": float(positions.min()),
        "state_max": float(positions.max()),
        "state_coverage": float(np.mean(visited > 0)),
        "share_above_zero": float(np.mean(positions > 0.0)),
    }


def main(args: Args) -> None:
    dataset = make_dataset(args.dataset)
    stats = describe_dataset(dataset)
    print(f"dataset {dataset_id(args.dataset)} at {minari.storage.get_dataset_path(dataset_id(args.dataset))}")
    print(f"  episodes {stats['episodes']}, transitions {stats['transitions']}")
    print(f"  return {stats['return_mean']:.3f} +- {stats['return_std']:.3f}")
    print(f"  start positions in [{stats['start_min']:.3f}, {stats['start_max']:.3f}], visited positions in "
          f"[{stats['state_min']:.3f}, {stats['state_max']:.3f}], coverage {100 * stats['state_coverage']:.0f}% "
          f"of 20 bins, {100 * stats['share_above_zero']:.0f}% of visits at s > 0")
    print("reference returns (s_0 ~ U[-1, 1]):")
    print(f"  optimum (DP)   {optimal_return():.4f}   <- normalised score 100")
    print(f"  greedy tracker {greedy_return():.4f}")
    print(f"  random actions {random_return():.4f}   <- normalised score 0")
    figure_path = args.figure or Path("runs") / f"nav1d-{args.dataset}.png"
    sample = [episode.observations for episode in dataset.iterate_episodes(range(min(args.trajectories, stats["episodes"])))]
    plot_task(figure_path, sample, title=f"Nav1D {args.dataset}: reward bands and {len(sample)} dataset episodes")
    print(f"figure written to {figure_path}")
