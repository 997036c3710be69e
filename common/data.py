"""Offline datasets and evaluation shared by every script: what `--env NAME` means and how policies are scored.

Name resolution, first match wins:
1. Nav1D: `nav1d-partial|full|expert` (or `nav1d/<kind>-v0`): local Minari datasets made by `nav1d.make_dataset`;
   MetaWorld: `metaworld/<task>/<expert|medium|replay>-v0`, local Minari datasets made from MetaWorld's scripted
   policies by `metaworld_tasks.make_dataset`.
   Robomimic: `robomimic/<task>/<ph|mh|mg>` (robomimic's low-dim HDF5 files, evaluated on robosuite),
   `robomimic/<lift|can>/scripted-ph|scripted-mh` (made locally in that format), or a path to such a file: see
   `robomimic_tasks`. PushT: `pusht/dp` (Diffusion Policy's zarr replay buffer), `pusht/scripted` (made locally in
   that layout), a path to a `.zarr` buffer, `lerobot/pusht_keypoints` or a LeRobot dataset folder: see `pusht_tasks`.
2. D4RL-style names:
   - locomotion `hopper|halfcheetah|walker2d-<quality>-v<N>` (quality random, medium, expert, medium-replay,
     medium-expert, full-replay) and adroit `pen|door|hammer|relocate-<human|cloned|expert>-v<N>`: the raw D4RL
     HDF5 file, read with h5py, evaluated on the Gymnasium env (Hopper-v5, HalfCheetah-v5, Walker2d-v5; adroit:
     Gymnasium-Robotics AdroitHand<Task>-v1 with D4RL's rewards, episode lengths and pen-drop termination). Looked
     for in $D4RL_DATASET_DIR (if set) and then ~/.d4rl/datasets/, under the name d4rl itself stores it (the URL's
     file name, e.g. hopper_medium_replay-v2.hdf5, door-human-v1.hdf5) or under `<name>.hdf5`. A missing locomotion
     -v2 or adroit -v1 file is downloaded into the first of those folders (common.download: resumable, checked) from
     the official server, then the public mirror, or from the prefixes in $D4RL_MIRROR. If that fails the name is
     an error: it never loads other data in its place.
   - antmaze and kitchen names (`antmaze-umaze-v2`, `kitchen-mixed-v0`) are refused with an error naming their Minari
     re-collections (D4RL/antmaze/<task>-v1, D4RL/kitchen/<task>-v2): the raw files were recorded in d4rl's
     mujoco-py environments, whose observation layout no Gymnasium environment reproduces.
3. Anything else is taken as a Minari dataset id (`mujoco/hopper/medium-v0`, `D4RL/antmaze/umaze-v1`, ...).
A Minari dataset missing from disk is downloaded once with `minari.download_dataset` (ids with a namespace only: the
server has no others); if that fails the loader raises DatasetError with one line naming the dataset, where it
looked, and the command that gets it.

Conventions: observations are flat float32 vectors (dict observations are flattened the same way for the data and
for the evaluation env: `observation` + `desired_goal` when the goal is a Box (antmaze), `observation` alone when
it is not (kitchen), every Box leaf in key order otherwise). `terminals` marks true terminations only;
`episode_ends` marks the last transition of every episode (termination, time-out or end of the data).
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gymnasium as gym
import h5py
import minari
import numpy as np
import torch
from minari.dataset.minari_storage import is_image_space

from common.download import DownloadError, download
from common.runtime import ExclusiveLock, UserError


class DatasetError(UserError):
    """A dataset that cannot be found or read; the message is one line that says what to do."""


LOCOMOTION_ENVS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}
D4RL_REFERENCE_RETURNS = {  # (random, expert) returns of D4RL's normalised score
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.8331017826877),
    "door": (-56.512833, 2880.5693087298737),
    "hammer": (-274.856578, 12794.134825156867),
    "relocate": (-6.425911, 4233.877797728884),
}
LOCOMOTION_QUALITIES = ("random", "medium", "expert", "medium-replay", "medium-expert", "full-replay")
MINARI_MUJOCO_QUALITIES = ("medium", "expert")  # D4RL qualities with a Minari mujoco/<env>/<quality>-v0 namesake
ANTMAZE_TASKS = ("umaze", "umaze-diverse", "medium-play", "medium-diverse", "large-play", "large-diverse")
KITCHEN_TASKS = ("complete", "partial", "mixed")
KITCHEN_DEFAULT_TASKS = ("microwave", "kettle", "light switch", "slide cabinet")  # FrankaKitchen-v1's default
ADROIT_TASKS = ("pen", "hammer", "door", "relocate")
ADROIT_KINDS = ("human", "cloned", "expert")
ADROIT_ENVS = {task: f"AdroitHand{task.capitalize()}-v1" for task in ADROIT_TASKS}  # Gymnasium-Robotics
ADROIT_HORIZONS = {"pen": 100, "door": 200, "hammer": 200, "relocate": 200}  # D4RL's -v1 evaluation episode lengths
D4RL_SERVER = "http://rail.eecs.berkeley.edu/datasets/offline_rl/"  # the official source of the raw files
D4RL_PUBLIC_MIRROR = "https://huggingface.co/datasets/imone/D4RL/resolve/main/"  # the same files, in one folder
D4RL_MIRROR_VARIABLE = "D4RL_MIRROR"  # URL prefixes (space-separated) tried in order instead of the two above
D4RL_REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")
MINARI_GET = "minari download"  # the README install has minari's hf extra, which downloads need
EVAL_SEED_STREAM = 0xE7A1  # separates evaluation seeds from every other use of the run seed


# ------------------------------------------------------------------------------------------------------------------
# Loaded data
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class OfflineData:
    """A whole offline dataset as flat transition arrays in episode order, plus how to evaluate on it."""

    name: str  # what the user passed to --env
    source: str  # where it came from, e.g. "minari:nav1d/full-v0" or "d4rl-hdf5:/root/.d4rl/datasets/x.hdf5"
    family: str  # nav1d, metaworld, robomimic, pusht, locomotion, antmaze, kitchen, adroit or other
    observations: np.ndarray  # (N, S) float32
    actions: np.ndarray  # (N, A) float32
    rewards: np.ndarray  # (N,) float32
    next_observations: np.ndarray  # (N, S) float32
    terminals: np.ndarray  # (N,) bool, true terminations only
    episode_ends: np.ndarray  # (N,) bool, last transition of each episode
    ref_min_score: float  # return of normalised score 0 (nan when the dataset has none)
    ref_max_score: float  # return of normalised score 100
    make_env: Callable[[], gym.Env] = field(repr=False)  # evaluation env, observations flattened like the data
    action_low: np.ndarray = field(repr=False)
    action_high: np.ndarray = field(repr=False)
    last_episode_finished: bool = True  # False when a file ends in the middle of an episode (no terminal/time-out)

    def __len__(self) -> int:
        return len(self.rewards)

    @property
    def observation_dim(self) -> int:
        return self.observations.shape[1]

    @property
    def action_dim(self) -> int:
        return self.actions.shape[1]

    def episode_slices(self) -> list[slice]:
        ends = np.flatnonzero(self.episode_ends) + 1
        starts = np.concatenate([[0], ends[:-1]])
        return [slice(int(start), int(end)) for start, end in zip(starts, ends)]

    def episode_returns(self, finished_only: bool = False) -> np.ndarray:
        """Undiscounted return of every episode, in order; without the last one when it was cut off by the end of
        the data and `finished_only`."""
        ends = np.flatnonzero(self.episode_ends) + 1
        returns = np.add.reduceat(self.rewards.astype(np.float64), np.concatenate([[0], ends[:-1]]))
        return returns[:-1] if finished_only and not self.last_episode_finished and len(returns) > 1 else returns


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def check_transitions(name: str, source: str, arrays: dict[str, np.ndarray]) -> None:
    """Consistent lengths and finite numbers; anything else is a damaged file, reported in one line."""
    count = len(arrays["rewards"])
    if count == 0:
        raise DatasetError(f"dataset {name} ({source}) holds no transitions")
    for key, values in arrays.items():
        if len(values) != count:
            raise DatasetError(
                f"dataset {name} ({source}) is malformed: {key} has {len(values)} entries, rewards has {count}"
            )
    for key in ("observations", "next_observations", "actions", "rewards"):
        finite = np.isfinite(arrays[key]).reshape(count, -1).all(axis=1)
        if not finite.all():
            first = int(np.flatnonzero(~finite)[0])
            raise DatasetError(
                f"dataset {name} ({source}) has non-finite {key} (first at transition {first} of {count}); "
                "the file is damaged: delete it and get it again"
            )


# ------------------------------------------------------------------------------------------------------------------
# Dict observations
# ------------------------------------------------------------------------------------------------------------------
def observation_keys(space: gym.Space) -> list[tuple[str, ...]]:
    """Paths of the Box leaves that make up the flat observation (see the module docstring for the rule)."""
    if isinstance(space, gym.spaces.Box):
        return [()]
    if isinstance(space, gym.spaces.Dict):
        if "observation" in space.spaces:
            keys = [("observation",) + path for path in observation_keys(space["observation"])]
            goal = space.spaces.get("desired_goal")
            if isinstance(goal, gym.spaces.Box):
                keys.append(("desired_goal",))
            return keys
        return [(key,) + path for key, sub in space.spaces.items() for path in observation_keys(sub)]
    raise DatasetError(f"observation space {space} is not supported (only Box and Dict of Box observations)")


def _leaf(space: gym.Space, path: tuple[str, ...]) -> gym.spaces.Box:
    for key in path:
        space = space[key]
    return space


def flatten_observation(space: gym.Space, observations: Any) -> np.ndarray:
    """Flatten one observation or a batch/sequence of them (leading dims kept) to float32 (..., S)."""
    parts = []
    for path in observation_keys(space):
        value = observations
        for key in path:
            value = value[key]
        value = np.asarray(value, dtype=np.float32)
        leaf_ndim = len(_leaf(space, path).shape)
        parts.append(value.reshape(value.shape[: value.ndim - leaf_ndim] + (-1,)))
    return np.concatenate(parts, axis=-1)


class FlatObservation(gym.ObservationWrapper):
    """Gives an env with dict observations the flat observations the data has."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._source_space = env.observation_space
        leaves = [_leaf(self._source_space, path) for path in observation_keys(self._source_space)]
        low = np.concatenate([np.broadcast_to(leaf.low, leaf.shape).reshape(-1) for leaf in leaves])
        high = np.concatenate([np.broadcast_to(leaf.high, leaf.shape).reshape(-1) for leaf in leaves])
        self.observation_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

    def observation(self, observation):
        return flatten_observation(self._source_space, observation)


