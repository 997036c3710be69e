"""Run plumbing shared by every script: errors, presets, seeding, run directories, checkpoints, summaries.

Nothing here is method-specific. What it guarantees (the README's Usage and Robustness sections): one command-line shape with presets, one output
layout, atomic checkpoints, Ctrl-C and non-finite losses handled, one-line errors with exit code 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

CHECKPOINT_FORMAT = 2  # 2: bookkeeping of common.training.Trainer (done stages, global step, script state)
# Fault injection for the crash tests: "STAGE@STEP" makes a run SIGKILL itself right after it has written a checkpoint
# inside STAGE at a step >= STEP, the worst moment a real crash can pick (nothing after that checkpoint is on disk).
CRASH_AFTER_CHECKPOINT = "DIFFUSION_CRASH_AFTER_CHECKPOINT"


class UserError(Exception):
    """An expected mistake in the input (bad argument, missing dataset): reported in one line, exit code 2."""


class CorruptCheckpointError(UserError):
    """A checkpoint file that cannot be read (e.g. truncated by a crash or a full disk)."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf; the run stops and keeps its last good checkpoint."""

    def __init__(self, stage: str, step: int, value: float):
        super().__init__(
            f"non-finite loss ({value}) in stage '{stage}' at step {step}; "
            "the last good checkpoint was kept (lower the learning rate or check the data)"
        )
        self.stage, self.step = stage, step


