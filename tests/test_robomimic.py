"""Robomimic: the low-dim HDF5 format (made here by the scripted Lift policy), its robosuite environment and success
metric, files from older robosuite versions, bad files, and dp_align end to end on it."""
import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from common import robomimic_tasks
from common.data import evaluate, load_offline_data
from conftest import REPO_ROOT
from test_dp_align import TINY as TINY_DP
from test_robustness import assert_one_line_error, run

NAME = "robomimic/lift/scripted-mh"
DEMOS = 3
ROBOSUITE_1_4_OSC = {  # the controller config robomimic's robosuite 1.4 files carry (a part config, no body_parts)
    "type": "OSC_POSE", "input_max": 1, "input_min": -1, "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
    "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], "kp": 150, "damping": 1, "impedance_mode": "fixed",
    "kp_limits": [0, 300], "damping_limits": [0, 10], "position_limits": None, "orientation_limits": None,
    "uncouple_pos_ori": True, "control_delta": True, "interpolation": None, "ramp_ratio": 0.2}


@pytest.fixture(scope="module")
def lift_file():
    """Three scripted multi-operator Lift demonstrations under the real name (the session's robomimic folder)."""
    return robomimic_tasks.make_scripted("lift", "scripted-mh", demos=DEMOS)


def copy_with(tmp_path, source, edit) -> str:
    path = tmp_path / "edited.hdf5"
    shutil.copy(source, path)
    with h5py.File(path, "r+") as file:
        edit(file)
    return str(path)


def test_the_scripted_set_is_in_robomimics_format_and_loads_as_successful_episodes(lift_file):
    with h5py.File(lift_file, "r") as file:
        assert json.loads(file["data"].attrs["env_args"])["env_name"] == "Lift"
        assert sorted(file["data"]) == [f"demo_{i}" for i in range(DEMOS)]
        assert {"object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"} <= set(file["data/demo_0/obs"])
        assert sorted(file["mask"]) == ["better", "okay", "worse"]
        assert file["data"].attrs["total"] == sum(len(file[f"data/demo_{i}/actions"]) for i in range(DEMOS))
    data = load_offline_data(NAME)
    assert data.family == "robomimic" and data.observation_dim == 10 + 3 + 4 + 2 and data.action_dim == 7
    assert data.episode_ends.sum() == DEMOS and data.terminals.sum() == DEMOS  # each demo ends when the cube is up
    assert np.array_equal(data.terminals, data.episode_ends) and (data.episode_returns() == 1.0).all()
    assert np.allclose(data.observations[1:][~data.episode_ends[:-1]], data.next_observations[:-1][~data.episode_ends[:-1]])
    assert robomimic_tasks.make_scripted("lift", "scripted-mh") == lift_file  # found, not made again


def test_success_ends_an_episode_the_scripted_policy_lifts_the_cube_doing_nothing_does_not(lift_file):
    data = load_offline_data(NAME)
    policies: dict[int, robomimic_tasks.ScriptedPickPlace] = {}

    def scripted(observations, env_ids):  # flat layout: object (cube position first), then the end effector's position
        actions = []
        for observation, env_id in zip(observations, env_ids):
            policy = policies.setdefault(int(env_id), robomimic_tasks.ScriptedPickPlace("lift", 0.0, 1.0,
                                                                                        np.random.default_rng(0)))
            actions.append(policy({"cube_pos": observation[:3], "robot0_eef_pos": observation[10:13]}))
        return np.stack(actions)

    lifted = evaluate(scripted, data.make_env, episodes=2, seed=0)
    idle = evaluate(lambda observations, _: np.zeros((len(observations), 7)), data.make_env, episodes=2, seed=0,
                    max_steps=30)
    assert lifted.success.tolist() == [True, True] and (lifted.lengths < 100).all() and (lifted.returns == 1).all()
    assert idle.success.tolist() == [False, False] and (idle.returns == 0).all()
    env = data.make_env()
    starts = [env.reset(seed=seed)[0][:3] for seed in (0, 0, 1)]
    env.close()
    assert np.array_equal(starts[0], starts[1]) and not np.array_equal(starts[0], starts[2])  # placement from the seed


