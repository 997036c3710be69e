"""Robomimic low-dim datasets and their robosuite environments (the robotics rows of the alignment paper's Table 3).

`--env` names:
- `robomimic/<task>/<kind>`, task one of HORIZONS (lift, can, square, transport, tool_hang), kind one of KINDS (ph:
  proficient human, mh: multi-human, mg: machine generated): robomimic's low-dim HDF5 file, looked for in
  $ROBOMIMIC_DATASET_DIR (if set), else ~/robomimic/datasets, as <task>/<kind>/ + one of FILE_NAMES (robomimic 0.5's
  file for robosuite 1.5 first). A missing file is an error that names robomimic's download command.
- `robomimic/<lift|can>/scripted-ph` and `.../scripted-mh`: made on first use in that folder, in the same format,
  by a scripted policy through the task's WAYPOINTS (Lift: above the cube, down, grasp, lift; Can: the same, then over
  the can's bin, lower, release, away). ph: one clean operator (small action noise); mh: three operators of rising
  noise and falling speed, 1/3 of the demonstrations each, with robomimic's mh filter keys mask/better, mask/okay,
  mask/worse. Only successful demonstrations are kept, as in robomimic's data.
- a path to a `.hdf5` file in robomimic's format.

Format: data/demo_<i>/{obs/<key>, next_obs/<key>, actions, rewards, dones} (demos in index order) and
data.attrs["env_args"], JSON {"env_name", "type", "env_kwargs"} as robomimic writes it. Observations are
robomimic's standard low-dim set, concatenated in this order: `object` (the task's object state), then per robot
robot<i>_eef_pos, robot<i>_eef_quat, robot<i>_gripper_qpos. `dones` mark terminations (the task solved).

Evaluation (RobomimicEnv): the robosuite env recreated from env_args (renderers and cameras off; a controller config
of robosuite < 1.5 converted to 1.5's composite form), reset from the episode seed, with info["success"] from the
env's success check. Like robomimic's rollouts an episode ends at success, else after the task's horizon. robosuite's
sparse reward is 1 at success, so the return is the success and the normalised score (reference returns 0 and 1) is
the success rate in percent.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

from common.runtime import ExclusiveLock, UserError

HORIZONS = {"lift": 400, "can": 400, "square": 400, "transport": 700, "tool_hang": 700}  # robomimic's rollout lengths
KINDS = ("ph", "mh", "mg")
FILE_NAMES = ("low_dim_v15.hdf5", "low_dim_v141.hdf5", "low_dim.hdf5")  # robomimic 0.5, robomimic 0.3, plain
ROBOT_KEYS = ("eef_pos", "eef_quat", "gripper_qpos")
INSTALL = "pip install robosuite==1.5.1 (requirements.txt pins it)"
DATASET_DIR_VARIABLE = "ROBOMIMIC_DATASET_DIR"
# Scripted demonstrations: per operator group, (share of the demonstrations, action noise std, speed gain)
SCRIPTED_OPERATORS = {
    "scripted-ph": {"proficient": (1.0, 0.05, 1.0)},
    "scripted-mh": {"better": (1 / 3, 0.05, 1.0), "okay": (1 / 3, 0.2, 0.6), "worse": (1 / 3, 0.35, 0.4)},
}
SCRIPTED_DEMOS = {"scripted-ph": 200, "scripted-mh": 300}  # robomimic's Lift and Can ph and mh have 200 and 300
SCRIPTED_TASKS = ("lift", "can")


class RobomimicError(UserError):
    """A robomimic name, file or environment that cannot be used; the message is one line."""


def dataset_directory() -> Path:
    return Path(os.environ.get(DATASET_DIR_VARIABLE) or Path.home() / "robomimic" / "datasets")


def parse_name(name: str) -> tuple[str, str] | None:
    """(task, kind) of `robomimic/<task>/<kind>`, None for other names; RobomimicError for an unknown task or kind."""
    match = re.fullmatch(r"robomimic/([\w-]+)/([\w-]+)", name)
    if match is None:
        return None
    task, kind = match.groups()
    if task not in HORIZONS:
        raise RobomimicError(f"unknown robomimic task {task!r} in {name}; the tasks are {', '.join(HORIZONS)}")
    kinds = KINDS + (tuple(SCRIPTED_OPERATORS) if task in SCRIPTED_TASKS else ())
    if kind not in kinds:
        raise RobomimicError(f"unknown robomimic dataset kind {kind!r} in {name}; for {task}: {', '.join(kinds)}")
    return task, kind


def is_robomimic_file(name: str) -> bool:
    """Whether `name` is a path to an HDF5 file with robomimic's data group (checked cheaply, file not loaded)."""
    path = Path(name)
    if path.suffix not in (".hdf5", ".h5") or not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as file:
            return isinstance(file.get("data"), h5py.Group) and any(key.startswith("demo_") for key in file["data"])
    except OSError:
        return False


