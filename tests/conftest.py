"""Test setup: every Minari dataset in a per-session temporary folder (pytest.ini puts the repository root on the
import path)."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The files that take longest (minutes each on 2 cores), started first so that pytest-xdist's workers, which take
# whole files in collection order (pytest.ini), end together instead of one running a long file alone at the end.
LONGEST_FILES = ("test_learning.py", "test_robustness.py", "test_sweep.py", "test_diffuser_align.py",
                 "test_dp_align.py", "test_eda.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FILES.index(name) if name in LONGEST_FILES else len(LONGEST_FILES)

    items.sort(key=rank)  # stable: the order inside a file stays


@pytest.fixture(scope="session", autouse=True)
def minari_datasets_path(tmp_path_factory):
    """Keep datasets made by the tests out of ~/.minari and share them across the session."""
    path = tmp_path_factory.mktemp("minari")
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = previous


@pytest.fixture(scope="session", autouse=True)
def robot_dataset_dirs(tmp_path_factory):
    """Robomimic files and PushT buffers made by the tests go to per-session folders, not ~/robomimic or ~/pusht."""
    variables = {"ROBOMIMIC_DATASET_DIR": "robomimic", "PUSHT_DATASET_DIR": "pusht"}
    previous = {variable: os.environ.get(variable) for variable in variables}
    for variable, folder in variables.items():
        os.environ[variable] = str(tmp_path_factory.mktemp(folder))
    yield
    for variable, value in previous.items():
        if value is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = value


@pytest.fixture(scope="session", autouse=True)
def no_dataset_downloads_from_the_internet():
    """D4RL files are fetched only from servers a test starts on 127.0.0.1: by default from a port where nothing
    listens (connections are refused at once), so a missing file is an error, never a download."""
    previous = os.environ.get("D4RL_MIRROR")
    os.environ["D4RL_MIRROR"] = "http://127.0.0.1:9/"
    yield
    if previous is None:
        os.environ.pop("D4RL_MIRROR", None)
    else:
        os.environ["D4RL_MIRROR"] = previous


@pytest.fixture(scope="module")
def single_thread():
    """For modules of many small tensor ops: extra threads only contend on the shared 2-core test machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def repo_root():
    return REPO_ROOT


def make_tiny_hopper_dataset(dataset_id: str, episodes: int = 10, steps: int = 30, seed: int = 0):
    """A small Minari dataset of random Hopper-v5 episodes (time-limited ones end as truncations).

    Made in the test's MINARI_DATASETS_PATH, so the real loading code path runs without any download.
    """
    import warnings

    import gymnasium as gym
    import minari
    import numpy as np
    from minari.data_collector import EpisodeBuffer

    if dataset_id in minari.list_local_datasets():
        return minari.load_dataset(dataset_id)
    env = gym.make("Hopper-v5")
    rng = np.random.default_rng(seed)
    buffers = []
    for episode in range(episodes):
        observation, _ = env.reset(seed=seed * 1000 + episode)
        observations, actions, rewards, terminations, truncations = [observation], [], [], [], []
        for step in range(steps):
            action = rng.uniform(-1, 1, 3).astype(np.float32)
            observation, step_reward, terminated, _, _ = env.step(action)
            observations.append(observation)
            actions.append(action)
            rewards.append(step_reward)
            terminations.append(terminated)
            truncations.append(step == steps - 1 and not terminated)
            if terminated:
                break
        buffers.append(EpisodeBuffer(id=episode, observations=np.stack(observations), actions=np.stack(actions),
                                     rewards=np.array(rewards), terminations=np.array(terminations),
                                     truncations=np.array(truncations)))
    env.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return minari.create_dataset_from_buffers(dataset_id, buffers, env="Hopper-v5", algorithm_name="random")


def alignment_stages(options: list[str]) -> list[str]:
    """The stages of one pass: the --align methods, the cascade followed by its --cascade-align methods (rl)."""
    cascade_align = options[options.index("--cascade-align") + 1] if "--cascade-align" in options else "rl"
    return [stage for method in options[options.index("--align") + 1].split(",")
            for stage in [method] + ([f"cascade/{m}" for m in cascade_align.split(",") if m]
                                     if method == "cascade" else [])]