def _flat_env(env: gym.Env) -> gym.Env:
    return env if isinstance(env.observation_space, gym.spaces.Box) else FlatObservation(env)


# ------------------------------------------------------------------------------------------------------------------
# Minari datasets
# ------------------------------------------------------------------------------------------------------------------
def _family_of(dataset_id: str, env_id: str) -> tuple[str, str | None]:
    """(family, locomotion env key or None) from the Minari id and the evaluation env id."""
    if dataset_id.startswith("nav1d/"):
        return "nav1d", None
    if dataset_id.startswith("metaworld/"):
        return "metaworld", None
    env_lower = env_id.lower()
    for key in LOCOMOTION_ENVS:
        if env_lower.startswith(key):
            return "locomotion", key
    text = f"{dataset_id} {env_id}".lower()
    for family in ("antmaze", "kitchen", "adroit"):
        if family in text:
            return family, None
    parts = dataset_id.split("/")
    if len(parts) == 3 and parts[0] == "D4RL" and parts[1] in ADROIT_TASKS:
        return "adroit", None
    return "other", None


def _eval_env_kwargs(dataset: minari.MinariDataset) -> dict:
    """The keyword arguments of the dataset's evaluation env as recorded in its metadata ({} if none)."""
    eval_spec = dataset.storage.metadata.get("eval_env_spec") or dataset.env_spec
    if eval_spec is None:
        return {}
    return dict(json.loads(eval_spec).get("kwargs", {}) if isinstance(eval_spec, str) else eval_spec.kwargs)


