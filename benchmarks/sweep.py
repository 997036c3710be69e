"""A grid of runs of one script (datasets x seeds x hyper-parameter values) on this machine or as a SLURM job array.

    python -m benchmarks.sweep eda_d4rl.py --env hopper-medium-v2,walker2d-medium-v2 --seed 0-4 \\
        --set beta=0.1,0.2,0.5 --out runs/sweeps/eda_beta --executor slurm --partition gpu --time-min 600 \\
        --cpus-per-task 8 --gpus-per-task 1 --array-parallelism 16 -- --preset cpu

Everything after `--` goes to every run unchanged. Each grid point (one dataset, one seed, one value of every --set
option) is one run directory under --out, named from its values (`hopper-medium-v2_beta0.1_s3`), so a re-launch of
the same command finds it again: a point with a summary.json is skipped, a point with a checkpoint but no summary
(a dead node, a cancelled job, a time limit) continues with --resume, the others start. `--executor local` runs the
points on this machine, --workers at a time; `--executor slurm` submits them as one job array through submitit
(one array task per point) and, unless --no-wait, waits until SLURM's queue no longer holds them. Points that end
without a summary are then listed with the end of their log, and the exit code is 1.
`python -m benchmarks.aggregate --out DIR` turns the summaries into a table and a CSV (sweep.json, written here,
tells it which values each run had).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LOG_TAIL_LINES = 5


@dataclass(frozen=True)
class Point:
    """One run of the grid."""

    script: str
    env: str
    seed: int
    values: tuple[tuple[str, str], ...]  # (option without dashes, value) per --set option, in command-line order
    extra: tuple[str, ...]
    out: Path

    @property
    def name(self) -> str:
        parts = [re.sub(r"[^\w.+-]", "-", self.env)] + [f"{option}{value}" for option, value in self.values]
        return "_".join(parts + [f"s{self.seed}"])

    @property
    def run_dir(self) -> Path:
        return self.out / self.name

    @property
    def log_path(self) -> Path:
        return self.out / "logs" / f"{self.name}.log"

    @property
    def command(self) -> list[str]:
        options = [item for option, value in self.values for item in (f"--{option}", value)]
        return [sys.executable, self.script, "--env", self.env, "--seed", str(self.seed), *options, *self.extra,
                "--run-dir", str(self.run_dir)]

    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()


def seed_list(text: str) -> list[int]:
    """'0-4' -> 0..4, '0,2,5' -> those, '1-2,7' -> 1, 2, 7."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if match is None:
            raise ValueError(f"--seed {text!r}: use numbers and ranges such as 0-4 or 0,2,5")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"--seed {text!r}: the range {part} runs backwards")
        seeds += range(first, last + 1)
    return seeds


def setting(text: str) -> tuple[str, list[str]]:
    """'beta=0.1,0.2' -> ('beta', ['0.1', '0.2']); option names may use - or _, as the scripts accept both."""
    option, _, values = text.partition("=")
    if not option or not values:
        raise ValueError(f"--set {text!r}: use OPTION=V1,V2,... (e.g. beta=0.1,0.2)")
    return option.lstrip("-").replace("_", "-"), [value for value in values.split(",") if value]


def grid(script: str, envs: list[str], seeds: list[int], settings: list[tuple[str, list[str]]], extra: list[str],
         out: Path) -> list[Point]:
    """Every combination, seed-major so a stopped sweep has whole seeds."""
    options = [option for option, _ in settings]
    combinations = list(itertools.product(*(values for _, values in settings)))
    return [Point(script, env, seed, tuple(zip(options, combination)), tuple(extra), out)
            for seed in seeds for env in envs for combination in combinations]


def run_point(command: list[str], run_dir: str, log_path: str, env: dict | None = None) -> int:
    """Run one point (in whatever process the executor gives it): continued with --resume when an earlier attempt
    left a checkpoint. Returns the script's exit code; its output goes to the log."""
    if (Path(run_dir) / "checkpoints").is_dir() and not (Path(run_dir) / "summary.json").is_file():
        command = command + ["--resume"]
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        return subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def log_tail(point: Point) -> str:
    if not point.log_path.is_file():
        return "(no log: it never started)"
    lines = point.log_path.read_text(errors="replace").splitlines()
    return "\n".join("    " + line for line in lines[-LOG_TAIL_LINES:])


# submitit's local executor kills a job after 2 minutes unless told otherwise; a local run has no time limit
LOCAL_TIME_LIMIT_MIN = 60 * 24 * 365


class LocalRunner:
    """submitit's local executor, one process per run, shared by the threads that keep `workers` runs going."""

    def __init__(self, folder: Path):
        import submitit

        self.executor = submitit.LocalExecutor(folder=str(folder))
        self.executor.update_parameters(timeout_min=LOCAL_TIME_LIMIT_MIN)
        self.submitting = threading.Lock()

    def run(self, command: list[str], run_dir: Path, log_path: Path, env: dict | None = None) -> int:
        """One run through `run_point`, waited for; its exit code (1 when the executor lost it, said in its log), so
        that one lost run does not stop the others."""
        from submitit.core.utils import UncompletedJobError

        with self.submitting:
            job = self.executor.submit(run_point, command, str(run_dir), str(log_path), env)
        try:
            return job.result()
        except UncompletedJobError as error:
            with open(log_path, "a") as log:
                log.write(f"\nthe local executor lost this run: {str(error).splitlines()[0]}\n")
            return 1


def run_local(points: list[Point], folder: Path, workers: int) -> None:
    """The points on this machine, `workers` at a time."""
    runner = LocalRunner(folder)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(lambda point: runner.run(point.command, point.run_dir, point.log_path), points))