def cli(main: Callable[[Any], None], args_type: type) -> None:
    """Parse `args_type` with tyro and run `main`, turning expected errors into one line and an exit code."""
    import tyro

    args = tyro.cli(args_type)
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except OSError as error:  # the file system said no: a path that cannot be made, a read-only or full disk
        where = f" '{error.filename}'" if error.filename else ""
        print(f"error: cannot use{where}: {error.strerror or error}; check the path, its permissions and free "
              f"space", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------------------------
# Presets and arguments
# --------------------------------------------------------------------------------------------------------------
def explicit_fields(argv: list[str]) -> set[str]:
    """Field names set on the command line: `--foo-bar`, `--foo_bar`, `--foo-bar=x`, and tyro's `--no-foo-bar`."""
    names = set()
    for token in argv:
        if token.startswith("--"):
            name = token[2:].split("=", 1)[0].replace("-", "_")
            names.add(name)
            if name.startswith("no_"):
                names.add(name[3:])
    return names


def apply_presets(args: Any, presets: dict[str, dict], argv: list[str] | None = None,
                  compute_presets: dict[str, dict] | None = None) -> dict:
    """Fill `args` from every preset whose key occurs in `args.env`, then from the compute preset `args.preset` (e.g.
    `cpu`) over them; explicit command-line values always win.

    More specific (longer) dataset keys are applied last, so `hopper-medium-v2` overrides `hopper`.
    Returns the values that were taken from presets.
    """
    if getattr(args, "resume", False):
        return {}  # a resumed run's arguments come resolved from its args.json (resumed_arguments)
    given = explicit_fields(sys.argv[1:] if argv is None else argv)
    field_names = {field.name for field in dataclasses.fields(args)}
    layers = [(key, presets[key]) for key in sorted((k for k in presets if k in args.env), key=len)]
    if compute_presets is not None and getattr(args, "preset", ""):
        layers.append((args.preset, compute_presets[args.preset]))
    applied: dict[str, Any] = {}
    for key, values in layers:
        for name, value in values.items():
            if name not in field_names:
                raise ValueError(f"preset '{key}' sets unknown field '{name}'")
            if name not in given:
                setattr(args, name, value)
                applied[name] = value
    return applied


# Options a resumed run may take anew: where and how fast it runs, how often it saves and logs, evaluation settings
# (for stages not evaluated yet; finished evaluations keep their numbers) and more passes. The step count of a stage
# may change while that stage is unfinished. Everything else comes from the run's args.json.
MAY_CHANGE_ON_RESUME = ("resume", "run_dir", "device", "cpu_threads", "compile", "cuda_graphs", "save_every",
                        "log_every", "eval_every", "eval_episodes", "eval_max_steps", "passes")
STEP_OPTION_STAGES = {"align": "alignment", "online_critic": "online"}  # {name}_steps -> its stage, where they differ


def resumed_arguments(args: Any, script: str, argv: list[str] | None = None) -> Any:
    """`--resume --run-dir D`: the run's own arguments, read from D/args.json, with what the command line may change
    (MAY_CHANGE_ON_RESUME, and the step count of an unfinished stage) taken from it. An option that would change the
    experiment is a UserError naming it, raised before anything in D is touched; so is a checkpoint of another
    script. Without --resume, `args` unchanged."""
    if not args.resume:
        return args
    if not args.run_dir:
        raise UserError("--resume needs --run-dir pointing at the run to continue")
    run_dir = Path(args.run_dir)
    checkpoints = [run_dir / "checkpoints" / name for name in ("latest.pt", "previous.pt")]
    readable = None
    for path in (path for path in checkpoints if path.exists()):
        try:
            readable = read_checkpoint_file(path, script)
            break
        except CorruptCheckpointError:  # Run.load_checkpoint reports it and falls back the same way
            continue
    if readable is None:
        if any(path.exists() for path in checkpoints):
            raise UserError(f"--resume: no readable checkpoint in '{run_dir / 'checkpoints'}' (corrupt or truncated)")
        raise UserError(f"--resume: no checkpoint in '{run_dir / 'checkpoints'}' to resume from")
    saved_path = run_dir / "args.json"
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--resume: cannot read the run's arguments '{saved_path}' ({type(error).__name__})") from error
    given = explicit_fields(sys.argv[1:] if argv is None else argv)
    finished = {stage.rsplit("/", 1)[-1] for stage in readable.get("done", {})}
    current = json.loads(json.dumps(args_to_dict(args), default=str))
    for name, value in current.items():
        if name not in saved:
            continue  # an option this run predates: its default
        if name in given:
            stage = name.removesuffix("_steps")
            stage = STEP_OPTION_STAGES.get(stage, stage)
            changeable = name in MAY_CHANGE_ON_RESUME or (name.endswith("_steps") and stage not in finished)
            if value != saved[name] and not changeable:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"--resume: {flag} {value} would change the run (its {saved_path.name} has "
                                f"{saved[name]}); drop {flag} or start a new run")
            continue
        restored = saved[name]
        setattr(args, name, tuple(restored) if isinstance(getattr(args, name), tuple) else restored)
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available (use --device cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device '{name}' (choose auto, cpu or cuda)")
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Draw from generators seeded with `seed` inside the block and leave the run's random streams untouched, so
    that a model made part-way through a run (an aligned policy, a cascade) gets the same initial weights whether the
    run was resumed or not."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def default_run_dir(env: str, exp_name: str, seed: int) -> str:
    return f"runs/{env.replace('/', '_')}__{exp_name}__{seed}__{int(time.time())}"


def arguments_table(args: Any) -> str:
    """The resolved arguments as a Markdown table, for TensorBoard's text tab (CleanRL's layout)."""
    rows = "\n".join(f"|{name}|{value}|" for name, value in args_to_dict(args).items())
    return f"|argument|value|\n|-|-|\n{rows}"


def args_to_dict(args: Any) -> dict:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in dataclasses.asdict(args).items()}


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
def atomic_write_bytes(path: Path, write: Callable[[Any], None], keep_previous: Path | None = None) -> None:
    """Write through a temporary file in the same folder and rename, so a crash never leaves a half file.

    With `keep_previous`, the old file is moved there only once the new one is complete on disk; a crash between the
    two renames leaves `keep_previous` intact, which is where `Run.load_checkpoint` looks next.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException as error:  # a full disk or Ctrl-C mid-write: no half file is left behind
        tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and not error.filename:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    if keep_previous is not None and path.exists():
        os.replace(path, keep_previous)
    os.replace(tmp, path)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class ExclusiveLock:
    """An exclusive advisory lock (flock) on the file `path`, held by this process until `release()` or its end.

    The OS drops the lock of a process that dies, so a crashed run never blocks its directory; the file keeps the
    holder's pid, which the next process names when it finds the lock held (`wait=False`: a UserError) or reports
    as taken over when that process is gone. `wait=True` blocks until the holder is done instead."""

    def __init__(self, path: Path, what: str, wait: bool = False):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if not wait:
                self.handle.close()
                raise UserError(f"{what} is in use by process {holder}; wait for it to end or use another one")
            print(f"waiting for process {holder}, which holds {what}", file=sys.stderr)
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        previous = self._holder()
        if previous is not None and previous != os.getpid() and not process_alive(previous):
            print(f"warning: taking over {what} from process {previous}, which is no longer running", file=sys.stderr)
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(f"{os.getpid()}\n")
        self.handle.flush()

    def _holder(self) -> int | None:
        self.handle.seek(0)
        text = self.handle.read().strip()
        return int(text) if text.isdigit() else None

    def release(self) -> None:
        if not self.handle.closed:
            self.handle.seek(0)
            self.handle.truncate()  # an empty file: released cleanly, nobody to take over from
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


def read_checkpoint_file(path: str | Path, script: str | None = None) -> dict:
    """Load one checkpoint; a truncated/corrupt file or one from another script is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated zip archives
        raise CorruptCheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(error).__name__})") from error
    if not isinstance(state, dict) or "format" not in state:
        raise UserError(f"'{path}' is not a checkpoint written by this project")
    if state["format"] != CHECKPOINT_FORMAT:
        raise UserError(f"checkpoint '{path}' was written by another version of this project (format "
                        f"{state['format']}; this version reads format {CHECKPOINT_FORMAT})")
    if script is not None and state.get("script") != script:
        raise UserError(f"checkpoint '{path}' was written by {state.get('script')}.py, not {script}.py")
    return state