class KitchenSubtasks(gym.Wrapper):
    """FrankaKitchen with info["success"] once every sub-task of the episode is done. Its reward is the number of
    sub-tasks completed at that step, each counted once, so the return counts the completed sub-tasks and the
    normalised score (references 0 and the number of sub-tasks) is the percent completed: the alignment paper's
    relay-kitchen metric."""

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        done = len(info["episode_task_completions"]) == len(self.env.unwrapped.goal)
        return observation, reward, terminated, truncated, info | {"success": done}


def _minari_env_id(dataset: minari.MinariDataset) -> str:
    eval_spec = dataset.storage.metadata.get("eval_env_spec")
    if eval_spec:
        return json.loads(eval_spec)["id"] if isinstance(eval_spec, str) else eval_spec.id
    return dataset.env_spec.id if dataset.env_spec is not None else ""


def _read_hdf5_episodes(path: Path, episode_indices: np.ndarray):
    """Minari's HDF5 episodes with plain Box spaces, read through h5py's low-level API: twice as fast as
    storage.get_episodes, whose per-dataset overhead dominates for datasets of many short episodes (Nav1D)."""
    keys = ("observations", "actions", "rewards", "terminations")
    with h5py.File(path, "r") as file:
        for index in episode_indices:
            episode = {"id": int(index)}
            for key in keys:
                stored = h5py.h5d.open(file.id, f"episode_{index}/{key}".encode())
                episode[key] = np.empty(stored.shape, dtype=stored.dtype)
                stored.read(h5py.h5s.ALL, h5py.h5s.ALL, episode[key])
            yield episode


def _minari_arrays(dataset: minari.MinariDataset) -> dict[str, np.ndarray]:
    """Concatenate every episode of a Minari dataset into transition arrays (one pass over the file)."""
    space = dataset.observation_space
    columns: dict[str, list[np.ndarray]] = {key: [] for key in
                                            ("observations", "next_observations", "actions", "rewards", "terminals",
                                             "episode_ends")}
    hdf5_file = Path(dataset.spec.data_path) / "main_data.hdf5"
    plain_boxes = (isinstance(space, gym.spaces.Box) and isinstance(dataset.action_space, gym.spaces.Box)
                   and not is_image_space(space))  # image observations may be stored JPEG-encoded
    episodes = (_read_hdf5_episodes(hdf5_file, dataset.episode_indices) if plain_boxes and hdf5_file.is_file()
                else dataset.storage.get_episodes(dataset.episode_indices))
    for episode in episodes:
        steps = len(episode["rewards"])
        if steps == 0:
            continue
        observations = flatten_observation(space, episode["observations"])
        if len(observations) != steps + 1:
            raise ValueError(f"episode {episode['id']} has {len(observations)} observations for {steps} steps")
        columns["observations"].append(observations[:-1])
        columns["next_observations"].append(observations[1:])
        columns["actions"].append(np.asarray(episode["actions"], dtype=np.float32).reshape(steps, -1))
        columns["rewards"].append(np.asarray(episode["rewards"], dtype=np.float32).reshape(steps))
        columns["terminals"].append(np.asarray(episode["terminations"], dtype=bool).reshape(steps))
        ends = np.zeros(steps, dtype=bool)
        ends[-1] = True
        columns["episode_ends"].append(ends)
    if not columns["rewards"]:
        raise ValueError("no episode with at least one step")
    return {key: np.concatenate(values) for key, values in columns.items()}


def _find_minari(dataset_id: str) -> tuple[minari.MinariDataset | None, str]:
    """The local Minari dataset, downloading it once if missing; (None, why) when neither works."""
    where = minari.storage.get_dataset_path(dataset_id)
    if not (where / "data").exists():
        if "/" not in dataset_id:  # every id on Farama's server has a namespace: asking it would only cost time
            return None, f"not in {where}, and ids on the Minari server have a namespace (D4RL/door/human-v2)"
        try:
            minari.download_dataset(dataset_id)
        except Exception as error:  # no network, no minari[hf], unknown id: all mean "not available"
            return None, (f"not in {where} and the download failed ({_one_line(error)}); get it with: "
                          f"{MINARI_GET} {dataset_id}")
    try:
        return minari.load_dataset(dataset_id), ""
    except Exception as error:
        raise DatasetError(
            f"cannot read Minari dataset {dataset_id} at {where} ({_one_line(error)}); delete that folder and get "
            f"it again: {MINARI_GET} {dataset_id}"
        ) from None


