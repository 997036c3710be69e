"""common/data.py: dataset resolution and loading (Nav1D, Minari, raw D4RL HDF5), errors, windows, normalisation,
reward convention and lockstep evaluation."""
import os
import subprocess
import sys

import gymnasium as gym
import h5py
import minari
import numpy as np
import pytest
import torch


from common import nav1d
from conftest import make_tiny_hopper_dataset
from common.data import (
    D4RL_REFERENCE_RETURNS,
    DatasetError,
    FlatObservation,
    Normalizer,
    OfflineData,
    eval_seed,
    evaluate,
    flatten_observation,
    iql_reward_affine,
    iql_rewards,
    load_offline_data,
    model_transitions,
    normalized_score,
    observation_keys,
    unscale_actions,
    windows,
)

TINY_HOPPER = "test/hopper/tiny-v0"


@pytest.fixture(scope="module")
def nav1d_full():
    return load_offline_data("nav1d-full")


@pytest.fixture(scope="module")
def tiny_hopper(minari_datasets_path):
    """20 random Hopper-v5 episodes of at most 50 steps."""
    return make_tiny_hopper_dataset(TINY_HOPPER, episodes=20, steps=50)


@pytest.fixture
def d4rl_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    return tmp_path


@pytest.fixture
def offline(monkeypatch):
    """No dataset download is ever attempted (it would need the network)."""
    def refuse(dataset_id, force_download=False):
        raise ConnectionError("no network in tests")
    monkeypatch.setattr(minari, "download_dataset", refuse)


def write_d4rl_file(path, episodes=3, length=100, next_observations=True, rewards=None):
    """A file in the D4RL layout for Hopper: episodes of `length` steps, each ending in a time-out except the
    last of episode 0, which terminates (so the file also has a true termination)."""
    rng = np.random.default_rng(1)
    count = episodes * length
    terminals = np.zeros(count, dtype=bool)
    timeouts = np.zeros(count, dtype=bool)
    timeouts[length - 1::length] = True
    terminals[length - 1], timeouts[length - 1] = True, False
    with h5py.File(path, "w") as file:
        file["observations"] = rng.normal(size=(count, 11)).astype(np.float32)
        file["actions"] = rng.uniform(-1, 1, (count, 3)).astype(np.float32)
        file["rewards"] = rng.uniform(0, 3, count).astype(np.float32) if rewards is None else rewards
        file["terminals"] = terminals
        file["timeouts"] = timeouts
        if next_observations:
            file["next_observations"] = rng.normal(size=(count, 11)).astype(np.float32)


def toy_data(family="other", episode_lengths=(3, 2), rewards=None) -> OfflineData:
    count = sum(episode_lengths)
    ends = np.zeros(count, dtype=bool)
    ends[np.cumsum(episode_lengths) - 1] = True
    observations = np.arange(count, dtype=np.float32)[:, None] * np.array([[1.0, 10.0]], dtype=np.float32)
    return OfflineData(
        name="toy", source="test", family=family, observations=observations,
        actions=observations[:, :1] + 100, rewards=np.ones(count, np.float32) if rewards is None else rewards,
        next_observations=observations + 1, terminals=ends.copy(), episode_ends=ends, ref_min_score=0.0,
        ref_max_score=10.0, make_env=lambda: None, action_low=-np.ones(1), action_high=np.ones(1),
    )


# ------------------------------------------------------------------------------------------------------------------
def test_nav1d_names_load_the_local_minari_dataset(nav1d_full):
    data = nav1d_full
    assert data.source == "minari:nav1d/full-v0" and data.family == "nav1d"
    assert data.observations.shape == (8000, 2) and data.actions.shape == (8000, 1)
    assert data.observations.dtype == np.float32 and data.rewards.dtype == np.float32
    assert data.terminals.sum() == 1000 and np.array_equal(data.terminals, data.episode_ends)
    assert len(data.episode_slices()) == 1000
    np.testing.assert_allclose(data.next_observations[:-1][~data.episode_ends[:-1]],
                               data.observations[1:][~data.episode_ends[:-1]])
    assert data.ref_min_score == pytest.approx(nav1d.random_return())
    assert data.ref_max_score == pytest.approx(nav1d.optimal_return())
    assert normalized_score(data, [nav1d.optimal_return(), nav1d.random_return()]) == pytest.approx([100.0, 0.0])
    assert load_offline_data("nav1d/full-v0").source == data.source
    with pytest.raises(DatasetError, match="nav1d-partial"):
        load_offline_data("nav1d-medium")