def sbatch_options(text: str) -> dict[str, str]:
    """'--qos=high --account lab --exclusive' -> {'qos': 'high', 'account': 'lab', 'exclusive': ''} for submitit."""
    options: dict[str, str] = {}
    words = shlex.split(text)
    index = 0
    while index < len(words):
        word = words[index]
        if not word.startswith("--"):
            raise ValueError(f"--sbatch {text!r}: expected an option starting with --, found {word!r}")
        key, equals, value = word[2:].partition("=")
        if not equals and index + 1 < len(words) and not words[index + 1].startswith("--"):
            value, index = words[index + 1], index + 1
        options[key.replace("-", "_")] = value
        index += 1
    return options


def submit_slurm(points: list, folder: Path, options: argparse.Namespace, after: list[str] = ()) -> list[str]:
    """One SLURM job array, one task per point (anything with a command, run_dir and log_path); with `after`, the
    array starts only once those jobs have left the queue, however they ended (sbatch --dependency=afterany), so a
    run that loads another run's checkpoint can be submitted with it. Returns the array's job ids."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder))
    parameters = dict(time=options.time_min, cpus_per_task=options.cpus_per_task, job_name=options.job_name,
                      array_parallelism=options.array_parallelism, additional_parameters=sbatch_options(options.sbatch))
    if options.partition:
        parameters["partition"] = options.partition
    if options.gpus_per_task:
        parameters["gpus_per_task"] = options.gpus_per_task
    if after:
        parameters["additional_parameters"]["dependency"] = "afterany:" + ":".join(after)
    executor.update_parameters(**parameters)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    jobs = executor.map_array(run_point, [point.command for point in points], [str(point.run_dir) for point in points],
                              [str(point.log_path) for point in points])
    return [job.job_id for job in jobs]


def wait_for_slurm(job_ids: list[str], poll_s: float) -> None:
    """Until squeue lists none of the jobs (it needs no accounting database, unlike sacct)."""
    while True:
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(job_ids)], capture_output=True, text=True)
        if queued.returncode == 0 and not queued.stdout.strip():
            return
        time.sleep(poll_s)


def report(points: list[Point]) -> int:
    """Print which points lack a summary, with the end of their logs; 1 if any does."""
    missing = [point for point in points if not point.finished()]
    print(f"{len(points) - len(missing)} of {len(points)} runs finished")
    for point in missing:
        print(f"  no summary: {point.name} ({point.log_path})\n{log_tail(point)}")
    return 1 if missing else 0


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("script", help="eda_d4rl.py, dp_align.py or diffuser_align.py")
    parser.add_argument("--env", required=True, help="datasets, comma-separated")
    parser.add_argument("--seed", default="0", help="seeds: 0-4, 0,2,5 or a mix")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=V1,V2",
                        help="a script option and its values; repeat for a grid over several options")
    parser.add_argument("--out", type=Path, required=True, help="the sweep's folder: one run directory per point")
    parser.add_argument("--workers", type=int, default=1, help="local: runs at a time")
    add_slurm_arguments(parser)
    return parser.parse_args(argv), extra


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    """--executor and the SLURM options, shared with the benchmark tables that submit their runs the same way."""
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--partition", default="", help="slurm: partition (sbatch --partition)")
    parser.add_argument("--time-min", type=int, default=60, help="slurm: time limit per run in minutes (--time)")
    parser.add_argument("--cpus-per-task", type=int, default=1, help="slurm: --cpus-per-task")
    parser.add_argument("--gpus-per-task", type=int, default=0, help="slurm: --gpus-per-task")
    parser.add_argument("--array-parallelism", type=int, default=64, help="slurm: array tasks at a time (--array=...%%N)")
    parser.add_argument("--job-name", default="sweep", help="slurm: --job-name")
    parser.add_argument("--sbatch", default="", help="slurm: more sbatch options, e.g. '--qos=high --account=lab'")
    parser.add_argument("--no-wait", action="store_true", help="slurm: submit and return; re-launch later to report")
    parser.add_argument("--poll-s", type=float, default=10.0, help="slurm: seconds between queue checks")


def main(argv: list[str] | None = None) -> int:
    options, extra = parse(sys.argv[1:] if argv is None else argv)
    try:
        script = Path(options.script).name
        if not (REPO_ROOT / script).is_file():
            raise ValueError(f"no script {script} in {REPO_ROOT}")
        settings = [setting(text) for text in options.set]
        envs = [env for env in options.env.split(",") if env]
        points = grid(script, envs, seed_list(options.seed), settings, extra, options.out.resolve())
        if options.workers < 1:
            raise ValueError("--workers must be >= 1")
        sbatch_options(options.sbatch)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = options.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({
        "script": script, "options": [option for option, _ in settings],
        "points": [{"name": point.name, "env": point.env, "seed": point.seed, "values": dict(point.values)}
                   for point in points]}, indent=1) + "\n")
    pending = [point for point in points if not point.finished()]
    print(f"{len(points)} points, {len(points) - len(pending)} finished, {len(pending)} to run "
          f"({sum((point.run_dir / 'checkpoints').is_dir() for point in pending)} of them continue from a checkpoint)")
    if pending and options.executor == "local":
        run_local(pending, out / "submitit", options.workers)
    elif pending:
        job_ids = submit_slurm(pending, out / "submitit", options)
        print(f"submitted SLURM job array {job_ids[0].split('_')[0]} ({len(job_ids)} tasks)")
        if options.no_wait:
            return 0
        wait_for_slurm(job_ids, options.poll_s)
    return report(points)


if __name__ == "__main__":
    sys.exit(main())