def _from_minari(name: str, dataset: minari.MinariDataset, family_hint: tuple[str, str | None] | None = None
                 ) -> OfflineData:
    dataset_id = dataset.spec.dataset_id
    source = f"minari:{dataset_id}"
    if not isinstance(dataset.action_space, gym.spaces.Box):
        raise DatasetError(f"dataset {name} ({source}) has action space {dataset.action_space}; only Box is supported")
    try:
        arrays = _minari_arrays(dataset)
    except DatasetError:
        raise
    except Exception as error:
        raise DatasetError(
            f"dataset {name} ({source}) at {dataset.spec.data_path} cannot be read ({_one_line(error)}); delete it "
            f"and get it again"
        ) from None
    check_transitions(name, source, arrays)
    family, locomotion = family_hint or _family_of(dataset_id, _minari_env_id(dataset))
    metadata = dataset.storage.metadata
    if locomotion is not None:
        ref_min, ref_max = D4RL_REFERENCE_RETURNS[locomotion]
    elif family == "kitchen":  # the return counts the sub-tasks done: normalised, the percent of them (KitchenSubtasks)
        ref_min, ref_max = 0.0, float(len(_eval_env_kwargs(dataset).get("tasks_to_complete", KITCHEN_DEFAULT_TASKS)))
    elif "ref_min_score" in metadata and "ref_max_score" in metadata:
        ref_min, ref_max = float(metadata["ref_min_score"]), float(metadata["ref_max_score"])
    else:
        print(f"note: dataset {dataset_id} has no reference returns; normalised scores will be nan")
        ref_min = ref_max = float("nan")

    def make_env() -> gym.Env:
        if family == "nav1d":  # our own env, whatever entry point the dataset recorded when it was made
            from common import nav1d

            return gym.make(nav1d.ENV_ID)
        try:
            env = dataset.recover_environment(eval_env=True)
        except UserError:
            raise
        except Exception as error:
            raise DatasetError(
                f"cannot make the evaluation env of {dataset_id} ({_one_line(error)}); install the package that "
                f"provides it (antmaze, kitchen, adroit: pip install gymnasium-robotics)"
            ) from None
        return _flat_env(KitchenSubtasks(env) if family == "kitchen" else env)

    return OfflineData(
        name=name, source=source, family=family, **arrays, ref_min_score=ref_min, ref_max_score=ref_max,
        make_env=make_env, action_low=np.asarray(dataset.action_space.low, dtype=np.float32).reshape(-1),
        action_high=np.asarray(dataset.action_space.high, dtype=np.float32).reshape(-1),
    )


def make_local_dataset(name: str, what: str, create: Callable[[], minari.MinariDataset],
                       complete: Callable[[minari.MinariDataset], bool] = lambda dataset: True
                       ) -> minari.MinariDataset:
    """The local Minari dataset `name`, made by `create()` first when it is missing. One process makes it; others
    starting at the same time wait for it, then load what it made. A folder that cannot be read or is not
    `complete` (an interrupted creation) is deleted and made again: a made dataset is a function of its code."""
    path = minari.storage.get_dataset_path(name)
    dataset = _complete_local_dataset(name, complete)
    if dataset is not None:
        return dataset
    lock = ExclusiveLock(path.parent / f".{path.name}.lock", what, wait=True)
    try:
        dataset = _complete_local_dataset(name, complete)
        if dataset is not None:
            return dataset
        if path.exists():
            minari.delete_dataset(name)
        return create()
    finally:
        lock.release()


def _complete_local_dataset(name: str, complete: Callable[[minari.MinariDataset], bool]) -> minari.MinariDataset | None:
    if not (minari.storage.get_dataset_path(name) / "data").exists():
        return None
    try:
        dataset = minari.load_dataset(name)
    except Exception:  # unreadable leftovers of an interrupted creation: made again
        return None
    return dataset if complete(dataset) else None


# ------------------------------------------------------------------------------------------------------------------
# Raw D4RL HDF5 files
# ------------------------------------------------------------------------------------------------------------------
def d4rl_directories() -> list[Path]:
    """Where raw D4RL files are looked for: $D4RL_DATASET_DIR (if set), then ~/.d4rl/datasets."""
    directories = [Path(os.environ["D4RL_DATASET_DIR"]).expanduser()] if os.environ.get("D4RL_DATASET_DIR") else []
    return directories + [Path("~/.d4rl/datasets").expanduser()]


def d4rl_file_names(family: str, env: str, quality: str, version: str) -> list[str]:
    """d4rl's own file name (the URL's: hopper_medium_replay-v2.hdf5, door-human-v1.hdf5), then the D4RL name
    itself (hopper-medium-replay-v2.hdf5)."""
    plain = f"{env}-{quality}-v{version}.hdf5"
    return [f"{env}_{quality.replace('-', '_')}-v{version}.hdf5", plain] if family == "locomotion" else [plain]


def d4rl_file_path(family: str, env: str, quality: str, version: str) -> str | None:
    """Where a file lies under D4RL_SERVER (gym_mujoco_v2/hopper_medium_replay-v2.hdf5, hand_dapg_v1/pen-human-v1.hdf5);
    None for the versions this project does not download (older ones have other names on the server)."""
    if family == "locomotion" and version == "2":
        return f"gym_mujoco_v2/{d4rl_file_names(family, env, quality, version)[0]}"
    if family == "adroit" and version == "1":
        return f"hand_dapg_v1/{env}-{quality}-v1.hdf5"
    return None


def d4rl_urls(file_path: str) -> list[str]:
    """The sources of a raw D4RL file, in the order they are tried: $D4RL_MIRROR's prefixes when set, otherwise the
    official server, then the public mirror (which keeps every file in one folder)."""
    prefixes = os.environ.get(D4RL_MIRROR_VARIABLE, "").split()
    if prefixes:
        return [prefix.rstrip("/") + "/" + file_path for prefix in prefixes]
    return [D4RL_SERVER + file_path, D4RL_PUBLIC_MIRROR + Path(file_path).name]


def check_d4rl_file(path: Path) -> None:
    """ValueError unless `path` is an HDF5 file with the keys the loader needs, in rows of one length."""
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in D4RL_REQUIRED_KEYS if key not in file]
            if missing:
                raise ValueError(f"the file lacks the keys {', '.join(missing)}")
            rows = {key: file[key].shape[0] if file[key].shape else 0 for key in D4RL_REQUIRED_KEYS}
    except ValueError:
        raise
    except Exception as error:  # h5py's OSError for a file that is not HDF5 or is cut short
        raise ValueError(f"not a readable HDF5 file ({_one_line(error)})") from None
    if len(set(rows.values())) != 1 or rows["rewards"] < 2:
        raise ValueError(f"its arrays have {', '.join(f'{key} {count}' for key, count in rows.items())} rows")


