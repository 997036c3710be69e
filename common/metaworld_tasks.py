"""MetaWorld tasks of the alignment paper's Table 2, with offline datasets made from MetaWorld's scripted policies.

`--env metaworld/<task>/<quality>-v0`, task one of TASKS (the MetaWorld v3 environments `<task>-v3`), quality:
- expert: the task's scripted policy;
- medium: the scripted policy with Gaussian action noise, each step replaced by a uniform-random action with the
  task's MEDIUM_RANDOM_PROBABILITY, chosen so that roughly a third to a half of the episodes succeed;
- replay: a mix from random to expert: episode i takes the random action with probability 1 - i / (episodes - 1).
Each episode runs MetaWorld's fixed 500 steps on one of the task's 50 MT1 goal and object placements (MT1 seed
MT1_SEED), drawn per episode; observations are MetaWorld's 39-d states, rewards the environment's, and the success
flag is kept per step (episode infos). The datasets are made deterministically (DATASET_SEED) on first use, stored as
local Minari datasets (like Nav1D's), and their reference returns are the random policy's (min) and the scripted
policy's (max) mean returns over REFERENCE_EPISODES placements of the task, the same for every quality. Evaluation
draws the placement from the episode's seed.
"""
from __future__ import annotations

import re
import warnings

import gymnasium as gym
import minari
import numpy as np
from minari.data_collector import EpisodeBuffer

from common.data import make_local_dataset
from common.runtime import UserError

TASKS = ("button-press", "drawer-open", "sweep-into", "plate-slide")
QUALITIES = ("expert", "medium", "replay")
MT1_SEED = 0  # the 50 goal/object placements of every task come from MetaWorld's MT1 with this seed
DATASET_SEED = 20250  # generation seed; each task and quality draws from its own stream of it
DATASET_EPISODES = 100  # 50,000 transitions per dataset
REFERENCE_EPISODES = 20  # episodes of the random and of the scripted policy behind a task's reference returns
MEDIUM_NOISE = 0.3  # std of the medium data's Gaussian action noise
# chance that a medium-data step takes a uniform-random action instead, per task: from 30-episode probes (button-press
# 0.78 / 0.81 -> 50% / 23% success, drawer-open 0.76 / 0.79 -> 47% / 30%, sweep-into 0.76 / 0.80 -> 53% / 67%,
# plate-slide 0.79 / 0.82 -> 47% / 33%); the made datasets' rates are in their descriptions and the README
MEDIUM_RANDOM_PROBABILITY = {"button-press": 0.78, "drawer-open": 0.76, "sweep-into": 0.78, "plate-slide": 0.79}
INSTALL = "pip install metaworld==3.1.1 (requirements.txt pins it)"


class MetaWorldError(UserError):
    """An unknown MetaWorld task or quality, or MetaWorld not installed; the message is one line."""


def env_id(task: str) -> str:
    """The Gymnasium id under which MetaWorldTask(task) is registered (the datasets' evaluation env)."""
    return f"metaworld/{task}-v3"


def parse_name(name: str) -> tuple[str, str] | None:
    """(task, quality) of `metaworld/<task>/<quality>-v0`, None for other names; MetaWorldError for a MetaWorld name
    with an unknown task or quality."""
    match = re.fullmatch(r"metaworld/([\w-]+)/([\w-]+)-v0", name)
    if match is None:
        return None
    task, quality = match.groups()
    if task not in TASKS:
        raise MetaWorldError(f"unknown MetaWorld task {task!r} in {name}; the tasks are {', '.join(TASKS)}")
    if quality not in QUALITIES:
        raise MetaWorldError(f"unknown MetaWorld data quality {quality!r} in {name}; the qualities are "
                             f"{', '.join(QUALITIES)}")
    return task, quality


def _metaworld():
    try:
        import metaworld
        import metaworld.policies
    except ImportError:
        raise MetaWorldError(f"MetaWorld is not installed: {INSTALL}") from None
    return metaworld


class MetaWorldTask(gym.Env):
    """One MetaWorld v3 task whose goal and object placement is drawn from its 50 MT1 placements by the reset seed.
    `info["success"]` is MetaWorld's success flag; episodes are truncated after MetaWorld's 500 steps."""

    metadata = {"render_modes": []}

    def __init__(self, task: str):
        metaworld = _metaworld()
        name = f"{task}-v3"
        benchmark = metaworld.MT1(name, seed=MT1_SEED)
        self.task = task
        self.placements = benchmark.train_tasks
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning)
            self.sim = benchmark.train_classes[name]()
        self.sim.set_task(self.placements[0])
        self.max_steps = self.sim.max_path_length
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, self.sim.observation_space.shape, np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, self.sim.action_space.shape, np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.placement = int(self.np_random.integers(len(self.placements)))
        self.sim.set_task(self.placements[self.placement])
        observation, info = self.sim.reset()
        return observation.astype(np.float32), info

    def step(self, action):
        observation, reward, terminated, truncated, info = self.sim.step(np.asarray(action, dtype=np.float32))
        return observation.astype(np.float32), float(reward), bool(terminated), bool(truncated), info

    def close(self):
        self.sim.close()


