"""Run many script invocations in parallel and turn their summary.json files into markdown tables.

Used by the benchmark definitions in this folder (`nav1d_tables.py`). Each job is one command with its own run
directory; a job whose summary.json already exists is skipped, so an interrupted benchmark continues where it
stopped. Jobs run `--jobs` at a time in list order, each pinned to one thread so that N jobs use N cores; a job that
loads another run's checkpoint starts once that run has finished, so a sweep ordered seed by seed loses at most the
seeds in flight when it is stopped. On a cluster the same jobs go to SLURM as two job arrays, the second held until
the first has ended (`submit_to_slurm`).
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.sweep import LocalRunner, add_slurm_arguments, report, submit_slurm, wait_for_slurm

REPO_ROOT = Path(__file__).resolve().parents[1]
# common/ modules whose code a Nav1D run never reaches: other datasets' tasks and the D4RL downloader
NOT_RUN_BY_NAV1D = ("common/metaworld_tasks.py", "common/pusht_tasks.py", "common/robomimic_tasks.py",
                    "common/download.py")


@dataclass
class Job:
    """One script run: `python {script}.py {args} --seed S --run-dir DIR`; `needs` is the run directory of the run
    whose checkpoint it loads."""

    script: str
    args: list[str]
    seed: int
    run_dir: Path
    tags: dict = field(default_factory=dict)
    needs: Path | None = None

    @property
    def command(self) -> list[str]:
        return [sys.executable, f"{self.script}.py", *self.args, "--seed", str(self.seed), "--run-dir", str(self.run_dir)]

    @property
    def name(self) -> str:
        return self.run_dir.name

    @property
    def summary_path(self) -> Path:
        return self.run_dir / "summary.json"

    def finished(self) -> bool:
        return self.summary_path.exists()

    def summary(self) -> dict | None:
        return json.loads(self.summary_path.read_text()) if self.summary_path.exists() else None

    @property
    def log_path(self) -> Path:
        return self.run_dir.parent / "logs" / f"{self.run_dir.name}.log"

    @property
    def commits_path(self) -> Path:
        """One line per launch of this run (a resumed run may span commits): the commit its code came from."""
        return self.run_dir.parent / "logs" / f"{self.run_dir.name}.commits"

    @property
    def code_paths(self) -> tuple[str, ...]:
        """The files whose version decides this run's numbers (git pathspecs). A Nav1D run leaves out the modules
        only other datasets run (the loader matches Nav1D names before it calls them), so work on those datasets does
        not make a half-finished Nav1D sweep start again."""
        paths = (f"{self.script}.py", "nav1d.py", "common")
        if self.env.startswith("nav1d"):
            paths += tuple(f":(exclude){module}" for module in NOT_RUN_BY_NAV1D)
        return paths

    @property
    def env(self) -> str:
        return self.args[self.args.index("--env") + 1] if "--env" in self.args else ""

    def commits(self) -> list[str]:
        """The commits that last changed this run's code, as of each launch ('+uncommitted' kept)."""
        if not self.commits_path.exists():
            return []
        versions = []
        for head in self.commits_path.read_text().split():
            commit, dirty, _ = head.partition("+")
            versions.append(last_change(commit, self.code_paths) + ("+uncommitted" if dirty else ""))
        return versions


def run_jobs(jobs: list[Job], parallel: int, after_each: Callable[[Job], None] | None = None) -> list[Job]:
    """Run the jobs that have no summary yet through the sweeps' local executor (submitit), `parallel` at a time:
    whenever a worker is free, the first job in list order whose base run (the run it loads) has ended, so no worker
    idles waiting for a base while another run could go. Calls `after_each` (from this thread) after each run that
    finished; returns the ones that failed, or were skipped because the run they need failed."""
    pending = [job for job in jobs if not job.summary_path.exists()]
    print(f"{len(jobs) - len(pending)} of {len(jobs)} runs already done; running {len(pending)} with {parallel} in parallel")
    if not pending:
        return []
    listed, not_ended = set(), {job.run_dir for job in pending}
    for job in pending:  # list order is the order of a sweep stopped part-way, and of the SLURM arrays
        if job.needs in not_ended and job.needs not in listed:
            raise ValueError(f"{job.run_dir.name} is listed before {job.needs.name}, the run it needs")
        listed.add(job.run_dir)
    local = LocalRunner(pending[0].run_dir.parent / "submitit")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    failed: list[Job] = []
    waiting, running = list(pending), {}
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        while waiting or running:
            for job in [job for job in waiting if job.needs not in not_ended]:
                if len(running) == parallel:
                    break
                waiting.remove(job)
                if job.needs is not None and not (job.needs / "summary.json").exists():
                    print(f"skipped {job.run_dir.name}: {job.needs.name}, the run it loads, did not finish", flush=True)
                    failed.append(job)
                    not_ended.discard(job.run_dir)
                    continue
                running[pool.submit(run_command, local, job, env, failed)] = job
            if not running:  # only skipped jobs were left
                continue
            ended, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in ended:
                job = running.pop(future)
                future.result()
                not_ended.discard(job.run_dir)
                if after_each is not None and job.summary_path.exists():
                    after_each(job)
    return failed