def read_d4rl_hdf5(path: Path, name: str) -> tuple[dict[str, np.ndarray], bool]:
    """Transition arrays of a D4RL file (keys observations, actions, rewards, terminals, timeouts[, next_observations]).

    Episodes end at terminals or timeouts. Without next_observations the successor of step i is observation i+1,
    which is unknown for a time-out step (the next row starts a new episode): such steps are dropped, as d4rl's
    qlearning_dataset does, and the step before becomes the episode's last. Also returns whether the file's last
    episode finished (a terminal or time-out on its last row) rather than being cut off by the end of the file.
    """
    source = f"d4rl-hdf5:{path}"
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in D4RL_REQUIRED_KEYS if key not in file]
            if missing:
                raise DatasetError(f"dataset {name} ({source}) is malformed: missing keys {', '.join(missing)}")
            raw = {key: file[key][()] for key in D4RL_REQUIRED_KEYS + ("next_observations",) if key in file}
    except DatasetError:
        raise
    except Exception as error:  # truncated or not an HDF5 file
        raise DatasetError(
            f"cannot read D4RL file {path} ({_one_line(error)}); delete it and download it again"
        ) from None
    count = len(raw["rewards"])
    if count < 2:
        raise DatasetError(f"dataset {name} ({source}) has {count} rows; it is empty or damaged, delete it and "
                           f"download it again")
    if raw["observations"].ndim != 2 or raw["actions"].ndim != 2:
        raise DatasetError(f"dataset {name} ({source}) is malformed: observations and actions must be 2-d arrays")
    for key in ("observations", "actions", "terminals", "timeouts") + (
            ("next_observations",) if "next_observations" in raw else ()):
        if len(raw[key]) != count:
            raise DatasetError(
                f"dataset {name} ({source}) is malformed: {key} has {len(raw[key])} rows, rewards has {count}"
            )
    observations = raw["observations"].astype(np.float32)
    terminals = raw["terminals"].reshape(count).astype(bool)
    timeouts = raw["timeouts"].reshape(count).astype(bool) & ~terminals
    last_episode_finished = bool(terminals[-1] or timeouts[-1])
    episode_ends = terminals | timeouts
    episode_ends[-1] = True
    keep = np.ones(count, dtype=bool)
    if "next_observations" in raw:
        next_observations = raw["next_observations"].astype(np.float32)
    else:
        next_observations = np.concatenate([observations[1:], observations[-1:]])
        keep = ~timeouts
        keep[-1] = bool(terminals[-1])
        dropped = np.flatnonzero(~keep)
        episode_ends[dropped[dropped > 0] - 1] = True
    arrays = {
        "observations": observations,
        "next_observations": next_observations,
        "actions": raw["actions"].astype(np.float32),
        "rewards": raw["rewards"].reshape(count).astype(np.float32),
        "terminals": terminals,
        "episode_ends": episode_ends,
    }
    return {key: values[keep] for key, values in arrays.items()}, last_episode_finished


class D4RLAdroit(gym.Wrapper):
    """Gymnasium-Robotics' AdroitHand*-v1 scored as D4RL scored it, so that returns meet D4RL's reference scores:
    since gymnasium-robotics 1.2.1 door, hammer and relocate add +0.1 x the palm's distance to the handle, hammer
    or ball where D4RL subtracts it, and D4RL ends a pen episode when the pen falls below z = 0.075."""

    PALM_TARGET = {"door": ("grasp_site_id", "handle_site_id"), "hammer": ("S_grasp_site_id", "obj_body_id"),
                   "relocate": ("S_grasp_site_id", "obj_body_id")}  # (palm site, target site or body)

    def __init__(self, env: gym.Env, task: str):
        super().__init__(env)
        self.task = task

    def palm_distance(self) -> float:
        sim = self.env.unwrapped
        palm_site, target = self.PALM_TARGET[self.task]
        target_position = sim.data.site_xpos if target.endswith("site_id") else sim.data.xpos
        return float(np.linalg.norm(sim.data.site_xpos[getattr(sim, palm_site)] - target_position[getattr(sim, target)]))

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        if self.task == "pen":
            sim = self.env.unwrapped
            terminated = terminated or bool(sim.data.xpos[sim.obj_body_id][2] < 0.075)
        else:
            reward = float(reward) - 0.2 * self.palm_distance()
        return observation, reward, terminated, truncated, info


def make_adroit_env(task: str) -> gym.Env:
    """D4RL's adroit task on Gymnasium-Robotics, with D4RL's episode length, rewards and termination."""
    try:
        import gymnasium_robotics
    except ImportError:
        raise DatasetError(f"the adroit {task} environment needs Gymnasium-Robotics: pip install "
                           f"gymnasium-robotics (requirements.txt pins it)") from None
    gym.register_envs(gymnasium_robotics)
    return D4RLAdroit(gym.make(ADROIT_ENVS[task], max_episode_steps=ADROIT_HORIZONS[task]), task)


