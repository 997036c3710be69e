"""MetaWorld: datasets made from the scripted policies (tiny ones here), the success metric, bad names, and both
alignment scripts end to end on a MetaWorld dataset."""
import json
import subprocess
import sys

import numpy as np
import pytest

from common import metaworld_tasks
from common.data import evaluate, load_offline_data
from common.runtime import stage_stats
from conftest import REPO_ROOT
from test_diffuser_align import TINY as TINY_DIFFUSER
from test_dp_align import TINY as TINY_DP
from test_robustness import assert_one_line_error, run

TASK = "button-press"
NAME = f"metaworld/{TASK}/medium-v0"
EPISODES = 2


@pytest.fixture(scope="module")
def tiny_dataset():
    """A two-episode medium dataset under the real name, shared by this module (the session's Minari folder)."""
    return metaworld_tasks.make_dataset(TASK, "medium", episodes=EPISODES)


def test_a_dataset_keeps_full_episodes_the_success_flag_and_its_reference_returns(tiny_dataset):
    data = load_offline_data(NAME)
    assert data.family == "metaworld" and len(data) == EPISODES * 500
    assert data.observations.shape[1:] == (39,) and data.actions.shape[1:] == (4,)
    assert data.episode_ends.sum() == EPISODES and not data.terminals.any()  # fixed-length episodes, time-outs only
    assert data.ref_min_score < data.ref_max_score  # random policy below the scripted one
    for episode in tiny_dataset.iterate_episodes():
        assert episode.infos["success"].shape == (501,) and episode.infos["success"].dtype == bool
    again = metaworld_tasks.make_dataset(TASK, "medium", episodes=EPISODES)  # found, not made again
    assert np.array_equal(next(again.iterate_episodes()).actions, next(tiny_dataset.iterate_episodes()).actions)


def test_success_is_scored_per_episode_the_scripted_policy_succeeds_random_actions_do_not():
    policy = metaworld_tasks.scripted_policy(TASK)
    make_env = lambda: metaworld_tasks.MetaWorldTask(TASK)
    scripted = evaluate(lambda observations, _: np.stack([policy.get_action(o) for o in observations]), make_env,
                        episodes=3, seed=0)
    rng = np.random.default_rng(0)
    random = evaluate(lambda observations, _: rng.uniform(-1, 1, (len(observations), 4)), make_env, episodes=3, seed=0)
    assert scripted.success.tolist() == [True, True, True] and not random.success.any()
    assert (scripted.lengths == 500).all()
    assert stage_stats(scripted.returns, scripted.returns, success=scripted.success)["success_rate"] == 1.0
    placements = [metaworld_tasks.MetaWorldTask(TASK).reset(seed=seed)[0][4:7] for seed in range(3)]
    assert len({tuple(np.round(position, 4)) for position in placements}) > 1  # the placement varies with the seed


@pytest.mark.parametrize("name, fragment", [
    ("metaworld/door-open/medium-v0", "button-press, drawer-open, sweep-into, plate-slide"),
    ("metaworld/button-press/good-v0", "expert, medium, replay"),
])
def test_an_unknown_task_or_quality_is_a_one_line_error(tmp_path, name, fragment):
    assert_one_line_error(run("dp_align", "--env", name, "--run-dir", str(tmp_path / "run"), timeout=120), fragment)


def test_metaworld_missing_is_a_one_line_error_with_the_install_command(tmp_path):
    hide_metaworld = ("import runpy, sys; sys.modules['metaworld'] = None; sys.argv = sys.argv[1:]; "
                      "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide_metaworld, "dp_align.py", "--env", NAME, "--run-dir",
                             str(tmp_path / "run")], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "pip install metaworld")


@pytest.mark.parametrize("script, argv", [
    ("dp_align", [*TINY_DP, "--align", "rl"]),
    ("diffuser_align", [*TINY_DIFFUSER, "--horizon", "4", "--align", "qvpg"]),
])
def test_both_alignment_scripts_run_on_metaworld_and_report_success(tiny_dataset, tmp_path, script, argv):
    result = run(script, "--env", NAME, *argv, "--eval-episodes", "2", "--eval-max-steps", "5", "--cpu-threads", "1",
                 "--run-dir", str(tmp_path / "run"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert {"foundation", "aligned"} <= set(stages)
    assert all(0.0 <= stats["success_rate"] <= 1.0 for stats in stages.values())
    assert "success rate" in result.stdout
    if script == "dp_align":  # the MetaWorld preset: Diffusion Policy's own horizons
        args = json.loads((tmp_path / "run" / "args.json").read_text())
        assert (args["obs_horizon"], args["pred_horizon"], args["action_horizon"]) == (2, 16, 8)
