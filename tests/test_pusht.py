"""PushT: Diffusion Policy's zarr replay buffer (written here from live rollouts and by the scripted pusher), rewards
labelled from the logged states as the env would give them, success, bad buffers, and dp_align end to end."""
import json
import shutil

import numpy as np
import pytest

from common import pusht_tasks
from common.data import load_offline_data
from test_dp_align import TINY as TINY_DP
from test_robustness import assert_one_line_error, run


def rollout(episodes: int, steps: int):
    """Live scripted episodes: the logged states and actions, and the rewards PushTScore gave for them."""
    env = pusht_tasks.make_env()
    states, actions, rewards, ends = [], [], [], []
    for episode in range(episodes):
        state, _ = env.reset(seed=episode)
        pusher = pusht_tasks.ScriptedPusher(np.random.default_rng(episode))
        for _ in range(steps):
            action = pusher(state)
            states.append(state)
            actions.append(action)
            state, reward, terminated, truncated, _ = env.step(action)
            rewards.append(reward)
            if terminated or truncated:
                break
        ends.append(len(states))
    env.close()
    return np.array(states), np.array(actions), np.array(rewards), np.array(ends)


def test_rewards_labelled_from_a_buffer_are_the_ones_the_env_gave(tmp_path):
    states, actions, live_rewards, ends = rollout(episodes=2, steps=120)
    pusht_tasks.write_buffer(tmp_path / "live.zarr", states, actions, ends)
    data = load_offline_data(str(tmp_path / "live.zarr"))
    assert data.family == "pusht" and data.observation_dim == 5 and data.action_dim == 2 and len(data) == ends[-1]
    assert np.array_equal(np.flatnonzero(data.episode_ends) + 1, ends)
    assert data.action_low.tolist() == [0, 0] and data.action_high.tolist() == [512, 512]
    labelled = ~data.episode_ends  # the last step's successor is not in the buffer
    assert np.allclose(data.rewards[labelled], live_rewards[labelled], atol=1e-3)
    assert live_rewards.sum() > 0.05  # the pusher moved the block onto the goal a little: the check compared something
    assert np.allclose(data.next_observations[:-1][labelled[:-1]], data.observations[1:][labelled[:-1]])


def test_the_coverage_read_from_a_logged_state_is_the_one_the_env_reported():
    """Steps near the goal, where the coverage varies most: the logged observation alone gives back the env's number."""
    env = pusht_tasks.make_env()
    rng = np.random.default_rng(0)
    observations, reported = [], []
    for _ in range(6):
        observation, _ = env.reset(seed=int(rng.integers(1000)))
        block = env.unwrapped.block
        block.angle, block.position = np.pi / 4 + rng.uniform(-0.5, 0.5), tuple(256 + rng.uniform(-30, 30, 2))
        observation = env.unwrapped.get_obs()
        for _ in range(10):
            observation, _, _, _, info = env.step(np.asarray(observation[2:4] + rng.normal(0, 30, 2), np.float32))
            observations.append(observation)
            reported.append(info["coverage"])
    reported = np.array(reported)
    assert reported.std() > 0.1 and reported.max() > 0.4  # a spread of coverages, not mostly zeros
    assert np.allclose(pusht_tasks.coverages(env, np.array(observations)), reported, atol=1e-6)
    env.close()


def test_the_return_is_diffusion_policys_score_and_success_ends_the_episode():
    env = pusht_tasks.make_env()
    env.reset(seed=0)
    env.unwrapped.block.angle, env.unwrapped.block.position = np.pi / 4, (256.0, 256.0)  # on the goal
    _, reward, terminated, _, info = env.step(np.array([50.0, 50.0], np.float32))  # the agent stays away from it
    assert info["success"] and terminated and reward == pytest.approx(1.0)
    env.reset(seed=0)
    total, best = 0.0, 0.0
    pusher = pusht_tasks.ScriptedPusher(np.random.default_rng(0))
    observation = env.unwrapped.get_obs()
    for _ in range(60):
        observation, reward, _, _, info = env.step(pusher(observation))
        total += reward
        best = max(best, min(info["coverage"] / 0.95, 1.0))
    assert total == pytest.approx(best) and not info["success"]
    env.close()


def test_the_scripted_buffer_is_made_once_in_diffusion_policys_layout():
    path = pusht_tasks.make_scripted_buffer(episodes=2)
    states, actions, ends = pusht_tasks.read_buffer(path)
    assert states.shape[1] == 5 and actions.shape == (len(states), 2) and len(ends) == 2
    assert pusht_tasks.make_scripted_buffer(episodes=5) == path  # found, not made again
    assert load_offline_data("pusht/scripted").episode_ends.sum() == 2


@pytest.mark.parametrize("name, fragment", [
    ("pusht/dp", "https://diffusion-policy.cs.columbia.edu/data/training/pusht.zip"),
    ("pusht/human", "use pusht/dp, pusht/scripted or a path to a .zarr replay buffer"),
])
def test_a_missing_or_unknown_pusht_dataset_is_a_one_line_error(tmp_path, name, fragment):
    assert_one_line_error(run("dp_align", "--env", name, "--run-dir", str(tmp_path / "run"), timeout=120), fragment)