def run_command(local: LocalRunner, job: Job, env: dict, failed: list[Job]) -> None:
    """One job through the sweep engine's run function (a killed earlier attempt continues with --resume), its
    output to its log."""
    record_launch(job)
    start = time.time()
    returncode = local.run(job.command, job.run_dir, job.log_path, env)
    status = "ok" if returncode == 0 else f"FAILED (exit {returncode}, see {job.log_path})"
    print(f"[{time.time() - start:6.0f}s] {shlex.join(job.command[1:])}: {status}", flush=True)
    if returncode != 0:
        failed.append(job)


def seed_by_seed(first: list[Job], dependent: list[Job]) -> list[Job]:
    """Each seed's runs (shared ones once), every run before the runs that load it: a sweep stopped part-way leaves
    whole seeds behind, not base runs whose dependent runs would have to train them again."""
    unique = list({job.run_dir: job for job in first + dependent}.values())
    return sorted(unique, key=lambda job: (job.seed, job.needs is not None))


def add_benchmark_arguments(parser) -> None:
    """The options every benchmark table shares: where runs go, how they run (here or on SLURM), report only."""
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="local: runs in parallel (one thread each)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables/figures from finished runs")
    add_slurm_arguments(parser)


def run_benchmark(jobs: list[Job], out: Path, archive: Path, options) -> bool:
    """A benchmark's runs, in order: described as a sweep in `out` (for benchmarks.aggregate), finished runs of the
    same code restored from `archive`, the rest run here or submitted to SLURM, every finished run archived. Returns
    whether the tables can be written now (not after a --no-wait submission)."""
    write_sweep_description(jobs, out)
    restored = restore_summaries(jobs, archive, same_code_only=not options.report_only)
    if restored:
        print(f"{restored} runs restored from {archive.name} (made with this checkout's code)")
    if options.report_only:
        return True
    if options.executor == "slurm":
        try:
            job_ids = submit_to_slurm(jobs, out / "submitit", options)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)
        if job_ids and options.no_wait:
            print("re-launch the same command once the arrays have ended: it archives the runs, writes the tables")
            return False
        if job_ids:
            wait_for_slurm(job_ids, options.poll_s)
        archive_summaries(jobs, archive)
        failed = [job for job in jobs if not job.finished()]
    else:
        failed = run_jobs(jobs, options.jobs, after_each=lambda job: archive_summaries([job], archive))
    if failed:
        report(jobs)
        print(f"{len(failed)} runs failed or were skipped because their base run failed; their rows are incomplete",
              file=sys.stderr)
    return True


def record_launch(job: Job) -> None:
    job.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(job.commits_path, "a") as commits:
        commits.write(git_commit(job.code_paths) + "\n")


def submit_to_slurm(jobs: list[Job], folder: Path, options) -> list[str]:
    """The jobs without a summary as at most two SLURM job arrays (benchmarks.sweep's submission, `options` its SLURM
    options): the runs that load no unfinished run, then the runs that load one of those, which SLURM holds until the
    first array has left the queue (a job array has no order of its own). Each run gets `options.cpus_per_task`
    threads. Returns the job ids of both arrays' tasks."""
    pending = list({job.run_dir: job for job in jobs if not job.finished()}.values())
    first = [job for job in pending if job.needs is None or (job.needs / "summary.json").exists()]
    second = [job for job in pending if job not in first]
    unsubmitted = {job.needs.name for job in second} - {job.name for job in first}
    if unsubmitted:
        raise ValueError(f"runs load {', '.join(sorted(unsubmitted))}, which neither finished nor is submitted "
                         "first (runs that load a run that loads another need more than two arrays)")
    os.environ.update(OMP_NUM_THREADS=str(options.cpus_per_task), MKL_NUM_THREADS=str(options.cpus_per_task))
    for job in pending:
        record_launch(job)
    job_ids = submit_slurm(first, folder, options) if first else []
    if first:
        print(f"submitted SLURM job array {job_ids[0].split('_')[0]} ({len(first)} runs that load no other run)")
    if second:
        after = [job_ids[0].split("_")[0]] if first else []
        second_ids = submit_slurm(second, folder, options, after=after)
        print(f"submitted SLURM job array {second_ids[0].split('_')[0]} ({len(second)} runs that load a checkpoint"
              + (f", held until array {after[0]} has ended)" if after else ")"))
        job_ids += second_ids
    return job_ids


def write_sweep_description(jobs: list[Job], out: Path) -> None:
    """out/sweep.json in benchmarks.sweep's form (each run's dataset, seed and tags as its values), so that
    `python -m benchmarks.aggregate --out OUT` tabulates these runs like any sweep's."""
    options = sorted({key for job in jobs for key in job.tags})
    points = [{"name": job.run_dir.name, "env": job.args[job.args.index("--env") + 1], "seed": job.seed,
               "values": {key: str(job.tags.get(key, "")) for key in options}}
              for job in {job.run_dir: job for job in jobs}.values()]
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"script": "several", "options": options, "points": points}, indent=1)
                                    + "\n")


