"""PushT with state observations (the alignment paper's Table 3 PushT row), from Diffusion Policy's zarr replay buffer.

`--env` names:
- a path to a `.zarr` replay buffer in Diffusion Policy's layout: data/state (N, 5: agent x, y, block x, y, block
  angle), data/action (N, 2: the agent's target position), meta/episode_ends (cumulative episode lengths); other
  arrays (img, keypoint, n_contacts) are ignored.
- `pusht/dp`: Diffusion Policy's `pusht_cchi_v7_replay.zarr`, looked for in $PUSHT_DATASET_DIR (if set), else
  ~/pusht; a missing one is an error naming the download address.
- `pusht/scripted`: made on first use in that folder, in the same layout, by a scripted pusher (SCRIPTED_EPISODES
  episodes): it pushes the T's centre to the goal's from behind, then turns it by pushing an end of its bar, and
  reaches partial coverage, rarely success: modest data, far below Diffusion Policy's human demonstrations.
- `lerobot/pusht_keypoints`, or a path to a LeRobot dataset folder (meta/info.json, data/**/*.parquet; LeRobot
  2.x and 3.0 lay the parquet files out differently, both are read): observation.environment_state (the
  T's 8 keypoints), observation.state (the agent's position), action, next.reward, next.success, episode_index and
  frame_index. Looked for in $HF_LEROBOT_HOME (if set), else ~/.cache/huggingface/lerobot. `lerobot/pusht` itself
  logs only the agent's position as state (the block is in its images), so it is refused for a state policy.
  Evaluated on gym-pusht's keypoint observations (obs_type "environment_state_agent_pos", flattened like the data).

Environment: `gym_pusht/PushT-v0` (obs_type "state" for the zarr buffers, 300 steps). The env's own reward each
step is the block's coverage of the goal / 0.95, clipped to 1; Diffusion Policy scores an episode by the highest of
these. The reward used here (PushTScore, and the same rule on the data) is the gain in that running best, so an
episode's return IS
Diffusion Policy's score and the normalised score (reference returns 0 and 1) is it in percent. info["success"] is the
env's is_success (coverage above 95%), which also ends the episode. The zarr holds no rewards: they are computed
from the logged states with the env's coverage, and the last step of an episode, whose next state the buffer does
not hold, gets its own state as successor and no reward.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np

from common.runtime import ExclusiveLock, UserError

ENV_ID = "gym_pusht/PushT-v0"
DP_FILE = "pusht_cchi_v7_replay.zarr"
DP_DOWNLOAD = "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"
DATASET_DIR_VARIABLE = "PUSHT_DATASET_DIR"
INSTALL = "pip install gym-pusht==0.1.8 zarr==3.1.6 pyarrow==26.0.1 (requirements.txt pins them)"
SCRIPTED_EPISODES = 100
SCRIPTED_SEED = 5_2024
SCRIPTED_NOISE = 3.0  # std of the scripted pusher's target noise, pixels


class PushTError(UserError):
    """A PushT name, buffer or package that cannot be used; the message is one line."""


def dataset_directory() -> Path:
    return Path(os.environ.get(DATASET_DIR_VARIABLE) or Path.home() / "pusht")


def _zarr():
    try:
        import zarr
    except ImportError:
        raise PushTError(f"zarr is not installed: {INSTALL}") from None
    return zarr


def make_env(obs_type: str = "state") -> gym.Env:
    """PushT with Diffusion Policy's score as the return (module docstring); flat observations of `obs_type`."""
    from common.data import FlatObservation

    try:
        importlib.import_module("gym_pusht")  # registers the env
    except ImportError:
        raise PushTError(f"gym-pusht is not installed: {INSTALL}") from None
    env = PushTScore(gym.make(ENV_ID, obs_type=obs_type))
    return env if obs_type == "state" else FlatObservation(env)


class PushTScore(gym.Wrapper):
    """Reward = the gain in the episode's best coverage score, so the return is Diffusion Policy's score;
    info["success"] from the env's is_success."""

    def reset(self, **kwargs):
        self.best = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        observation, score, terminated, truncated, info = self.env.step(action)
        gain = max(float(score) - self.best, 0.0)
        self.best = max(self.best, float(score))
        return observation, gain, terminated, truncated, info | {"success": bool(info["is_success"])}


def lerobot_directory() -> Path:
    return Path(os.environ.get("HF_LEROBOT_HOME") or Path.home() / ".cache" / "huggingface" / "lerobot")


