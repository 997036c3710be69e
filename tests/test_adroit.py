"""D4RL adroit names: the raw D4RL file, evaluated on Gymnasium-Robotics' AdroitHand*-v1 with D4RL's rewards,
episode lengths and pen-drop termination. The files here are made by the environment itself."""
import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from common.data import (ADROIT_HORIZONS, D4RL_REFERENCE_RETURNS, DatasetError, load_offline_data, make_adroit_env,
                         normalized_score)
from conftest import REPO_ROOT
from test_eda import TINY_NAV1D


def write_adroit_file(path, task: str, episodes: int = 3, length: int = 20, seed: int = 0) -> None:
    """Random-action episodes of `task` in the layout of D4RL's hand_dapg_v1 files, each cut by a time-out."""
    env = make_adroit_env(task)
    rng = np.random.default_rng(seed)
    columns = {key: [] for key in ("observations", "actions", "rewards", "terminals", "timeouts")}
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed + episode)
        for step in range(length):
            action = rng.uniform(-1, 1, env.action_space.shape).astype(np.float32)
            next_observation, reward, terminated, _, _ = env.step(action)
            for key, value in zip(columns, (observation, action, reward, terminated, step == length - 1 and not terminated)):
                columns[key].append(value)
            observation = next_observation
            if terminated:
                break
    env.close()
    with h5py.File(path, "w") as file:
        for key, values in columns.items():
            file[key] = np.asarray(values, dtype=np.float32 if key not in ("terminals", "timeouts") else bool)


def d4rl_door_reward(sim) -> float:
    """D4RL's door reward (hand_manipulation_suite/door_v0.py), written from the simulator's state."""
    handle, palm = sim.data.site_xpos[sim.handle_site_id], sim.data.site_xpos[sim.grasp_site_id]
    hinge = sim.data.qpos[sim.door_hinge_addrs]
    reward = -0.1 * np.linalg.norm(palm - handle) - 0.1 * (hinge - 1.57) ** 2 - 1e-5 * np.sum(sim.data.qvel ** 2)
    return float(reward + 2 * (hinge > 0.2) + 8 * (hinge > 1.0) + 10 * (hinge > 1.35))


def test_door_is_rewarded_as_d4rl_rewarded_it():
    env = make_adroit_env("door")
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        _, reward, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape))
        assert reward == pytest.approx(d4rl_door_reward(env.unwrapped), abs=1e-9)
    assert env.spec.max_episode_steps == ADROIT_HORIZONS["door"] == 200


def test_the_pen_episode_ends_when_the_pen_falls_and_lasts_d4rls_100_steps():
    env = make_adroit_env("pen")
    env.reset(seed=0)
    _, _, terminated, _, _ = env.step(np.zeros(env.action_space.shape))
    assert not terminated
    sim = env.unwrapped
    qpos, qvel = sim.data.qpos.copy(), sim.data.qvel.copy()
    qpos[sim.model.jnt_qposadr[sim.model.joint("OBJTx").id]] = 0.3  # the pen's slide joint along world -z
    sim.set_state(qpos, qvel)
    assert sim.data.xpos[sim.obj_body_id][2] < 0.075
    _, _, terminated, _, _ = env.step(np.zeros(env.action_space.shape))
    assert terminated
    assert make_adroit_env("pen").spec.max_episode_steps == 100


def test_an_adroit_file_loads_with_its_environment_and_reference_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    write_adroit_file(tmp_path / "door-human-v1.hdf5", "door")
    data = load_offline_data("door-human-v1")
    assert data.family == "adroit" and len(data) == 3 * 20 - 3  # each time-out step lacks a next observation
    assert (data.ref_min_score, data.ref_max_score) == D4RL_REFERENCE_RETURNS["door"]
    assert normalized_score(data, [D4RL_REFERENCE_RETURNS["door"][1]]) == pytest.approx([100.0])
    env = data.make_env()
    assert env.spec.id == "AdroitHandDoor-v1" and env.observation_space.shape == (39,)


def test_an_adroit_file_of_another_task_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    write_adroit_file(tmp_path / "pen-human-v1.hdf5", "door")  # door-sized data under a pen name
    with pytest.raises(DatasetError, match="AdroitHandPen-v1"):
        load_offline_data("pen-human-v1")


def test_antmaze_and_kitchen_names_point_to_their_minari_recollections_instead_of_loading_them():
    for name, namesake in [("antmaze-umaze-diverse-v2", "D4RL/antmaze/umaze-diverse-v1"),
                           ("kitchen-mixed-v0", "D4RL/kitchen/mixed-v2")]:
        with pytest.raises(DatasetError) as error:
            load_offline_data(name)
        message = str(error.value)
        assert "\n" not in message and f"--env {namesake}" in message and f"minari download {namesake}" in message


def test_eda_trains_and_evaluates_on_an_adroit_file(tmp_path):
    write_adroit_file(tmp_path / "hammer-expert-v1.hdf5", "hammer", episodes=2, length=10)
    result = subprocess.run([sys.executable, "eda_d4rl.py", "--env", "hammer-expert-v1", *TINY_NAV1D,
                             "--eval-episodes", "1", "--run-dir", str(tmp_path / "run")], cwd=REPO_ROOT,
                            env=dict(os.environ, D4RL_DATASET_DIR=str(tmp_path)), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    aligned = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]["aligned"]
    assert np.isfinite(aligned["normalized_mean"]) and aligned["episodes"] == 1
