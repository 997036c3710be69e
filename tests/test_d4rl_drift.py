"""benchmarks.d4rl_drift: replaying a D4RL-format file's logged states and actions on the environment that made it
gives no drift, and altered actions show as drift."""
import gymnasium as gym
import h5py
import numpy as np
import pytest

from benchmarks.d4rl_drift import replay_drift

ENV_KWARGS = {"terminate_when_unhealthy": False}  # random actions fall at once; the file needs 100-step stretches


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    """Two 150-step Hopper-v5 episodes of random actions, in the D4RL layout with infos/qpos and infos/qvel."""
    env = gym.make("Hopper-v5", **ENV_KWARGS)
    rng = np.random.default_rng(0)
    columns = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts", "qpos", "qvel")}
    for episode in range(2):
        observation, _ = env.reset(seed=episode)
        for step in range(150):
            simulator = env.unwrapped
            columns["qpos"].append(simulator.data.qpos.copy())
            columns["qvel"].append(simulator.data.qvel.copy())
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            columns["observations"].append(observation)
            observation, reward, terminated, _, _ = env.step(action)
            columns["actions"].append(action)
            columns["rewards"].append(reward)
            columns["terminals"].append(terminated)
            columns["timeouts"].append(step == 149)
    path = tmp_path_factory.mktemp("d4rl") / "hopper_random-v2.hdf5"
    with h5py.File(path, "w") as file:
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            file[key] = np.asarray(columns[key])
        file["infos/qpos"], file["infos/qvel"] = np.asarray(columns["qpos"]), np.asarray(columns["qvel"])
    return path


def test_the_environment_that_made_the_file_replays_it_without_drift(hopper_file):
    report = replay_drift(hopper_file, "Hopper-v5", starts=20, env_kwargs=ENV_KWARGS)
    assert sorted(report) == [1, 10, 100]
    for row in report.values():
        assert row["stretches"] == 20
        assert row["observation_drift_max"] < 1e-5 and row["reward_drift"] < 1e-5


def test_other_actions_show_as_drift_that_grows(hopper_file, tmp_path):
    altered = tmp_path / "altered.hdf5"
    altered.write_bytes(hopper_file.read_bytes())
    with h5py.File(altered, "r+") as file:
        file["actions"][...] = np.clip(file["actions"][()] + 0.3, -1, 1)
    report = replay_drift(altered, "Hopper-v5", starts=20, env_kwargs=ENV_KWARGS)
    assert 0 < report[1]["observation_drift"] < report[10]["observation_drift"]
    assert report[1]["reward_drift"] > 1e-3