def find_lerobot(name: str) -> Path | None:
    """The LeRobot dataset folder a name or path refers to; None for other names."""
    if (Path(name) / "meta" / "info.json").is_file():
        return Path(name)
    if name == "lerobot/pusht":
        raise PushTError("lerobot/pusht logs only the agent's position as its state (the block is in its images), so "
                         "a state policy cannot learn from it; use lerobot/pusht_keypoints (the T's keypoints)")
    if name != "lerobot/pusht_keypoints":
        return None
    path = lerobot_directory() / name
    if not (path / "meta" / "info.json").is_file():
        raise PushTError(f"dataset {name} not found in {path}; get it with: huggingface-cli download {name} "
                         f"--repo-type dataset --local-dir {path} (or set HF_LEROBOT_HOME)")
    return path


LEROBOT_COLUMNS = ("observation.environment_state", "observation.state", "action", "next.reward", "episode_index",
                   "frame_index")


def read_lerobot(path: Path) -> dict[str, np.ndarray]:
    """The columns a state policy needs, over every parquet file of the dataset, in episode and frame order."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise PushTError(f"pyarrow is not installed: {INSTALL}") from None
    features = json.loads((path / "meta" / "info.json").read_text()).get("features", {})
    missing = [column for column in LEROBOT_COLUMNS if column not in features]
    if missing:
        raise PushTError(f"LeRobot dataset {path} lacks {', '.join(missing)} in meta/info.json's features (a state "
                         f"policy on PushT needs {', '.join(LEROBOT_COLUMNS)})")
    files = sorted((path / "data").rglob("*.parquet"))
    if not files:
        raise PushTError(f"LeRobot dataset {path} has no parquet files under data/")
    columns = list(LEROBOT_COLUMNS) + (["next.success"] if "next.success" in features else [])
    tables = [parquet.read_table(file, columns=columns) for file in files]
    arrays = {column: np.concatenate([np.asarray(table.column(column).to_pylist()) for table in tables])
              for column in columns}
    order = np.lexsort((arrays["frame_index"], arrays["episode_index"]))
    return {column: values[order] for column, values in arrays.items()}


def lerobot_transitions(columns: dict[str, np.ndarray], space: gym.Space) -> dict[str, np.ndarray]:
    """LeRobot PushT columns as transition arrays with PushTScore's rewards (from the logged next.reward)."""
    from common.data import flatten_observation

    observations = flatten_observation(space, {"environment_state": columns["observation.environment_state"],
                                               "agent_pos": columns["observation.state"]})
    episodes = columns["episode_index"]
    last = np.append(episodes[1:] != episodes[:-1], True)
    next_index = np.where(last, np.arange(len(episodes)), np.arange(1, len(episodes) + 1))
    rewards = np.zeros(len(episodes))
    for episode in np.unique(episodes):
        rows = np.flatnonzero(episodes == episode)
        rewards[rows] = np.diff(np.concatenate([[0.0], np.maximum.accumulate(columns["next.reward"][rows])]))
    success = columns.get("next.success", np.zeros(len(episodes), dtype=bool)).astype(bool)
    return {"observations": observations, "next_observations": observations[next_index],
            "actions": columns["action"].astype(np.float32), "rewards": rewards.astype(np.float32),
            "terminals": success, "episode_ends": last}


def is_replay_buffer(name: str) -> bool:
    return Path(name).suffix == ".zarr" and Path(name).is_dir()


def find_buffer(name: str) -> Path | None:
    """The replay buffer a PushT name or path refers to (made first for `pusht/scripted`); None for other names."""
    if is_replay_buffer(name):
        return Path(name)
    match = re.fullmatch(r"pusht/([\w-]+)", name)
    if match is None:
        return None
    if match.group(1) == "scripted":
        return make_scripted_buffer()
    if match.group(1) == "dp":
        path = dataset_directory() / DP_FILE
        if not path.is_dir():
            raise PushTError(f"dataset pusht/dp not found: no {DP_FILE} in {dataset_directory()}; get it from "
                             f"{DP_DOWNLOAD} (unzip it there, or set {DATASET_DIR_VARIABLE} to its folder)")
        return path
    raise PushTError(f"unknown PushT dataset {name}; use pusht/dp, pusht/scripted or a path to a .zarr replay buffer")