def archive_summaries(jobs: list[Job], archive: Path) -> None:
    """Merge every finished run's summary and commit record into `archive` (JSON, one entry per run directory name):
    the raw numbers behind a table, small enough to commit beside it."""
    entries = json.loads(archive.read_text()) if archive.exists() else {}
    for job in jobs:
        summary = job.summary()
        if summary is not None:
            entries[job.run_dir.name] = {"commits": job.commits_path.read_text().split(),
                                         "args": portable_args(job), "summary": summary}
    archive.write_text(json.dumps(entries, indent=1, sort_keys=True) + "\n")


def portable_args(job: Job) -> list[str]:
    """The job's arguments with its output folder written as {out}: the same run wherever the sweep's folder is."""
    return [arg.replace(str(job.run_dir.parent), "{out}") for arg in job.args]


def restore_summaries(jobs: list[Job], archive: Path, same_code_only: bool = True) -> int:
    """Put archived results back for runs that have none yet. To continue a sweep (`same_code_only`), only runs made
    with the code this checkout has (the same last change of the run's code, no uncommitted edits) and the same
    arguments (entries archived before arguments were recorded never): finished runs are then not trained again,
    and neither an edit to the code nor another option lets old numbers pass for new ones. To rebuild tables,
    all of them (each table names the code its runs used). An archive holds no checkpoints, so a sweep does not restore
    a run that another run still to be made loads: it trains again (with its seed, to the same numbers)."""
    if not archive.exists():
        return 0
    entries = json.loads(archive.read_text())
    checkout = {}  # code paths -> (HEAD with '+uncommitted' when edited, the last commit that changed them)

    def restorable(job: Job) -> bool:
        entry = entries.get(job.run_dir.name)
        if entry is None or job.summary_path.exists() or job.run_dir.exists():
            return False
        if not same_code_only:
            return True
        if entry.get("args") != portable_args(job):
            return False
        if job.code_paths not in checkout:
            head = git_commit(job.code_paths)
            checkout[job.code_paths] = head, last_change(head.partition("+")[0], job.code_paths)
        head, version = checkout[job.code_paths]
        return "+" not in head and all("+" not in made and last_change(made, job.code_paths) == version
                                       for made in entry["commits"])

    coming_back = {job.run_dir for job in jobs if restorable(job)}
    if same_code_only:
        coming_back -= {job.needs for job in jobs if job.run_dir not in coming_back and not job.summary_path.exists()}
    restored = 0
    for job in jobs:  # a run two tables share is listed twice
        if job.run_dir not in coming_back or job.run_dir.exists():
            continue
        entry = entries[job.run_dir.name]
        job.run_dir.mkdir(parents=True)
        job.summary_path.write_text(json.dumps(entry["summary"]))
        job.commits_path.parent.mkdir(parents=True, exist_ok=True)
        job.commits_path.write_text("".join(made + "\n" for made in entry["commits"]))
        restored += 1
    return restored


def load_finished_run(run_dir: Path, script, stage: str) -> tuple[dict, object]:
    """The latest checkpoint of a run of `script` (the imported script module) that finished `stage`, and the run's
    arguments as the script's Args; a UserError (one line) otherwise."""
    from common.training import check_loadable

    checkpoint = check_loadable(str(run_dir / "checkpoints" / "latest.pt"), script.SCRIPT, stage)
    fields = script.Args.__dataclass_fields__
    return checkpoint, script.Args(**{key: tuple(value) if isinstance(value, list) else value
                                      for key, value in checkpoint["args"].items() if key in fields})


def print_report(make_report: Callable[[], dict], describe: Callable[[dict], str], json_path: Path | None) -> int:
    """A diagnosis as a command: its text on stdout, its numbers in `json_path` if given; a UserError is one line on
    stderr and exit code 2."""
    from common.runtime import UserError

    try:
        report = make_report()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(describe(report))
    if json_path:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def git_commit(paths: tuple[str, ...] = ()) -> str:
    """Short HEAD, with '+uncommitted' when tracked files (of `paths` only, if given) differ from it."""
    result = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths], cwd=REPO_ROOT,
                           capture_output=True, text=True).stdout.strip()
    return result.stdout.strip() + ("+uncommitted" if dirty else "")


@functools.cache
def last_change(commit: str, paths: tuple[str, ...]) -> str:
    """The last commit at or before `commit` that changed `paths` (`commit` itself if git cannot tell); cached, as
    a table asks the same question for every run made at one commit."""
    result = subprocess.run(["git", "log", "-1", "--format=%h", commit, "--", *paths], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    return result.stdout.strip() or commit


def device_name(device: str) -> str:
    """The accelerator's name for a cuda device, else the CPU and how many cores this process can see."""
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible)"


def mean_std(values: list[float], digits: int = 2) -> str:
    """'mean ± std' over seeds (population std, as the spread of the seeds that were run)."""
    if not values:
        return "—"
    array = np.asarray(values, dtype=np.float64)
    return f"{array.mean():.{digits}f} ± {array.std():.{digits}f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