def load_module_state(module: torch.nn.Module, state_dict: dict, what: str) -> None:
    """load_state_dict with a clear message when the checkpoint was made with other shapes or another model."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()
        detail = first_line[1].strip() if len(first_line) > 1 else first_line[0]
        raise UserError(f"checkpoint for {what} does not fit this model ({detail})") from error


def require(checks: list[tuple[bool, str]]) -> None:
    """Argument validation before any work: the first failed (condition, message) becomes a one-line UserError."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def check_finite(loss_value: float, stage: str, step: int) -> None:
    if not np.isfinite(loss_value):
        raise NonFiniteLossError(stage, step, loss_value)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------
class Run:
    """A run directory with its TensorBoard writer, checkpoints, summary and Ctrl-C flag."""

    def __init__(self, args: Any, script: str):
        from torch.utils.tensorboard import SummaryWriter

        self.script = script
        self.args = args
        self.run_dir = Path(args.run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.latest = self.checkpoint_dir / "latest.pt"
        self.previous = self.checkpoint_dir / "previous.pt"
        self.device = resolve_device(args.device)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--run-dir '{self.run_dir}' is a file, not a folder")
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"--run-dir '{self.run_dir}' cannot be made ({error.strerror})") from None
        self._check_run_dir()
        self.lock = ExclusiveLock(self.run_dir / ".lock", f"run directory '{self.run_dir}'")
        try:
            self._check_run_dir()  # again, now that no other process can be starting in it
        except UserError:
            self.lock.release()
            raise
        for leftover in [*self.checkpoint_dir.glob(".*.tmp*"), *self.run_dir.glob(".*.tmp*")]:
            leftover.unlink()  # half-written files of a process killed while saving
        (self.run_dir / "args.json").write_text(json.dumps(args_to_dict(args), indent=2, default=str))
        self.writer = SummaryWriter(str(self.run_dir))
        self.writer.add_text("hyperparameters", arguments_table(args))
        self._interrupted = False
        self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _check_run_dir(self) -> None:
        if self.args.resume:
            if not (self.latest.exists() or self.previous.exists()):
                raise UserError(f"--resume: no checkpoint in '{self.checkpoint_dir}' to resume from")
        elif self.latest.exists():
            raise UserError(f"'{self.run_dir}' already holds a run; pass --resume to continue it or pick another --run-dir")

    def _on_sigint(self, signum, frame) -> None:
        if self._interrupted:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nCtrl-C: saving a checkpoint at the next step (press again to abort without saving)", file=sys.stderr)

    def interrupted(self) -> bool:
        return self._interrupted

    def save_checkpoint(self, state: dict) -> Path:
        """Write latest.pt atomically, keeping the one before it as previous.pt."""
        payload = dict(state, format=CHECKPOINT_FORMAT, script=self.script, args=args_to_dict(self.args))
        atomic_write_bytes(self.latest, lambda handle: torch.save(payload, handle), keep_previous=self.previous)
        crash_at = os.environ.get(CRASH_AFTER_CHECKPOINT, "")
        if crash_at:
            stage, _, step = crash_at.rpartition("@")
            if state["stage"] == stage and state["step"] >= int(step):
                os.kill(os.getpid(), signal.SIGKILL)
        return self.latest

    def load_checkpoint(self) -> dict | None:
        """The newest readable checkpoint of this run (falling back to previous.pt if latest.pt is damaged)."""
        candidates = [path for path in (self.latest, self.previous) if path.exists()]
        errors = []
        for path in candidates:
            try:
                return read_checkpoint_file(path, self.script)
            except CorruptCheckpointError as error:  # another script's checkpoint is not skipped: that is a mistake
                errors.append(str(error))
                print(f"warning: {error}; trying the previous checkpoint", file=sys.stderr)
        if errors:
            raise UserError(f"no readable checkpoint in '{self.checkpoint_dir}': {errors[-1]}")
        return None

    def write_summary(self, summary: dict) -> None:
        text = json.dumps(summary, indent=2, default=float)
        atomic_write_bytes(self.run_dir / "summary.json", lambda handle: handle.write(text.encode()))

    def close(self) -> None:
        self.writer.close()
        signal.signal(signal.SIGINT, self._previous_handler)
        self.lock.release()