def test_minari_round_trip_loads_normalises_and_evaluates(tiny_hopper):
    data = load_offline_data(TINY_HOPPER)
    episodes = list(tiny_hopper.iterate_episodes())
    assert data.source == f"minari:{TINY_HOPPER}" and data.family == "locomotion"
    assert (data.ref_min_score, data.ref_max_score) == D4RL_REFERENCE_RETURNS["hopper"]
    assert len(data) == sum(len(episode) for episode in episodes) and data.episode_ends.sum() == 20
    assert data.terminals.sum() == sum(episode.terminations.sum() for episode in episodes)
    np.testing.assert_allclose(data.episode_returns(), [episode.rewards.sum() for episode in episodes], rtol=1e-5)
    normalizer = Normalizer.from_array(data.observations)
    normalized = normalizer.normalize(data.observations)
    np.testing.assert_allclose(normalized.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(normalizer.unnormalize(normalized), data.observations, atol=1e-4)

    def policy(observations, env_ids):
        assert observations.shape[1] == 11
        return np.tanh(normalizer.normalize(observations)[:, :3])

    result = evaluate(policy, data.make_env, episodes=2, seed=0, max_steps=10)
    assert list(result.lengths) == [10, 10] and result.observations[0].shape == (11, 11)
    assert result.actions[1].shape == (10, 3)
    assert np.all(np.isfinite(normalized_score(data, result.returns)))


def test_d4rl_hdf5_file_loads_through_the_d4rl_name(d4rl_dir, offline):
    write_d4rl_file(d4rl_dir / "hopper_medium-v2.hdf5")
    data = load_offline_data("hopper-medium-v2")
    assert data.source == f"d4rl-hdf5:{d4rl_dir / 'hopper_medium-v2.hdf5'}" and data.family == "locomotion"
    assert len(data) == 300 and data.observations.shape == (300, 11) and data.actions.shape == (300, 3)
    assert data.terminals.sum() == 1 and data.episode_ends.sum() == 3
    assert [s.stop - s.start for s in data.episode_slices()] == [100, 100, 100]
    assert normalized_score(data, [3234.3]) == pytest.approx([100.0])
    assert data.make_env().spec.id == "Hopper-v5"


def test_d4rl_file_without_next_observations_drops_time_out_steps(d4rl_dir, offline):
    write_d4rl_file(d4rl_dir / "hopper-medium-v2.hdf5", next_observations=False)
    data = load_offline_data("hopper-medium-v2")
    # episode 0 terminates (kept whole); episodes 1 and 2 end in a time-out whose successor is unknown
    assert [s.stop - s.start for s in data.episode_slices()] == [100, 99, 99]
    inside = ~data.episode_ends
    np.testing.assert_array_equal(data.next_observations[inside], data.observations[1:][inside[:-1]])


def test_iql_reward_scale_leaves_out_an_episode_cut_off_by_the_end_of_the_file(d4rl_dir, offline):
    rewards = np.ones(300, dtype=np.float32)
    rewards[200:] = 0.01  # the last episode has a tiny return: counted, it would widen the spread
    write_d4rl_file(d4rl_dir / "hopper_medium-v2.hdf5", rewards=rewards)
    with h5py.File(d4rl_dir / "hopper_medium-v2.hdf5", "a") as file:
        timeouts = file["timeouts"][()]
        timeouts[-1] = False  # the file ends in the middle of episode 2
        del file["timeouts"]
        file["timeouts"] = timeouts
    data = load_offline_data("hopper-medium-v2")
    assert not data.last_episode_finished and len(data.episode_returns()) == 3
    np.testing.assert_allclose(data.episode_returns(finished_only=True), [100.0, 100.0])
    # both finished episodes return 100, so their spread is 0 and the rewards keep their scale
    np.testing.assert_allclose(iql_rewards(data), rewards)


def test_nonfinite_rewards_are_a_dataset_error(d4rl_dir, offline):
    rewards = np.ones(300, dtype=np.float32)
    rewards[42] = np.nan
    write_d4rl_file(d4rl_dir / "hopper_medium-v2.hdf5", rewards=rewards)
    with pytest.raises(DatasetError, match=r"non-finite rewards \(first at transition 42") as error:
        load_offline_data("hopper-medium-v2")
    assert "\n" not in str(error.value)


def test_truncated_file_and_missing_keys_are_dataset_errors(d4rl_dir, offline):
    write_d4rl_file(d4rl_dir / "hopper_medium-v2.hdf5")
    content = (d4rl_dir / "hopper_medium-v2.hdf5").read_bytes()
    (d4rl_dir / "hopper_medium-v2.hdf5").write_bytes(content[: len(content) // 3])
    with pytest.raises(DatasetError, match="cannot read D4RL file .*hopper_medium-v2.hdf5"):
        load_offline_data("hopper-medium-v2")
    with h5py.File(d4rl_dir / "walker2d_expert-v2.hdf5", "w") as file:
        file["observations"] = np.zeros((5, 17), np.float32)
    with pytest.raises(DatasetError, match="missing keys actions, rewards, terminals, timeouts"):
        load_offline_data("walker2d-expert-v2")


def test_wrong_observation_size_is_a_dataset_error(d4rl_dir, offline):
    write_d4rl_file(d4rl_dir / "halfcheetah_medium-v2.hdf5")  # hopper-sized data under a halfcheetah name
    with pytest.raises(DatasetError, match="HalfCheetah-v5"):
        load_offline_data("halfcheetah-medium-v2")


def test_missing_dataset_message_names_places_and_commands(d4rl_dir, offline):
    with pytest.raises(DatasetError) as error:
        load_offline_data("walker2d-medium-v2")
    message = str(error.value)
    assert "\n" not in message and "walker2d-medium-v2" in message
    assert str(d4rl_dir) in message and "walker2d_medium-v2.hdf5" in message
    assert "127.0.0.1:9/gym_mujoco_v2/walker2d_medium-v2.hdf5" in message and "refused" in message  # the URL tried
    assert "--env mujoco/walker2d/medium-v0" in message  # similar data, named but never loaded in its place
    with pytest.raises(DatasetError, match="127.0.0.1:9/hand_dapg_v1/door-human-v1.hdf5") as error:
        load_offline_data("door-human-v1")
    assert "--env D4RL/door/human-v2" in str(error.value)
    with pytest.raises(DatasetError, match="gym_mujoco_v2/hopper_medium_replay-v2.hdf5") as error:
        load_offline_data("hopper-medium-replay-v2")
    assert "similar" not in str(error.value)  # Minari has no medium-replay namesake
    with pytest.raises(DatasetError, match="only -v2 files of locomotion are downloaded"):
        load_offline_data("hopper-medium-v0")


def test_missing_dataset_exits_with_code_2_and_one_line(tmp_path, repo_root):
    script = (
        "import minari\n"
        "minari.download_dataset = lambda *a, **k: (_ for _ in ()).throw(ConnectionError('offline'))\n"
        "from common.data import load_offline_data\n"
        "from common.runtime import cli\n"
        "from dataclasses import dataclass\n"
        "@dataclass\nclass Args:\n    env: str = 'hopper-expert-v2'\n"
        "cli(lambda args: load_offline_data(args.env), Args)\n"
    )
    environment = dict(os.environ, D4RL_DATASET_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=environment, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dataset hopper-expert-v2 not found")


# ------------------------------------------------------------------------------------------------------------------
def test_model_transitions_and_windows_pad_at_episode_ends():
    data = toy_data(episode_lengths=(3, 2))  # transitions 0 1 2 | 3 4
    normalizer = Normalizer(np.zeros(2, np.float32), np.ones(2, np.float32))
    tensors = model_transitions(data, normalizer)
    np.testing.assert_array_equal(tensors["episode_first"].numpy(), [0, 0, 0, 3, 3])
    np.testing.assert_array_equal(tensors["episode_last"].numpy(), [2, 2, 2, 4, 4])
    cut = windows(tensors["observations"], torch.arange(5), 3, tensors["episode_last"])
    assert cut.shape == (5, 3, 2)
    np.testing.assert_array_equal(cut[:, :, 0].numpy(), [[0, 1, 2], [1, 2, 2], [2, 2, 2], [3, 4, 4], [4, 4, 4]])
    np.testing.assert_allclose(unscale_actions(data, tensors["actions"].numpy()), data.actions, rtol=1e-6)
    online = {key: getattr(data, key)[:2] for key in ("observations", "actions", "next_observations", "terminals")}
    online.update(rewards=data.rewards[:2] * 0 + 7.0, episode_ends=np.array([False, True]))
    grown = model_transitions(data, normalizer, online)
    scale, shift = iql_reward_affine(data)
    np.testing.assert_allclose(grown["rewards"][5:].numpy(), scale * 7.0 + shift, rtol=1e-6)
    np.testing.assert_array_equal(grown["episode_last"][5:].numpy(), [6, 6])


def test_normalizer_torch_and_state_dict():
    values = np.random.default_rng(0).normal(3.0, 2.0, (500, 2)).astype(np.float32)
    values[:, 1] = 5.0  # a constant dimension stays finite thanks to the std floor
    normalizer = Normalizer.from_array(values)
    assert normalizer.std[1] == pytest.approx(1e-3)
    restored = Normalizer.from_state_dict(normalizer.state_dict())
    tensor = torch.as_tensor(values, dtype=torch.float64)
    normalized = restored.normalize(tensor)
    assert isinstance(normalized, torch.Tensor) and normalized.dtype == torch.float64
    np.testing.assert_allclose(normalized.numpy(), normalizer.normalize(values), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored.unnormalize(normalized), tensor)


def test_iql_reward_convention():
    rewards = np.array([1.0, 2.0, 3.0, 0.5, 0.5], dtype=np.float32)  # episode returns 6 and 1
    np.testing.assert_allclose(iql_rewards(toy_data("locomotion", rewards=rewards)), rewards * 1000 / 5)
    np.testing.assert_allclose(iql_rewards(toy_data("antmaze", rewards=rewards)), rewards - 1)
    np.testing.assert_allclose(iql_rewards(toy_data("nav1d", rewards=rewards)), rewards)


# ------------------------------------------------------------------------------------------------------------------
def test_eval_seeds_differ_per_episode_and_follow_the_run_seed():
    seeds = [eval_seed(0, episode) for episode in range(50)]
    assert len(set(seeds)) == 50
    assert [eval_seed(0, episode) for episode in range(50)] == seeds
    assert len(set(seeds) & {eval_seed(1, episode) for episode in range(50)}) == 0


def test_evaluate_runs_in_lockstep_with_seeded_episodes(nav1d_full):
    class Greedy:
        def __init__(self):
            self.batch_sizes = []

        def reset(self, num_envs):
            self.num_envs = num_envs

        def __call__(self, observations, env_ids):
            self.batch_sizes.append(len(env_ids))
            steps = np.rint(observations[:, 1] * nav1d.HORIZON)
            return torch.as_tensor(nav1d.greedy_action(observations[:, 0], steps)[:, None])

    policy = Greedy()
    result = evaluate(policy, nav1d_full.make_env, episodes=6, seed=3)
    assert policy.num_envs == 6 and policy.batch_sizes == [6] * nav1d.HORIZON
    assert list(result.lengths) == [8] * 6 and result.terminated.all()
    starts = [episode[0, 0] for episode in result.observations]
    assert len(set(starts)) == 6
    assert [episode[0, 0] for episode in evaluate(policy, nav1d_full.make_env, 6, seed=3).observations] == starts
    assert set(starts).isdisjoint(episode[0, 0] for episode in evaluate(policy, nav1d_full.make_env, 6, 4).observations)
    assert result.returns.mean() > 6.0
    positions = np.stack([episode[:, 0] for episode in result.observations])
    actions = np.stack([episode[:, 0] for episode in result.actions])
    assert nav1d.plan_coherency(positions[:, :-1], actions, positions[:, 1:]) == pytest.approx(1.0, abs=1e-5)
    assert result.seconds > 0 and result.actions_per_s == pytest.approx(48 / result.seconds)


def test_dict_observations_flatten_the_same_way_for_data_and_env():
    box = lambda n: gym.spaces.Box(-np.inf, np.inf, (n,), np.float64)  # noqa: E731
    antmaze = gym.spaces.Dict({"achieved_goal": box(2), "desired_goal": box(2), "observation": box(27)})
    kitchen = gym.spaces.Dict({"achieved_goal": gym.spaces.Dict({"kettle": box(7)}),
                               "desired_goal": gym.spaces.Dict({"kettle": box(7)}), "observation": box(59)})
    assert observation_keys(antmaze) == [("observation",), ("desired_goal",)]
    assert observation_keys(kitchen) == [("observation",)]
    sequence = {"achieved_goal": np.zeros((5, 2)), "desired_goal": np.full((5, 2), 7.0),
                "observation": np.ones((5, 27))}
    flat = flatten_observation(antmaze, sequence)
    assert flat.shape == (5, 29) and flat.dtype == np.float32 and np.all(flat[:, 27:] == 7.0)

    class GoalEnv(gym.Env):
        observation_space = antmaze
        action_space = gym.spaces.Box(-1, 1, (8,), np.float32)

        def reset(self, *, seed=None, options=None):
            return {key: value[0] for key, value in sequence.items()}, {}

    env = FlatObservation(GoalEnv())
    assert env.observation_space.shape == (29,)
    np.testing.assert_array_equal(env.reset()[0], flat[0])


def test_readme_install_has_the_client_that_minari_downloads_need(monkeypatch):
    """minari fetches datasets from its default Hugging Face remote; without minari's `hf` extra in
    requirements.txt every download fails before it starts."""
    from minari.storage.remotes import DEFAULT_REMOTE, get_cloud_storage
    monkeypatch.delenv("MINARI_REMOTE", raising=False)
    storage = get_cloud_storage()  # raises ImportError naming the missing extra
    assert DEFAULT_REMOTE.startswith("hf://") and type(storage).__name__ == "HuggingFaceStorage"