def find_file(task: str, kind: str) -> Path:
    """The dataset file of `robomimic/<task>/<kind>`; a scripted Lift set is made first when missing."""
    folder = dataset_directory() / task / kind
    if kind in SCRIPTED_OPERATORS:
        return make_scripted(task, kind)
    for file_name in FILE_NAMES:
        if (folder / file_name).is_file():
            return folder / file_name
    raise RobomimicError(
        f"dataset robomimic/{task}/{kind} not found: none of {', '.join(FILE_NAMES)} in {folder}; get it with: python "
        f"-m robomimic.scripts.download_datasets --tasks {task} --dataset_types {kind} --hdf5_types low_dim "
        f"--download_dir {dataset_directory()} (or set {DATASET_DIR_VARIABLE})")


# ------------------------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------------------------
def observation_keys(robot_count: int) -> list[str]:
    return ["object"] + [f"robot{robot}_{key}" for robot in range(robot_count) for key in ROBOT_KEYS]


def robot_count(env_args: dict) -> int:
    robots = env_args.get("env_kwargs", {}).get("robots", ["Panda"])
    return 1 if isinstance(robots, str) else len(robots)


def read_env_args(file: h5py.File, path: Path) -> dict:
    raw = file["data"].attrs.get("env_args") if isinstance(file.get("data"), h5py.Group) else None
    if raw is None:
        raise RobomimicError(f"robomimic file {path} has no data.attrs['env_args'] (the JSON naming its robosuite "
                             f"environment and kwargs), so its environment cannot be made")
    try:
        env_args = json.loads(raw)
        env_args["env_name"]
    except (ValueError, TypeError, KeyError):
        raise RobomimicError(f"robomimic file {path}: data.attrs['env_args'] is not JSON with an env_name") from None
    return env_args


def _demo_names(file: h5py.File, path: Path) -> list[str]:
    names = [key for key in file["data"] if re.fullmatch(r"demo_\d+", key)]
    if not names:
        raise RobomimicError(f"robomimic file {path} holds no data/demo_<i> groups")
    return sorted(names, key=lambda key: int(key[5:]))


def _stacked(demo: h5py.Group, group: str, keys: list[str], where: str) -> np.ndarray:
    missing = [key for key in keys if f"{group}/{key}" not in demo]
    if missing:
        have = sorted(demo[group]) if group in demo else []
        raise RobomimicError(f"{where} lacks observation keys {', '.join(f'{group}/{key}' for key in missing)} (it "
                             f"has: {', '.join(have) or 'no ' + group + ' group'})")
    return np.concatenate([np.asarray(demo[f"{group}/{key}"], dtype=np.float32).reshape(len(demo["actions"]), -1)
                           for key in keys], axis=1)