def start_run(args: Any, script: str) -> Run:
    """Resolve the run directory, set CPU threads, seed everything, and open the run."""
    if not args.run_dir:
        if args.resume:
            raise UserError("--resume needs --run-dir pointing at the run to continue")
        args.run_dir = default_run_dir(args.env, args.exp_name, args.seed)
    if args.cpu_threads < 0:
        raise UserError(f"--cpu-threads must be >= 0, got {args.cpu_threads}")
    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    seed_everything(args.seed, args.torch_deterministic)
    return Run(args, script)


# --------------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------------
def stage_stats(returns: np.ndarray, normalized: np.ndarray, actions_per_s: float | None = None,
                success: np.ndarray | None = None) -> dict:
    """An evaluation's record: return and normalised score over the episodes, the success rate where the environment
    reports success (MetaWorld), and the evaluation's speed in environment steps per second when given."""
    returns, normalized = np.asarray(returns, dtype=np.float64), np.asarray(normalized, dtype=np.float64)
    stats = {
        "return_mean": float(returns.mean()),
        "return_std": float(returns.std()),
        "normalized_mean": float(normalized.mean()),
        "normalized_std": float(normalized.std()),
        "episodes": int(returns.size),
    }
    if success is not None:
        stats["success_rate"] = float(np.mean(success))
    return stats if actions_per_s is None else stats | {"eval_actions_per_s": float(actions_per_s)}