def _from_d4rl_file(name: str, path: Path, family: str, env: str) -> OfflineData:
    source = f"d4rl-hdf5:{path}"
    arrays, last_episode_finished = read_d4rl_hdf5(path, name)
    check_transitions(name, source, arrays)
    make_env = (lambda: gym.make(LOCOMOTION_ENVS[env])) if family == "locomotion" else (lambda: make_adroit_env(env))
    probe = make_env()
    env_id, observation_shape, action_space = probe.spec.id, probe.observation_space.shape, probe.action_space
    probe.close()
    if arrays["observations"].shape[1:] != observation_shape or arrays["actions"].shape[1:] != action_space.shape:
        raise DatasetError(
            f"dataset {name} ({source}) has observations {arrays['observations'].shape[1:]} and actions "
            f"{arrays['actions'].shape[1:]}, but {env_id} has {observation_shape} and {action_space.shape}"
        )
    ref_min, ref_max = D4RL_REFERENCE_RETURNS[env]
    return OfflineData(
        name=name, source=source, family=family, **arrays, ref_min_score=ref_min, ref_max_score=ref_max,
        last_episode_finished=last_episode_finished, make_env=make_env,
        action_low=action_space.low.astype(np.float32), action_high=action_space.high.astype(np.float32),
    )


# ------------------------------------------------------------------------------------------------------------------
# Resolution
# ------------------------------------------------------------------------------------------------------------------
def parse_d4rl_name(name: str) -> tuple[str, str, str, str] | None:
    """(family, env or task, quality or kind, version) of a D4RL-style name, or None."""
    patterns = (
        ("locomotion", rf"({'|'.join(LOCOMOTION_ENVS)})-({'|'.join(LOCOMOTION_QUALITIES)})-v(\d+)"),
        ("antmaze", rf"(antmaze)-({'|'.join(ANTMAZE_TASKS)})-v(\d+)"),
        ("kitchen", rf"(kitchen)-({'|'.join(KITCHEN_TASKS)})-v(\d+)"),
        ("adroit", rf"({'|'.join(ADROIT_TASKS)})-({'|'.join(ADROIT_KINDS)})-v(\d+)"),
    )
    for family, pattern in patterns:
        match = re.fullmatch(pattern, name)
        if match:
            return (family,) + match.groups()
    return None


def minari_namesake(family: str, env: str, quality: str) -> str | None:
    """The Minari id with similar (not the same) data as a D4RL name, if there is one."""
    if family == "locomotion":
        return f"mujoco/{env}/{quality}-v0" if quality in MINARI_MUJOCO_QUALITIES else None
    return {"antmaze": f"D4RL/antmaze/{quality}-v1", "kitchen": f"D4RL/kitchen/{quality}-v2",
            "adroit": f"D4RL/{env}/{quality}-v2"}[family]


def _load_d4rl(name: str, family: str, env: str, quality: str, version: str) -> OfflineData:
    """The raw D4RL file: found on disk, or downloaded into the first D4RL folder. Never other data in its place."""
    namesake = minari_namesake(family, env, quality)
    similar = f"; similar (not the same) data: --env {namesake}" if namesake else ""
    if family in ("antmaze", "kitchen"):
        raise DatasetError(f"dataset {name} is not loaded: D4RL recorded it in d4rl's mujoco-py {family} environment, "
                           f"whose observations no Gymnasium environment reproduces{similar} (re-collected on "
                           f"Gymnasium-Robotics; get it with: {MINARI_GET} {namesake})")
    candidates = [directory / file for directory in d4rl_directories()
                  for file in d4rl_file_names(family, env, quality, version)]
    for path in candidates:
        if path.is_file():
            return _from_d4rl_file(name, path, family, env)
    d4rl_file, *other_names = d4rl_file_names(family, env, quality, version)
    directory = d4rl_directories()[0]
    looked = (f"no D4RL file {d4rl_file}{''.join(f' (or {other})' for other in other_names)} in "
              f"{' or '.join(str(folder) for folder in d4rl_directories())}")
    file_path = d4rl_file_path(family, env, quality, version)
    if file_path is None:
        downloaded = "-v2" if family == "locomotion" else "-v1"
        raise DatasetError(f"dataset {name} not found: {looked}; only {downloaded} files of {family} are downloaded, "
                           f"put {d4rl_file} into {directory}{similar}")
    urls = d4rl_urls(file_path)
    print(f"{name}: {looked}; downloading it from {urls[0]}")
    try:
        download(urls, directory / d4rl_file, check_d4rl_file)
    except DownloadError as error:
        raise DatasetError(f"dataset {name} not found: {looked}, and the download into {directory} failed "
                           f"({error}){similar}") from None
    return _from_d4rl_file(name, directory / d4rl_file, family, env)


def load_offline_data(name: str) -> OfflineData:
    """Resolve a --env name (module docstring) and load the whole dataset; DatasetError when it is unavailable."""
    from common import metaworld_tasks, nav1d, pusht_tasks, robomimic_tasks

    nav1d_kind = re.fullmatch(r"nav1d-(\w+)|nav1d/(\w+)-v0", name)
    if nav1d_kind:
        kind = nav1d_kind.group(1) or nav1d_kind.group(2)
        if kind not in nav1d.DATASET_KINDS:
            raise DatasetError(f"unknown Nav1D dataset {name}; use one of "
                               f"{', '.join('nav1d-' + known for known in nav1d.DATASET_KINDS)}")
        return _from_minari(name, nav1d.make_dataset(kind))
    metaworld_name = metaworld_tasks.parse_name(name)
    if metaworld_name is not None:
        return _from_minari(name, metaworld_tasks.make_dataset(*metaworld_name))
    robomimic_name = robomimic_tasks.parse_name(name)
    if robomimic_name is not None:
        return robomimic_tasks.load(name, robomimic_tasks.find_file(*robomimic_name))
    if robomimic_tasks.is_robomimic_file(name):
        return robomimic_tasks.load(name, Path(name))
    pusht_buffer = pusht_tasks.find_buffer(name)
    if pusht_buffer is not None:
        return pusht_tasks.load(name, pusht_buffer)
    lerobot_folder = pusht_tasks.find_lerobot(name)
    if lerobot_folder is not None:
        return pusht_tasks.load(name, lerobot_folder, lerobot=True)
    d4rl = parse_d4rl_name(name)
    if d4rl is not None:
        return _load_d4rl(name, *d4rl)
    dataset, why = _find_minari(name)
    if dataset is None:
        raise DatasetError(f"dataset {name} not found: not a Nav1D (nav1d-full) or D4RL-style name "
                           f"(hopper-medium-v2, door-human-v1), and Minari dataset {name} is {why}")
    return _from_minari(name, dataset)