def read_file(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """Transition arrays (the layout of common.data.OfflineData) and env_args of a robomimic low-dim file."""
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise RobomimicError(f"cannot read robomimic file {path} ({' '.join(str(error).split())})") from None
    with file:
        env_args = read_env_args(file, path)
        keys = observation_keys(robot_count(env_args))
        columns: dict[str, list[np.ndarray]] = {key: [] for key in ("observations", "next_observations", "actions",
                                                                    "rewards", "terminals", "episode_ends")}
        for name in _demo_names(file, path):
            demo, where = file["data"][name], f"robomimic file {path}, data/{name},"
            missing = [key for key in ("actions", "rewards", "dones") if key not in demo]
            if missing:
                raise RobomimicError(f"{where} lacks {', '.join(missing)}")
            steps = len(demo["actions"])
            if steps == 0:
                continue
            observations = _stacked(demo, "obs", keys, where)
            if "next_obs" in demo:
                next_observations = _stacked(demo, "next_obs", keys, where)
            else:  # the last step's successor is unknown: it repeats the last observation
                next_observations = np.concatenate([observations[1:], observations[-1:]])
            columns["observations"].append(observations)
            columns["next_observations"].append(next_observations)
            columns["actions"].append(np.asarray(demo["actions"], dtype=np.float32).reshape(steps, -1))
            columns["rewards"].append(np.asarray(demo["rewards"], dtype=np.float32).reshape(steps))
            columns["terminals"].append(np.asarray(demo["dones"]).reshape(steps).astype(bool))
            columns["episode_ends"].append(np.arange(steps) == steps - 1)
        if not columns["rewards"]:
            raise RobomimicError(f"robomimic file {path} holds no demonstration with a step")
    return {key: np.concatenate(values) for key, values in columns.items()}, env_args


# ------------------------------------------------------------------------------------------------------------------
# Environment
# ------------------------------------------------------------------------------------------------------------------
def _robosuite():
    """robosuite, imported with its console log limited to warnings (it logs every controller it loads)."""
    logger = logging.getLogger("robosuite_logs")
    logger.disabled = True  # its import warns about optional packages (robosuite_models, mink IK) it does not need
    try:
        import robosuite
    except ImportError:
        raise RobomimicError(f"robosuite is not installed: {INSTALL}") from None
    finally:
        logger.disabled = False
    logger.setLevel(logging.WARNING)
    return robosuite


def robosuite_kwargs(env_args: dict) -> dict:
    """The env's kwargs for this robosuite: state observations only, no renderer, and a robosuite < 1.5 (part)
    controller config in 1.5's composite form, as robomimic 0.5 converts it."""
    _robosuite()
    from robosuite.controllers.composite.composite_controller_factory import refactor_composite_controller_config

    kwargs = dict(env_args.get("env_kwargs", {}))
    kwargs.update(has_renderer=False, has_offscreen_renderer=False, use_camera_obs=False, use_object_obs=True,
                  ignore_done=True)
    for camera_option in ("camera_depths", "camera_heights", "camera_widths", "camera_names", "render_gpu_device_id"):
        kwargs.pop(camera_option, None)
    if kwargs.get("controller_configs") is not None:
        robots = kwargs.get("robots", ["Panda"])
        robot = robots if isinstance(robots, str) else robots[0]
        kwargs["controller_configs"] = refactor_composite_controller_config(kwargs["controller_configs"], robot,
                                                                            ["right", "left"])
    return kwargs


@contextlib.contextmanager
def numpy_global_seed(seed: int | None):
    """robosuite draws object placements and joint noise from numpy's global generator: seed it for one reset,
    then put the caller's state back."""
    if seed is None:
        yield
        return
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


def low_dim_observation(raw: dict) -> dict[str, np.ndarray]:
    """robosuite's observation dict under robomimic's names (object-state is called object)."""
    observation = {key: value for key, value in raw.items() if not key.endswith("-state")}
    if "object-state" in raw:
        observation["object"] = raw["object-state"]
    return observation


class RobomimicEnv(gym.Env):
    """A robosuite task as a Gymnasium env with robomimic's flat low-dim observations (module docstring)."""

    metadata = {"render_modes": []}

    def __init__(self, env_args: dict, horizon: int):
        robosuite = _robosuite()
        try:
            self.suite_env = robosuite.make(env_args["env_name"], **robosuite_kwargs(env_args))
        except Exception as error:
            raise RobomimicError(f"robosuite cannot make {env_args['env_name']} from the file's env_args "
                                 f"({type(error).__name__}: {' '.join(str(error).split())})") from None
        self.keys = observation_keys(robot_count(env_args))
        self.horizon = horizon
        low, high = self.suite_env.action_spec
        self.action_space = gym.spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)
        size = len(self._flat(self.suite_env.reset()))
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (size,), dtype=np.float32)
        self._steps = 0

    def _flat(self, raw: dict) -> np.ndarray:
        observation = low_dim_observation(raw)
        return np.concatenate([np.asarray(observation[key], dtype=np.float32).reshape(-1) for key in self.keys])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        with numpy_global_seed(seed):
            raw = self.suite_env.reset()
        self._steps = 0
        return self._flat(raw), {}

    def step(self, action):
        raw, reward, _, _ = self.suite_env.step(np.asarray(action, dtype=np.float64))
        self._steps += 1
        success = bool(self.suite_env._check_success())
        return self._flat(raw), float(reward), success, self._steps >= self.horizon, {"success": success}

    def close(self):
        self.suite_env.close()


def horizon_of(env_args: dict) -> int:
    """The rollout length of the file's task (robomimic's), by robosuite env name."""
    task = {"Lift": "lift", "PickPlaceCan": "can", "NutAssemblySquare": "square", "TwoArmTransport": "transport",
            "ToolHang": "tool_hang"}.get(env_args["env_name"])
    return HORIZONS[task] if task else max(HORIZONS.values())