def read_buffer(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(states (N, 5), actions (N, 2), episode ends (E,)) of a Diffusion Policy replay buffer, checked."""
    zarr = _zarr()
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as error:
        raise PushTError(f"cannot read PushT replay buffer {path} ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None
    missing = [key for key in ("data/state", "data/action", "meta/episode_ends") if key not in root]
    if missing:
        raise PushTError(f"PushT replay buffer {path} lacks {', '.join(missing)} (Diffusion Policy's layout: "
                         f"data/state, data/action, meta/episode_ends)")
    states = np.asarray(root["data/state"][:], dtype=np.float64)
    actions = np.asarray(root["data/action"][:], dtype=np.float32)
    ends = np.asarray(root["meta/episode_ends"][:], dtype=np.int64)
    if states.ndim != 2 or states.shape[1] != 5 or actions.shape != (len(states), 2):
        raise PushTError(f"PushT replay buffer {path} has data/state {states.shape} and data/action {actions.shape}; "
                         f"expected (N, 5) and (N, 2)")
    if len(ends) == 0 or ends[-1] != len(states) or np.any(np.diff(np.concatenate([[0], ends])) <= 0):
        raise PushTError(f"PushT replay buffer {path}: meta/episode_ends must rise strictly to the number of steps "
                         f"({len(states)}), found {ends[:5].tolist()}...{ends[-1:].tolist()}")
    return states, actions, ends


def coverages(env: gym.Env, states: np.ndarray) -> np.ndarray:
    """The env's coverage of the goal by the block in each logged state, from the env's own geometry with the block
    placed at the logged pose. Not through reset(options={"reset_to_state"}): that sets the angle after the position,
    and pymunk turns a body about its centre of gravity (45 px from the T's origin), so the block would not be where
    the observation says; it also steps the physics once, which moves the block when the agent touches it."""
    core = env.unwrapped
    core.reset(seed=0)
    covered = np.empty(len(states))
    for index, state in enumerate(states):
        core.block.angle = float(state[4])  # the angle first: then the position lands the origin where it was logged
        core.block.position = (float(state[2]), float(state[3]))
        covered[index] = core._get_coverage()
    return covered


def transitions(states: np.ndarray, actions: np.ndarray, ends: np.ndarray, covered: np.ndarray,
                success_threshold: float) -> dict[str, np.ndarray]:
    """The buffer as transition arrays with PushTScore's rewards and the env's success as termination."""
    observations = states.copy()
    observations[:, 4] %= 2 * np.pi  # the env reports the block angle in [0, 2 pi)
    scores = np.minimum(covered / success_threshold, 1.0)
    next_index = np.arange(1, len(states) + 1)
    last = np.zeros(len(states), dtype=bool)
    last[ends - 1] = True
    next_index[last] = np.flatnonzero(last)  # the buffer does not hold the last step's successor
    rewards = np.zeros(len(states))
    terminals = np.zeros(len(states), dtype=bool)
    for start, end in zip(np.concatenate([[0], ends[:-1]]), ends):
        best = np.maximum.accumulate(scores[start + 1:end])  # the running best after each step but the last
        rewards[start:end - 1] = np.diff(np.concatenate([[0.0], best]))
        terminals[start:end - 1] = covered[start + 1:end] > success_threshold
    return {"observations": observations.astype(np.float32),
            "next_observations": observations[next_index].astype(np.float32),
            "actions": actions, "rewards": rewards.astype(np.float32), "terminals": terminals, "episode_ends": last}


def load(name: str, path: Path, lerobot: bool = False):
    """A zarr replay buffer, or (`lerobot`) a LeRobot dataset folder, as OfflineData."""
    from common.data import OfflineData, check_transitions

    obs_type = "environment_state_agent_pos" if lerobot else "state"
    env = make_env(obs_type)
    try:
        if lerobot:
            arrays = lerobot_transitions(read_lerobot(path), env.unwrapped.observation_space)
        else:
            states, actions, ends = read_buffer(path)
            arrays = transitions(states, actions, ends, coverages(env, states), env.unwrapped.success_threshold)
        action_space = env.action_space
    finally:
        env.close()
    source = f"{'lerobot' if lerobot else 'zarr'}:{path}"
    check_transitions(name, source, arrays)
    return OfflineData(name=name, source=source, family="pusht", **arrays, ref_min_score=0.0, ref_max_score=1.0,
                       make_env=lambda: make_env(obs_type), action_low=action_space.low.astype(np.float32),
                       action_high=action_space.high.astype(np.float32))


# ------------------------------------------------------------------------------------------------------------------
# Scripted pusher
# ------------------------------------------------------------------------------------------------------------------
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])  # gym-pusht's goal for the T's origin and angle
T_CENTRE = (0.0, 45.0)  # the T's centre of gravity in its body frame (bar 120 x 30 at y 0-30, stem up to y 120)


def to_world(pose: np.ndarray, point) -> np.ndarray:
    """A point of the T's body frame in world coordinates, for the T at pose (x, y, angle)."""
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    return pose[:2] + np.array([cos * point[0] - sin * point[1], sin * point[0] + cos * point[1]])


def to_body(pose: np.ndarray, point: np.ndarray) -> np.ndarray:
    offset, cos, sin = point - pose[:2], np.cos(pose[2]), np.sin(pose[2])
    return np.array([cos * offset[0] + sin * offset[1], -sin * offset[0] + cos * offset[1]])


class ScriptedPusher:
    """Push the T's centre toward the goal's from behind (going around the T first when the agent is on the wrong
    side), then turn it by pushing one end of its bar; a T against a wall, with no room behind it, stays stuck."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def __call__(self, state: np.ndarray) -> np.ndarray:
        agent, pose = state[:2], state[2:5]
        centre, goal_centre = to_world(pose, T_CENTRE), to_world(GOAL_POSE, T_CENTRE)
        to_goal = goal_centre - centre
        distance = np.linalg.norm(to_goal)
        angle_error = (GOAL_POSE[2] - pose[2] + np.pi) % (2 * np.pi) - np.pi
        if distance > 15.0:
            direction = to_goal / distance
            behind = centre - 85.0 * direction
            if np.dot(agent - centre, direction) > -60.0:  # not behind the T: around it, on the agent's side
                side = np.array([-direction[1], direction[0]])
                side *= 1.0 if np.dot(agent - centre, side) >= 0 else -1.0
                target = centre + 110.0 * side - 60.0 * direction
            elif np.linalg.norm(agent - behind) > 20.0:
                target = behind
            else:
                target = centre + min(distance, 30.0) * direction
        elif abs(angle_error) > 0.1:  # turn: push the bar's end from outside the bar (torque about the centre)
            end = 50.0 if angle_error > 0 else -50.0
            approach = to_world(pose, (end, -40.0))
            if to_body(pose, agent)[1] > -25.0 and np.linalg.norm(agent - approach) > 15.0:
                around = to_world(pose, (2.4 * end, -60.0))
                target = approach if np.linalg.norm(agent - around) < 20.0 else around
            elif np.linalg.norm(agent - approach) > 15.0:
                target = approach
            else:
                target = to_world(pose, (end, 20.0))
        else:
            target = agent
        target = target + self.rng.normal(0.0, SCRIPTED_NOISE, 2)
        return np.clip(target, 0.0, 512.0).astype(np.float32)


def make_scripted_buffer(episodes: int = SCRIPTED_EPISODES) -> Path:
    """`pusht/scripted` as a zarr replay buffer, made once under a lock and renamed into place when complete."""
    path = dataset_directory() / "pusht_scripted_replay.zarr"
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = ExclusiveLock(path.parent / ".pusht_scripted_replay.lock", "making pusht/scripted", wait=True)
    try:
        if not path.is_dir():
            _write_scripted_buffer(path, episodes)
    finally:
        lock.release()
    return path


def _write_scripted_buffer(path: Path, episodes: int) -> None:
    env = make_env()
    states, actions, ends = [], [], []
    print(f"making pusht/scripted: {episodes} scripted episodes into {path}")
    try:
        for episode in range(episodes):
            sequence = np.random.SeedSequence([SCRIPTED_SEED, episode])
            state, _ = env.reset(seed=int(sequence.generate_state(1)[0]))
            pusher = ScriptedPusher(np.random.default_rng(sequence))
            done = False
            while not done:
                action = pusher(state)
                states.append(state)
                actions.append(action)
                state, _, terminated, truncated, _ = env.step(action)
                done = terminated or truncated
            ends.append(len(states))
    finally:
        env.close()
    temporary = path.with_suffix(".partial")
    shutil.rmtree(temporary, ignore_errors=True)
    write_buffer(temporary, np.asarray(states), np.asarray(actions), np.asarray(ends))
    temporary.rename(path)


def write_buffer(path: Path, states: np.ndarray, actions: np.ndarray, ends: np.ndarray) -> None:
    """A replay buffer in Diffusion Policy's layout (zarr v2, float32 arrays, int64 episode ends)."""
    root = _zarr().open_group(str(path), mode="w", zarr_format=2)
    root.create_group("data").create_array("state", data=states.astype(np.float32))
    root["data"].create_array("action", data=actions.astype(np.float32))
    root.create_group("meta").create_array("episode_ends", data=ends.astype(np.int64))