# ------------------------------------------------------------------------------------------------------------------
# Rewards, scores, normalisation
# ------------------------------------------------------------------------------------------------------------------
def iql_rewards(data: OfflineData) -> np.ndarray:
    """IQL's reward convention: locomotion r * 1000 / (max - min return of the finished episodes), antmaze r - 1,
    otherwise r."""
    if data.family == "locomotion":
        returns = data.episode_returns(finished_only=True)
        spread = float(returns.max() - returns.min())
        return (data.rewards * (1000.0 / spread if spread > 0 else 1.0)).astype(np.float32)
    if data.family == "antmaze":
        return (data.rewards - 1.0).astype(np.float32)
    return data.rewards.copy()


def iql_reward_affine(data: OfflineData) -> tuple[float, float]:
    """(scale, shift) with iql_rewards(data) = scale * rewards + shift, fixed by the offline data: online rewards are
    put on the same scale, so that collecting episodes never rescales the rewards the critic already learned."""
    transformed = iql_rewards(data)
    if np.ptp(data.rewards) == 0:
        return 1.0, float(np.mean(transformed - data.rewards))
    scale, shift = np.polyfit(data.rewards.astype(np.float64), transformed.astype(np.float64), 1)
    return float(scale), float(shift)


def normalized_score(data: OfflineData, returns) -> np.ndarray:
    """100 * (return - ref_min) / (ref_max - ref_min): 0 is random, 100 expert (locomotion) or optimal (Nav1D)."""
    return 100.0 * (np.asarray(returns, dtype=np.float64) - data.ref_min_score) / (
        data.ref_max_score - data.ref_min_score)