def test_a_buffer_without_episode_ends_is_a_one_line_error(tmp_path):
    states, actions, _, ends = rollout(episodes=1, steps=5)
    pusht_tasks.write_buffer(tmp_path / "cut.zarr", states, actions, ends)
    shutil.rmtree(tmp_path / "cut.zarr" / "meta" / "episode_ends")
    result = run("dp_align", "--env", str(tmp_path / "cut.zarr"), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert_one_line_error(result, "lacks meta/episode_ends")


def test_dp_align_runs_on_pusht_with_diffusion_policys_horizons(tmp_path):
    pusht_tasks.make_scripted_buffer(episodes=2)
    result = run("dp_align", "--env", "pusht/scripted", *TINY_DP, "--align", "rl", "--eval-episodes", "2",
                 "--eval-max-steps", "5", "--cpu-threads", "1", "--run-dir", str(tmp_path / "run"), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert {"foundation", "aligned"} <= set(stages) and all("success_rate" in stats for stats in stages.values())
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (args["obs_horizon"], args["pred_horizon"], args["action_horizon"]) == (2, 16, 8)


def write_lerobot(folder, episodes: list[dict], one_file: bool) -> None:
    """A LeRobot dataset of PushT keypoint episodes: one parquet file per episode (LeRobot 2.x) or one for all (3.0)."""
    import pyarrow
    import pyarrow.parquet as parquet

    features = {column: {"dtype": "float32"} for column in pusht_tasks.LEROBOT_COLUMNS + ("next.success",)}
    (folder / "meta").mkdir(parents=True)
    (folder / "meta" / "info.json").write_text(json.dumps({"codebase_version": "v2.1", "features": features}))
    tables = [pyarrow.table({column: [list(map(float, value)) if np.ndim(value) else value for value in values]
                             for column, values in episode.items()}) for episode in episodes]
    parts = [pyarrow.concat_tables(tables)] if one_file else tables
    for index, table in enumerate(parts):
        path = folder / "data" / "chunk-000" / (f"file-{index:03d}.parquet" if one_file else f"episode_{index:06d}.parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        parquet.write_table(table, path)


def keypoint_rollouts(episodes: int, steps: int):
    """Live episodes with gym-pusht's keypoint observations, as LeRobot columns, and the flat observations and
    PushTScore rewards the evaluation env gave."""
    env = pusht_tasks.make_env("environment_state_agent_pos")
    columns, flat, gains = [], [], []
    for episode in range(episodes):
        observation, _ = env.reset(seed=episode)
        pusher = pusht_tasks.ScriptedPusher(np.random.default_rng(episode))
        rows = {column: [] for column in pusht_tasks.LEROBOT_COLUMNS + ("next.success",)}
        for frame in range(steps):
            core = env.unwrapped
            state = np.concatenate([core.agent.position, core.block.position, [core.block.angle % (2 * np.pi)]])
            keypoints = core.get_obs()
            action = pusher(state)
            flat.append(observation)
            observation, gain, terminated, _, info = env.step(action)
            gains.append(gain)
            for column, value in [("observation.environment_state", keypoints["environment_state"]),
                                  ("observation.state", keypoints["agent_pos"]), ("action", action),
                                  ("next.reward", min(info["coverage"] / 0.95, 1.0)), ("next.success", info["success"]),
                                  ("episode_index", episode), ("frame_index", frame)]:
                rows[column].append(value)
            if terminated:
                break
        columns.append(rows)
    env.close()
    return columns, np.array(flat), np.array(gains)


@pytest.mark.parametrize("one_file", [False, True], ids=["lerobot-2.x", "lerobot-3.0"])
def test_a_lerobot_keypoint_dataset_loads_with_the_observations_and_rewards_of_the_env(tmp_path, one_file):
    columns, flat, gains = keypoint_rollouts(episodes=2, steps=40)
    write_lerobot(tmp_path / "pusht_keypoints", columns[::-1], one_file)  # stored out of order: sorted on load
    data = load_offline_data(str(tmp_path / "pusht_keypoints"))
    assert data.source.startswith("lerobot:") and data.observation_dim == 18 and len(data) == 80
    assert np.allclose(data.observations, flat, atol=1e-4)
    assert np.allclose(data.rewards, gains, atol=1e-6) and gains.sum() > 0.05
    assert data.episode_ends.sum() == 2 and data.make_env().reset(seed=0)[0].shape == (18,)


def test_lerobot_pusht_or_a_dataset_without_keypoints_is_a_one_line_error(tmp_path):
    assert_one_line_error(run("dp_align", "--env", "lerobot/pusht", "--run-dir", str(tmp_path / "run"), timeout=120),
                          "use lerobot/pusht_keypoints")
    columns, _, _ = keypoint_rollouts(episodes=1, steps=3)
    write_lerobot(tmp_path / "no_keypoints", columns, one_file=True)
    info = json.loads((tmp_path / "no_keypoints" / "meta" / "info.json").read_text())
    del info["features"]["observation.environment_state"]
    (tmp_path / "no_keypoints" / "meta" / "info.json").write_text(json.dumps(info))
    result = run("dp_align", "--env", str(tmp_path / "no_keypoints"), "--run-dir", str(tmp_path / "run"), timeout=120)
    assert_one_line_error(result, "lacks observation.environment_state")
