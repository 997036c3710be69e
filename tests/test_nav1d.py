"""Nav1D: dynamics, reward, termination, reference returns, datasets, coherency, figure and CLI."""
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from common import nav1d


@pytest.fixture(scope="module")
def datasets():
    return {kind: nav1d.make_dataset(kind) for kind in nav1d.DATASET_KINDS}


@pytest.fixture(scope="module")
def arrays(datasets):
    """Per kind: observations (E, T + 1, 2), actions (E, T), rewards (E, T)."""
    result = {}
    for kind, dataset in datasets.items():
        episodes = list(dataset.iterate_episodes())
        result[kind] = (np.stack([episode.observations for episode in episodes]),
                        np.stack([episode.actions[:, 0] for episode in episodes]),
                        np.stack([episode.rewards for episode in episodes]))
    return result


def test_dynamics_clip_position_and_action():
    assert nav1d.step_state(0.0, 0.5) == pytest.approx(0.2)
    assert nav1d.step_state(0.0, 3.0) == pytest.approx(nav1d.DELTA)  # action clipped to 1
    assert nav1d.step_state(0.9, 1.0) == 1.0
    assert nav1d.step_state(-0.9, -1.0) == -1.0
    np.testing.assert_allclose(nav1d.step_state(np.array([0.1, -0.1]), np.array([-1.0, 1.0])), [-0.3, 0.3])


def test_reward_is_a_bump_around_the_sine_target():
    steps = np.arange(nav1d.HORIZON)
    np.testing.assert_allclose(nav1d.target(steps), 0.6 * np.sin(2 * np.pi * steps / 8))
    np.testing.assert_allclose(nav1d.reward(nav1d.target(steps), steps), 1.0)
    assert nav1d.reward(nav1d.target(2) + nav1d.SIGMA, 2) == pytest.approx(np.exp(-0.5))
    assert nav1d.reward(-1.0, 2) < 1e-10


def test_env_observation_termination_and_rewards():
    env = gym.make("Nav1D-v0")
    observation, _ = env.reset(seed=3)
    assert observation.dtype == np.float32 and observation.shape == (2,)
    assert env.observation_space.contains(observation) and observation[1] == 0.0
    assert env.action_space.shape == (1,)
    position = float(observation[0])
    for t in range(nav1d.HORIZON):
        action = np.array([0.7 if t % 2 else -0.3], dtype=np.float32)
        observation, step_reward, terminated, truncated, _ = env.step(action)
        position = float(nav1d.step_state(position, action[0]))
        assert observation[0] == pytest.approx(position, abs=1e-6)
        assert observation[1] == pytest.approx((t + 1) / nav1d.HORIZON)
        assert step_reward == pytest.approx(float(nav1d.reward(position, t)), abs=1e-6)
        assert terminated == (t == nav1d.HORIZON - 1) and not truncated
    second, _ = env.reset(seed=3)
    third, _ = env.reset(seed=4)
    assert second[0] != third[0]


def test_reference_returns_order_and_values():
    optimum, greedy, random = nav1d.optimal_return(), nav1d.greedy_return(), nav1d.random_return()
    assert optimum > greedy > random
    assert greedy == pytest.approx(7.2, abs=0.05) and optimum == pytest.approx(7.2, abs=0.1)
    assert random == pytest.approx(1.4, abs=0.05)
    assert optimum < nav1d.HORIZON


def test_greedy_rollouts_in_the_env_match_its_expected_return():
    env = gym.make("Nav1D-v0")
    returns = []
    for seed in range(1000):
        observation, _ = env.reset(seed=seed)
        total, done = 0.0, False
        while not done:
            step = round(observation[1] * nav1d.HORIZON)
            observation, step_reward, done, _, _ = env.step(np.array([nav1d.greedy_action(observation[0], step)]))
            total += step_reward
        returns.append(total)
    assert np.mean(returns) == pytest.approx(nav1d.greedy_return(), abs=4 * np.std(returns) / np.sqrt(1000))