# ------------------------------------------------------------------------------------------------------------------
# Scripted demonstrations (Lift, Can)
# ------------------------------------------------------------------------------------------------------------------
OPEN, CLOSED = -1.0, 1.0
CAN_BIN = np.array([0.1975, 0.4025])  # the can's place in PickPlaceCan's target bin (robosuite's bin placements)
# Per task: the object's position key, then waypoints (target from end effector and object position, gripper, and
# when to move on: ("reach", tolerance in metres) or ("wait", steps); the last one holds until the episode ends).
WAYPOINTS = {
    "lift": ("cube_pos", [
        (lambda eef, obj: obj + [0.0, 0.0, 0.08], OPEN, ("reach", 0.01)),  # above the cube
        (lambda eef, obj: obj, OPEN, ("reach", 0.008)),  # down to it
        (lambda eef, obj: eef, CLOSED, ("wait", 10)),  # grasp
        (lambda eef, obj: np.array([obj[0], obj[1], 1.05]), CLOSED, None),  # lift
    ]),
    "can": ("Can_pos", [
        (lambda eef, obj: obj + [0.0, 0.0, 0.10], OPEN, ("reach", 0.01)),
        (lambda eef, obj: obj, OPEN, ("reach", 0.01)),
        (lambda eef, obj: eef, CLOSED, ("wait", 10)),
        (lambda eef, obj: np.array([eef[0], eef[1], 1.05]), CLOSED, ("reach", 0.02)),  # up, clear of the bin walls
        (lambda eef, obj: np.array([*CAN_BIN, 1.05]), CLOSED, ("reach", 0.02)),  # over the can's bin
        (lambda eef, obj: np.array([*CAN_BIN, 0.95]), CLOSED, ("reach", 0.02)),  # lower
        (lambda eef, obj: eef, OPEN, ("wait", 10)),  # release
        (lambda eef, obj: np.array([*CAN_BIN, 1.15]), OPEN, None),  # away: success needs the gripper off the can
    ]),
}
TASK_ENV_ARGS = {task: {"env_name": name, "type": 1, "env_kwargs": {
    "robots": ["Panda"], "control_freq": 20, "reward_shaping": False, "reward_scale": 1.0, "use_object_obs": True}}
    for task, name in (("lift", "Lift"), ("can", "PickPlaceCan"))}
SCRIPTED_SEEDS = {"lift": 7_2024, "can": 7_2025}  # each task's demonstrations draw from a seed of their own


class ScriptedPickPlace:
    """A task's WAYPOINTS, followed by position deltas under robosuite's delta end-effector control (an action of 1
    moves 5 cm), no rotation, plus Gaussian action noise; `gain` < 1 moves more slowly."""

    def __init__(self, task: str, noise: float, gain: float, rng: np.random.Generator):
        self.object_key, self.waypoints = WAYPOINTS[task]
        self.noise, self.gain, self.rng = noise, gain, rng
        self.index, self.waited = 0, 0

    def __call__(self, observation: dict) -> np.ndarray:
        eef, obj = np.asarray(observation["robot0_eef_pos"]), np.asarray(observation[self.object_key])
        target_of, _, move_on = self.waypoints[self.index]
        target = target_of(eef, obj)
        if move_on is not None:
            kind, amount = move_on
            self.waited += 1
            if (kind == "reach" and np.linalg.norm(target - eef) < amount) or (kind == "wait" and self.waited >= amount):
                self.index, self.waited = self.index + 1, 0
        action = np.zeros(7)
        action[:3] = np.clip(self.gain * (target - eef) / 0.05, -1, 1)
        action[6] = self.waypoints[self.index][1]
        action[:6] += self.noise * self.rng.standard_normal(6)
        return np.clip(action, -1, 1)


def _record_demo(env: RobomimicEnv, policy: ScriptedPickPlace, seed: int) -> dict[str, np.ndarray] | None:
    """One scripted episode up to its first success (None if it fails within the horizon), robomimic's arrays."""
    suite_env = env.suite_env
    with numpy_global_seed(seed):
        raw = suite_env.reset()
    steps: list[tuple] = []
    for _ in range(env.horizon):
        observation = low_dim_observation(raw)
        state = suite_env.sim.get_state().flatten()
        action = policy(observation)
        raw, reward, _, _ = suite_env.step(action)
        success = bool(suite_env._check_success())
        steps.append((observation, low_dim_observation(raw), state, action, reward, success))
        if success:
            break
    if not steps[-1][-1]:
        return None
    demo = {f"obs/{key}": np.stack([step[0][key] for step in steps]) for key in steps[0][0]}
    demo |= {f"next_obs/{key}": np.stack([step[1][key] for step in steps]) for key in steps[0][1]}
    demo["states"] = np.stack([step[2] for step in steps])
    demo["actions"] = np.stack([step[3] for step in steps]).astype(np.float64)
    demo["rewards"] = np.array([step[4] for step in steps], dtype=np.float64)
    demo["dones"] = np.array([step[5] for step in steps], dtype=np.int64)
    return demo