@dataclass
class Normalizer:
    """Per-dimension standardisation, fitted on the data and applied identically at evaluation."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_array(cls, values: np.ndarray, eps: float = 1e-3) -> "Normalizer":
        """std is floored at eps so that constant dimensions (e.g. Nav1D's time at a fixed step) stay finite."""
        values = np.asarray(values, dtype=np.float64)
        return cls(values.mean(axis=0).astype(np.float32), np.maximum(values.std(axis=0), eps).astype(np.float32))

    def _stats_like(self, values):
        if isinstance(values, torch.Tensor):
            return (torch.as_tensor(self.mean, dtype=values.dtype, device=values.device),
                    torch.as_tensor(self.std, dtype=values.dtype, device=values.device))
        return self.mean, self.std

    def normalize(self, values):
        """numpy arrays or torch tensors (stats moved to the tensor's device and dtype)."""
        mean, std = self._stats_like(values)
        return (values - mean) / std

    def unnormalize(self, values):
        mean, std = self._stats_like(values)
        return values * std + mean

    def state_dict(self) -> dict:
        """Tensors, so that checkpoints load with torch.load(weights_only=True)."""
        return {"mean": torch.as_tensor(self.mean), "std": torch.as_tensor(self.std)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Normalizer":
        return cls(np.asarray(state["mean"], dtype=np.float32), np.asarray(state["std"], dtype=np.float32))


# ------------------------------------------------------------------------------------------------------------------
# The data in model coordinates, on the device (Diffuser, Diffusion Policy)
# ------------------------------------------------------------------------------------------------------------------
def scale_actions(data: OfflineData, actions) -> np.ndarray:
    """Environment actions -> [-1, 1], the box the diffusion models work in."""
    return 2 * (np.asarray(actions) - data.action_low) / (data.action_high - data.action_low) - 1


def unscale_actions(data: OfflineData, actions) -> np.ndarray:
    """[-1, 1] -> environment actions (not clipped: evaluate() clips, and records what the model produced)."""
    return data.action_low + (np.asarray(actions) + 1) * (data.action_high - data.action_low) / 2


def model_transitions(data: OfflineData, normalizer: "Normalizer", online: dict | None = None,
                      device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Transitions as the models see them, as device tensors: normalised observations, actions scaled to [-1, 1],
    IQL rewards, terminals, and each transition's episode bounds (`episode_first`, `episode_last`, for windows cut
    at episode ends). `online` episodes (collect_episodes) are appended, their rewards put through the offline
    data's IQL convention (iql_reward_affine), so that collecting never rescales what the critic learned."""
    arrays = {key: getattr(data, key) for key in ("observations", "actions", "next_observations", "terminals",
                                                  "episode_ends")}
    rewards = iql_rewards(data)
    if online:
        scale, shift = iql_reward_affine(data)
        arrays = {key: np.concatenate([value, online[key]]) for key, value in arrays.items()}
        rewards = np.concatenate([rewards, scale * online["rewards"] + shift])
    ends = arrays.pop("episode_ends").astype(bool)
    ends[-1] = True
    last = np.flatnonzero(ends)
    lengths = np.diff(np.concatenate([[-1], last]))
    floats = dict(observations=normalizer.normalize(arrays["observations"]), actions=scale_actions(data, arrays["actions"]),
                  rewards=rewards, next_observations=normalizer.normalize(arrays["next_observations"]),
                  terminals=arrays["terminals"])
    tensors = {key: torch.as_tensor(np.asarray(value, dtype=np.float32), device=device) for key, value in floats.items()}
    tensors["episode_first"] = torch.as_tensor(np.repeat(last - lengths + 1, lengths), device=device)
    tensors["episode_last"] = torch.as_tensor(np.repeat(last, lengths), device=device)
    return tensors


def windows(values: torch.Tensor, starts: torch.Tensor, horizon: int, episode_last: torch.Tensor) -> torch.Tensor:
    """values[start : start + horizon] for every start (B, horizon, ...), cut at the start's episode end: later steps
    repeat the episode's last entry (the agent stays where it ended). One gather on the device."""
    steps = starts[:, None] + torch.arange(horizon, device=starts.device)
    return values[torch.minimum(steps, episode_last[starts][:, None])]


# ------------------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------------------
def eval_seed(run_seed: int, episode: int) -> int:
    """Reset seed of evaluation episode `episode` of a run: distinct per episode, a function of the run seed only,
    so that every stage of a run is evaluated on the same start states (paired comparison)."""
    sequence = np.random.SeedSequence([run_seed % 2**63, EVAL_SEED_STREAM, episode])
    return int(sequence.generate_state(1, dtype=np.uint32)[0])


@dataclass
class EvalResult:
    returns: np.ndarray  # (E,) undiscounted returns
    lengths: np.ndarray  # (E,) steps taken
    observations: list[np.ndarray]  # per episode (length + 1, S) float32, the final observation included
    actions: list[np.ndarray]  # per episode (length, A) float32, as the policy produced them (before clipping)
    terminated: np.ndarray  # (E,) bool: ended by termination, not by a time limit or max_steps
    seconds: float  # wall time of the episodes, resets and policy calls included
    success: np.ndarray | None = None  # (E,) bool: the env's info["success"] was set at some step; None if never reported

    @property
    def actions_per_s(self) -> float:
        """Environment steps per second over all episodes: the evaluation's speed."""
        return float(self.lengths.sum()) / max(self.seconds, 1e-9)


class TransitionRecorder(gym.Wrapper):
    """Records every transition (s, a executed, r, s', terminated) of the wrapped env, one list per episode."""

    def __init__(self, env: gym.Env, episodes: list):
        super().__init__(env)
        self.episodes = episodes

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.last_obs, self.current = obs, []
        self.episodes.append(self.current)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.current.append((self.last_obs, action, reward, obs, terminated))
        self.last_obs = obs
        return obs, reward, terminated, truncated, info


def collect_episodes(policy: Callable[[np.ndarray, np.ndarray], Any], make_env: Callable[[], gym.Env], episodes: int,
                     seed: int, max_steps: int | None = None) -> dict[str, np.ndarray]:
    """Online data: `episodes` episodes of `policy` run by `evaluate` (batched, as in evaluation) on start states of
    `seed`; their transitions in the dataset's raw layout (observations, executed actions, rewards,
    next_observations, terminals, episode_ends)."""
    recorded: list[list] = []
    evaluate(policy, lambda: TransitionRecorder(make_env(), recorded), episodes, seed, max_steps=max_steps)
    steps = [step for episode in recorded for step in episode]
    return {
        "observations": np.array([step[0] for step in steps], dtype=np.float32),
        "actions": np.array([step[1] for step in steps], dtype=np.float32),
        "rewards": np.array([step[2] for step in steps], dtype=np.float32),
        "next_observations": np.array([step[3] for step in steps], dtype=np.float32),
        "terminals": np.array([step[4] for step in steps], dtype=bool),
        "episode_ends": np.concatenate([np.arange(len(episode)) == len(episode) - 1 for episode in recorded if episode]),
    }


def evaluate(policy: Callable[[np.ndarray, np.ndarray], Any], make_env: Callable[[], gym.Env], episodes: int,
             seed: int, max_steps: int | None = None) -> EvalResult:
    """Run `episodes` episodes in lockstep, one env each, so the policy sees one batch per step.

    Env i is reset with seed eval_seed(seed, i). policy(observations (n_active, S) float32, env_ids (n_active,))
    returns actions (n_active, A) as numpy or torch; they are clipped to the action space before stepping.
    `policy.reset(episodes)` is called first when it exists (e.g. to clear action chunks). Finished episodes drop
    out of the batch; max_steps (optional) truncates every episode.
    """
    started = time.perf_counter()
    envs = [make_env() for _ in range(episodes)]
    try:
        current = [np.asarray(env.reset(seed=eval_seed(seed, i))[0], dtype=np.float32) for i, env in enumerate(envs)]
        reset = getattr(policy, "reset", None)
        if callable(reset):
            reset(episodes)
        observations = [[obs] for obs in current]
        actions: list[list[np.ndarray]] = [[] for _ in range(episodes)]
        returns = np.zeros(episodes)
        terminated = np.zeros(episodes, dtype=bool)
        success = np.zeros(episodes, dtype=bool)
        reports_success = False
        active = list(range(episodes))
        while active:
            batch = np.stack([current[i] for i in active])
            chosen = policy(batch, np.asarray(active))
            if isinstance(chosen, torch.Tensor):
                chosen = chosen.detach().cpu().numpy()
            chosen = np.asarray(chosen, dtype=np.float32).reshape(len(active), -1)
            still_active = []
            for row, i in enumerate(active):
                space = envs[i].action_space
                action = np.clip(chosen[row], space.low, space.high).reshape(space.shape)
                obs, step_reward, done, truncated, info = envs[i].step(action)
                if "success" in info:
                    reports_success = True
                    success[i] |= bool(info["success"])
                current[i] = np.asarray(obs, dtype=np.float32)
                observations[i].append(current[i])
                actions[i].append(chosen[row])
                returns[i] += float(step_reward)
                terminated[i] = bool(done)
                out_of_steps = max_steps is not None and len(actions[i]) >= max_steps
                if not (done or truncated or out_of_steps):
                    still_active.append(i)
            active = still_active
    finally:
        for env in envs:
            env.close()
    return EvalResult(
        returns=returns,
        lengths=np.array([len(episode) for episode in actions]),
        observations=[np.stack(episode) for episode in observations],
        actions=[np.stack(episode) for episode in actions],
        terminated=terminated,
        seconds=time.perf_counter() - started,
        success=success if reports_success else None,
    )