def test_the_scripted_can_policy_puts_the_can_in_its_bin():
    """Can's waypoints (grasp, carry over the bin, release, move away) end in robosuite's success, in about the
    length of robomimic's human Can demonstrations (~120 steps)."""
    env = robomimic_tasks.RobomimicEnv(robomimic_tasks.TASK_ENV_ARGS["can"], robomimic_tasks.HORIZONS["can"])
    env.reset(seed=0)
    policy = robomimic_tasks.ScriptedPickPlace("can", 0.05, 1.0, np.random.default_rng(0))
    for step in range(env.horizon):
        observation = robomimic_tasks.low_dim_observation(env.suite_env._get_observations())
        _, reward, success, _, _ = env.step(policy(observation))
        if success:
            break
    env.close()
    assert success and reward == 1.0 and 60 < step < 250


def test_a_file_path_with_robosuite_1_4s_controller_config_loads_and_evaluates(lift_file, tmp_path):
    def old_controller(file):
        env_args = json.loads(file["data"].attrs["env_args"])
        env_args["env_kwargs"]["controller_configs"] = ROBOSUITE_1_4_OSC
        file["data"].attrs["env_args"] = json.dumps(env_args)

    path = copy_with(tmp_path, lift_file, old_controller)
    data = load_offline_data(path)
    assert data.source == f"robomimic-hdf5:{path}" and len(data) == len(load_offline_data(NAME))
    result = evaluate(lambda observations, _: np.zeros((len(observations), 7)), data.make_env, episodes=1, seed=0,
                      max_steps=3)
    assert result.lengths.tolist() == [3]


@pytest.mark.parametrize("edit, fragment", [
    (lambda file: file["data"].attrs.__delitem__("env_args"), "has no data.attrs['env_args']"),
    (lambda file: file.__delitem__("data/demo_1/obs/robot0_eef_quat"), "lacks observation keys obs/robot0_eef_quat"),
])
def test_a_file_without_env_args_or_observation_keys_is_a_one_line_error(lift_file, tmp_path, edit, fragment):
    path = copy_with(tmp_path, lift_file, edit)
    assert_one_line_error(run("dp_align", "--env", path, "--run-dir", str(tmp_path / "run"), timeout=120), fragment)


@pytest.mark.parametrize("name, fragment", [
    ("robomimic/can/ph", "python -m robomimic.scripts.download_datasets --tasks can --dataset_types ph"),
    ("robomimic/stack/ph", "lift, can, square, transport, tool_hang"),
    ("robomimic/square/scripted-ph", "for square: ph, mh, mg"),
])
def test_a_missing_dataset_or_unknown_name_is_a_one_line_error(tmp_path, name, fragment):
    assert_one_line_error(run("dp_align", "--env", name, "--run-dir", str(tmp_path / "run"), timeout=120), fragment)


def test_robosuite_missing_is_a_one_line_error_with_the_install_command(lift_file, tmp_path):
    hide_robosuite = ("import runpy, sys; sys.modules['robosuite'] = None; sys.argv = sys.argv[1:]; "
                      "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_robosuite, "dp_align.py", "--env", NAME, "--run-dir",
                             str(tmp_path / "run")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "pip install robosuite")


def test_dp_align_runs_on_robomimic_with_diffusion_policys_horizons_and_reports_success(lift_file, tmp_path):
    result = run("dp_align", "--env", NAME, *TINY_DP, "--align", "rl", "--eval-episodes", "2", "--eval-max-steps", "5",
                 "--cpu-threads", "1", "--run-dir", str(tmp_path / "run"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert {"foundation", "aligned"} <= set(stages)
    assert all(stats["success_rate"] == 0.0 for stats in stages.values())  # 5 steps cannot lift the cube
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (args["obs_horizon"], args["pred_horizon"], args["action_horizon"]) == (2, 16, 8)