def print_results_table(stages: dict[str, dict]) -> None:
    """The final table on stdout: one row per evaluated stage."""
    extra = sorted({key for stats in stages.values() for key in stats} - set(stage_stats([0.0], [0.0])))
    header = ["stage", "return", "normalized", "episodes", *extra]
    rows = []
    for name, stats in stages.items():
        rows.append([
            name,
            f"{stats['return_mean']:.3f} +- {stats['return_std']:.3f}",
            f"{stats['normalized_mean']:.1f} +- {stats['normalized_std']:.1f}",
            str(stats["episodes"]),
            *[f"{stats[key]:.3f}" if isinstance(stats.get(key), float) else str(stats.get(key, "")) for key in extra],
        ])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * width for width in widths], *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))


class Timer:
    """`with Timer() as timer: ...` then `timer.seconds` (synchronises CUDA so GPU work is counted)."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        return False


# --------------------------------------------------------------------------------------------------------------
# GPU speed: CUDA graphs
# --------------------------------------------------------------------------------------------------------------
class CudaGraphed:
    """`function(*tensors)`, replayed from CUDA graphs: one graph per input shape, captured after `warmup` eager calls
    of that shape. The small networks of these methods are launch-bound on a GPU: a training step or a sampler call
    launches hundreds of kernels of a few microseconds each, and one graph replay launches them all at once
    (benchmark_results/gpu.md: 5-20x faster steps). Every call does the work exactly once (warm-up calls are real
    calls), so a training step wrapped here is still one step per call.

    Contract for `function`: its tensor inputs are the arguments (device tensors, copied into static buffers on every
    call); everything else it reads (weights, optimiser state, datasets) keeps its storage; it makes no host-device
    syncs; random numbers come from the default CUDA generator or from `generators`. Returned tensors are static
    buffers overwritten by the next call: use them (or copy them) before calling again. An optimiser stepped inside
    must be made with capturable=True. If a capture fails, a warning says why and the function runs eagerly from
    then on."""

    def __init__(self, function: Callable, warmup: int = 2, generators: tuple = ()):
        self.function, self.warmup, self.generators = function, warmup, generators
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], Any]] = {}
        self.eager_calls: dict[tuple, int] = {}
        self.failed = False

    def __call__(self, *inputs: torch.Tensor):
        if self.failed:
            return self.function(*inputs)
        key = tuple((tuple(tensor.shape), tensor.dtype) for tensor in inputs)
        if key not in self.graphs:
            if self.eager_calls.get(key, 0) < self.warmup:
                self.eager_calls[key] = self.eager_calls.get(key, 0) + 1
                return self._on_side_stream(inputs)
            if not self._capture(key, inputs):
                return self.function(*inputs)
        graph, static_inputs, outputs = self.graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return outputs

    def _on_side_stream(self, inputs):
        """Warm-up calls run on a side stream, as capture requires (lazy handles and workspaces are made there)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outputs = self.function(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        return outputs

    def _capture(self, key: tuple, inputs) -> bool:
        static_inputs = [tensor.clone() for tensor in inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.generators:
                graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                outputs = self.function(*static_inputs)
        except Exception as error:  # fall back to eager execution; the run goes on
            self.failed = True
            name = getattr(self.function, "__qualname__", repr(self.function))
            print(f"warning: CUDA graph capture of {name} failed ({type(error).__name__}: {error}); running it "
                  "eagerly (--no-cuda-graphs turns graphs off)", file=sys.stderr)
            return False
        self.graphs[key] = (graph, static_inputs, outputs)
        return True


def cuda_graphed(function: Callable, enabled: bool, generators: tuple = ()) -> Callable:
    """`function` replayed from CUDA graphs when `enabled` (a CUDA run with --cuda-graphs), else `function` itself."""
    return CudaGraphed(function, generators=generators) if enabled else function


def use_cuda_graphs(args: Any, device: torch.device) -> bool:
    """CUDA graphs apply only on a GPU; `--cuda-graphs` (default on) chooses them there."""
    return bool(args.cuda_graphs) and device.type == "cuda"