for _task in TASKS:
    gym.register(id=env_id(_task), entry_point="common.metaworld_tasks:MetaWorldTask", kwargs={"task": _task})


def scripted_policy(task: str):
    """MetaWorld's scripted expert of a task: `policy.get_action(observation)`."""
    policies = _metaworld().policies
    class_name = "Sawyer" + "".join(part.capitalize() for part in task.split("-")) + "V3Policy"
    return getattr(policies, class_name)()


def dataset_id(task: str, quality: str) -> str:
    return f"metaworld/{task}/{quality}-v0"


def random_action_probabilities(task: str, quality: str, episodes: int) -> np.ndarray:
    """Per episode, the probability that a step takes a uniform-random action instead of the scripted one."""
    if quality == "expert":
        return np.zeros(episodes)
    if quality == "medium":
        return np.full(episodes, MEDIUM_RANDOM_PROBABILITY[task])
    return 1.0 - np.arange(episodes) / max(episodes - 1, 1)


def rollout(env: MetaWorldTask, policy, random_probability: float, noise: float, seed: int,
            rng: np.random.Generator, episode: int = 0) -> EpisodeBuffer:
    """One full episode of the scripted policy, perturbed as the quality says, as a Minari episode buffer (its
    success infos start with the reset's, like its observations)."""
    observation, _ = env.reset(seed=seed)
    observations, actions, rewards, successes = [observation], [], [], [False]
    truncated = terminated = False
    while not (terminated or truncated):
        if rng.random() < random_probability:
            action = rng.uniform(-1.0, 1.0, env.action_space.shape)
        else:
            action = policy.get_action(observation) + noise * rng.standard_normal(env.action_space.shape)
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        observation, reward, terminated, truncated, info = env.step(action)
        observations.append(observation)
        actions.append(action)
        rewards.append(reward)
        successes.append(bool(info["success"]))
    steps = len(actions)
    return EpisodeBuffer(id=episode, seed=seed, observations=np.stack(observations), actions=np.stack(actions),
                         rewards=np.asarray(rewards, dtype=np.float64),
                         terminations=np.zeros(steps, dtype=bool), truncations=np.arange(steps) == steps - 1,
                         infos={"success": np.asarray(successes)})


def make_dataset(task: str, quality: str, episodes: int = DATASET_EPISODES) -> minari.MinariDataset:
    """Load the local Minari dataset metaworld/<task>/<quality>-v0, making it first if it is missing (about a second
    per episode on one CPU core). Its content is a function of DATASET_SEED, the task, the quality and `episodes`."""
    _metaworld()  # its evaluation needs MetaWorld too: say so before anything is trained
    name = dataset_id(task, quality)
    return make_local_dataset(name, f"the MetaWorld dataset {name} being made",
                              lambda: _create_dataset(task, quality, episodes, name))


def _create_dataset(task: str, quality: str, episodes: int, name: str) -> minari.MinariDataset:
    env = MetaWorldTask(task)
    policy = scripted_policy(task)
    rng = np.random.default_rng([DATASET_SEED, TASKS.index(task), QUALITIES.index(quality)])
    noise = MEDIUM_NOISE if quality == "medium" else 0.0
    seeds = rng.integers(2**31, size=episodes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant.*too high")  # the scripted policies' gains, by design
        buffers = [rollout(env, policy, probability, noise, int(seed), rng, episode) for episode, (probability, seed)
                   in enumerate(zip(random_action_probabilities(task, quality, episodes), seeds))]
    # reference returns of the task, the same for every quality: uniform-random actions and the noiseless scripted
    # policy on placements of their own (fewer episodes only for datasets smaller than that, as in the tests)
    reference_rng = np.random.default_rng([DATASET_SEED, TASKS.index(task), len(QUALITIES)])
    reference_seeds = reference_rng.integers(2**31, size=min(REFERENCE_EPISODES, episodes))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Constant.*too high")
        references = {probability: np.mean([sum(rollout(env, policy, probability, 0.0, int(seed), reference_rng).rewards)
                                            for seed in reference_seeds]) for probability in (1.0, 0.0)}
    env.close()
    success = np.mean([buffer.infos["success"].any() for buffer in buffers])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(code_permalink|author_email).*")
        return minari.create_dataset_from_buffers(
            dataset_id=name, buffer=buffers, env=env_id(task), eval_env=env_id(task),
            algorithm_name=f"metaworld-scripted-{quality}", author="common/metaworld_tasks.py",
            description=f"MetaWorld {task}-v3, {quality}: {episodes} episodes of {env.max_steps} steps by the scripted "
                        f"policy (random-action probability {random_action_probabilities(task, quality, episodes).mean():.2f} "
                        f"on average, action noise {noise}); {success:.0%} of the episodes succeed; seed "
                        f"{DATASET_SEED}. Reference returns: uniform-random actions (min), scripted policy (max).",
            ref_min_score=float(references[1.0]), ref_max_score=float(references[0.0]),
        )


def success_rate(dataset: minari.MinariDataset) -> float:
    """The fraction of a MetaWorld dataset's episodes in which the success flag is ever set."""
    return float(np.mean([episode.infos["success"].any() for episode in dataset.iterate_episodes()]))