def make_scripted(task: str, kind: str, demos: int | None = None) -> Path:
    """The scripted set `robomimic/<task>/<kind>` (module docstring) as a robomimic file, made once under a lock and
    moved into place when complete, so an interrupted run never leaves half a file. Deterministic: a function of
    the task's SCRIPTED_SEEDS entry."""
    path = dataset_directory() / task / kind / "low_dim.hdf5"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = ExclusiveLock(path.parent / ".low_dim.hdf5.lock", f"making robomimic/{task}/{kind}", wait=True)
    try:
        if not path.is_file():
            _write_scripted(task, kind, demos or SCRIPTED_DEMOS[kind], path)
    finally:
        lock.release()
    return path


def _write_scripted(task: str, kind: str, demos: int, path: Path) -> None:
    env = RobomimicEnv(TASK_ENV_ARGS[task], HORIZONS[task])
    operators = SCRIPTED_OPERATORS[kind]
    counts = np.floor(np.cumsum([share for share, _, _ in operators.values()]) * demos + 0.5).astype(int)
    groups = {name: [] for name in operators}
    temporary = path.with_suffix(".partial")
    print(f"making robomimic/{task}/{kind}: {demos} scripted demonstrations into {path}")
    try:
        with h5py.File(temporary, "w") as file:
            data = file.create_group("data")
            attempt, total = 0, 0
            for index in range(demos):
                group = list(operators)[int(np.searchsorted(counts, index, side="right"))]
                _, noise, gain = operators[group]
                demo = None
                while demo is None:  # failed attempts are dropped: robomimic's datasets hold successes only
                    sequence = np.random.SeedSequence([SCRIPTED_SEEDS[task], list(SCRIPTED_OPERATORS).index(kind),
                                                       attempt])
                    seed = int(sequence.generate_state(1)[0])
                    policy = ScriptedPickPlace(task, noise, gain, np.random.default_rng(sequence))
                    demo = _record_demo(env, policy, seed)
                    attempt += 1
                stored = data.create_group(f"demo_{index}")
                for key, values in demo.items():
                    stored.create_dataset(key, data=values)
                stored.attrs["num_samples"] = len(demo["actions"])
                total += len(demo["actions"])
                groups[group].append(f"demo_{index}")
            data.attrs["total"] = total
            data.attrs["scripted_attempts"] = attempt  # failed attempts included: the operators' success rate
            data.attrs["env_args"] = json.dumps(TASK_ENV_ARGS[task])
            if len(groups) > 1:
                for group, names in groups.items():
                    file.create_dataset(f"mask/{group}", data=np.array(names, dtype="S"))
        temporary.replace(path)
    finally:
        env.close()
        temporary.unlink(missing_ok=True)


def load(name: str, path: Path):
    """A robomimic file as OfflineData, checked against the env its env_args make (observation and action sizes)."""
    from common.data import OfflineData, check_transitions

    arrays, env_args = read_file(path)
    source = f"robomimic-hdf5:{path}"
    check_transitions(name, source, arrays)
    horizon = horizon_of(env_args)
    probe = RobomimicEnv(env_args, horizon)
    try:
        observation_size, action_space = probe.observation_space.shape[0], probe.action_space
    finally:
        probe.close()
    if arrays["observations"].shape[1] != observation_size or arrays["actions"].shape[1] != action_space.shape[0]:
        raise RobomimicError(
            f"dataset {name} ({source}) has observations of size {arrays['observations'].shape[1]} and actions of "
            f"size {arrays['actions'].shape[1]}, but its env {env_args['env_name']} has {observation_size} and "
            f"{action_space.shape[0]}")
    return OfflineData(
        name=name, source=source, family="robomimic", **arrays, ref_min_score=0.0, ref_max_score=1.0,
        make_env=lambda: RobomimicEnv(env_args, horizon), action_low=action_space.low, action_high=action_space.high)