def test_optimum_beats_every_constant_action_sequence_from_each_start():
    """The DP value of a start is at least the return of any open-loop plan from it (here: 201 constant plans)."""
    values = nav1d._optimal_values()[0]
    grid = np.linspace(-1.0, 1.0, nav1d.DP_GRID_POINTS)
    for index in (0, 1000, 2000, 3000, 4000):
        positions = np.full(201, grid[index])
        total = np.zeros(201)
        for t in range(nav1d.HORIZON):
            positions = nav1d.step_state(positions, np.linspace(-1, 1, 201))
            total += nav1d.reward(positions, t)
        assert values[index] >= total.max() - 1e-9


def test_dataset_statistics(datasets, arrays):
    for kind, dataset in datasets.items():
        assert dataset.total_episodes == nav1d.DATASET_EPISODES == 1000
        assert dataset.total_steps == 1000 * nav1d.HORIZON
        metadata = dataset.storage.metadata
        assert metadata["ref_min_score"] == pytest.approx(nav1d.random_return())
        assert metadata["ref_max_score"] == pytest.approx(nav1d.optimal_return())
    observations, actions, rewards = arrays["partial"]
    assert observations[:, 0, 0].min() >= -1.0 and observations[:, 0, 0].max() <= 0.0
    observations, actions, rewards = arrays["full"]
    assert observations[:, 0, 0].min() < -0.9 and observations[:, 0, 0].max() > 0.9
    assert rewards.sum(axis=1).mean() == pytest.approx(nav1d.random_return(), abs=0.15)
    assert np.abs(actions).max() <= 1.0
    _, _, expert_rewards = arrays["expert"]
    assert expert_rewards.sum(axis=1).mean() > 6.5


def test_dataset_generation_is_deterministic():
    first = nav1d.generate_rollouts("expert", 50, np.random.default_rng([nav1d.DATASET_SEED, 2]))
    second = nav1d.generate_rollouts("expert", 50, np.random.default_rng([nav1d.DATASET_SEED, 2]))
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_plan_coherency_is_one_on_true_transitions(arrays):
    observations, actions, _ = arrays["full"]
    positions = observations[..., 0].astype(np.float64)
    assert nav1d.plan_coherency(positions[:, :-1], actions, positions[:, 1:]) == pytest.approx(1.0, abs=1e-6)
    shifted = positions[:, 1:] + nav1d.KAPPA * np.sign(0.5 - positions[:, 1:])  # stays inside [-1, 1]
    assert nav1d.plan_coherency(positions[:, :-1], actions, shifted) == pytest.approx(np.exp(-0.5), abs=1e-3)


def test_policy_coherency(arrays):
    observations, actions, _ = arrays["full"]
    assert nav1d.policy_coherency("full", observations[:, :-1], actions) == 1.0
    assert nav1d.policy_coherency("partial", observations[:, :-1], actions + 2.5) == 0.0
    at_the_bound = np.full(actions.shape, np.float32(1.0) + np.float32(2.4e-7))  # float round-off of a clipped action
    assert nav1d.policy_coherency("full", observations[:, :-1], at_the_bound) == 1.0
    states = observations[:, :-1]
    greedy = nav1d.greedy_action(states[..., 0], np.arange(nav1d.HORIZON))
    assert nav1d.policy_coherency("expert", states, greedy) == pytest.approx(1.0)
    expert_observations, expert_actions, _ = arrays["expert"]
    # noisy expert actions: E[exp(-n^2 / (2 s^2))] = 1/sqrt(2) for n ~ N(0, s^2); more where clipping at the
    # action bounds removes part of the noise (far starts saturate the greedy action)
    assert 1 / np.sqrt(2) - 0.02 < nav1d.policy_coherency("expert", expert_observations[:, :-1], expert_actions) < 0.8


def test_plot_task_writes_a_png(tmp_path, arrays):
    path = tmp_path / "figure.png"
    observations, _, _ = arrays["expert"]
    nav1d.plot_task(path, observations[:5])
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_statistics_and_writes_the_figure(tmp_path, repo_root):
    figure = tmp_path / "nav1d.png"
    result = subprocess.run(
        [sys.executable, "nav1d.py", "--dataset", "partial", "--figure", str(figure)],
        cwd=repo_root, capture_output=True, text=True, env=dict(os.environ), timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "episodes 1000" in result.stdout and "optimum (DP)" in result.stdout and "random actions" in result.stdout
    assert figure.exists()
