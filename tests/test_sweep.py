"""Sweeps: the grid and its run names, the local executor, re-launches (skip, resume, report), the aggregated table,
and the same sweep as a job array on a real one-node SLURM cluster started by the test (killed mid-run with scancel
and resumed by a re-launch)."""
import argparse
import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import sweep
from benchmarks.runner import Job, run_jobs, submit_to_slurm
from conftest import REPO_ROOT

TINY = ["--foundation-steps", "20", "--critic-steps", "20", "--align", "dpo", "--dpo-steps", "2", "--eval-episodes", "4",
        "--hidden", "16", "--critic-hidden", "16", "--batch-size", "32", "--align-batch", "4", "--group-size", "4",
        "--sample-steps", "4", "--train-steps", "8", "--cpu-threads", "1"]
GRID = ["dp_align.py", "--env", "nav1d-full", "--seed", "0-1", "--set", "dpo-beta=1,10"]
# long enough in its foundation stage to be killed after a checkpoint and before its end
LONG = ["--foundation-steps", "4000", "--save-every", "200", *TINY[2:]]


def launch(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.sweep", *argv], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def aggregate(out: Path) -> list[dict]:
    result = subprocess.run([sys.executable, "-m", "benchmarks.aggregate", "--out", str(out)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(out / "table.csv") as file:
        return list(csv.DictReader(file))


def stages(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["stages"]


def test_the_grid_is_seed_major_with_stable_names_and_bad_specs_are_refused(tmp_path):
    points = sweep.grid("eda_d4rl.py", ["hopper-medium-v2", "local/hopper/medium-replay-v0"], sweep.seed_list("0-1,5"),
                        [sweep.setting("beta=0.1,0.2"), sweep.setting("align_steps=100")], ["--preset", "cpu"], tmp_path)
    assert len(points) == 3 * 2 * 2 and [point.seed for point in points[:4]] == [0, 0, 0, 0]
    assert points[0].name == "hopper-medium-v2_beta0.1_align-steps100_s0"
    assert points[2].name == "local-hopper-medium-replay-v0_beta0.1_align-steps100_s0"
    assert points[0].command[-6:] == ["--align-steps", "100", "--preset", "cpu", "--run-dir", str(points[0].run_dir)]
    assert sweep.sbatch_options("--qos=high --account lab --exclusive") == {"qos": "high", "account": "lab",
                                                                            "exclusive": ""}
    for argv, fragment in [(["--seed", "4-2"], "runs backwards"), (["--set", "beta"], "OPTION=V1,V2"),
                           (["--sbatch", "qos=high"], "starting with --")]:
        result = launch("eda_d4rl.py", "--env", "nav1d-full", "--out", str(tmp_path / "bad"), *argv)
        assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
    assert launch("nope.py", "--env", "nav1d-full", "--out", str(tmp_path / "bad")).returncode == 2


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    result = launch(*GRID, "--out", str(out), "--workers", "2", "--", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_a_local_sweep_runs_every_point_and_a_relaunch_runs_none(local_sweep):
    names = {f"nav1d-full_dpo-beta{beta}_s{seed}" for beta in (1, 10) for seed in (0, 1)}
    assert {path.name for path in local_sweep.iterdir() if (path / "summary.json").is_file()} == names
    logs = {path: path.read_text() for path in (local_sweep / "logs").iterdir()}
    again = launch(*GRID, "--out", str(local_sweep), "--", *TINY)
    assert again.returncode == 0 and "4 finished, 0 to run" in again.stdout
    assert {path: path.read_text() for path in (local_sweep / "logs").iterdir()} == logs  # nothing ran again


def test_the_table_has_mean_and_std_over_seeds_per_value_and_stage(local_sweep):
    table = aggregate(local_sweep)
    assert {(row["dpo-beta"], row["stage"]) for row in table} == {
        (beta, stage) for beta in ("1", "10") for stage in ("foundation", "pass1/dpo", "aligned")}
    row = next(row for row in table if row["dpo-beta"] == "10" and row["stage"] == "aligned")
    returns = [stages(local_sweep / f"nav1d-full_dpo-beta10_s{seed}")["aligned"]["return_mean"] for seed in (0, 1)]
    assert row["seeds"] == "2" and float(row["return_mean"]) == pytest.approx(sum(returns) / 2)
    assert float(row["return_std"]) == pytest.approx(abs(returns[0] - returns[1]) / 2)
    assert "| nav1d-full | 10 | aligned | 2 |" in (local_sweep / "table.md").read_text()


def test_local_runs_have_no_time_limit_as_submitits_default_limit_would_stop_them(tmp_path, monkeypatch):
    """submitit's local executor stops a job after 2 minutes unless told otherwise (warned 30 s before): with that
    default, every sweep run longer than 90 s died. A limit does stop a run, so ours must be long."""
    assert sweep.LocalRunner(tmp_path).executor.parameters["timeout_min"] >= 60 * 24 * 30
    monkeypatch.setattr(sweep, "LOCAL_TIME_LIMIT_MIN", 0.55)  # the warning comes after 3 s
    marker = tmp_path / "finished"
    command = [sys.executable, "-c", f"import time; time.sleep(15); open({str(marker)!r}, 'w')"]
    log = tmp_path / "logs" / "sleeper.log"
    assert sweep.LocalRunner(tmp_path / "limited").run(command, tmp_path / "sleeper", log) != 0
    assert not marker.exists() and "the local executor lost this run" in log.read_text()


def test_a_killed_point_is_resumed_to_the_numbers_of_an_uninterrupted_run_and_a_failed_one_is_reported(tmp_path):
    point = ["dp_align.py", "--env", "nav1d-full", "--seed", "3", "--set", "dpo-beta=10"]
    crashed = subprocess.run([sys.executable, "-m", "benchmarks.sweep", *point, "--out", str(tmp_path / "sweep"), "--",
                              *LONG], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                             env=dict(os.environ, DIFFUSION_CRASH_AFTER_CHECKPOINT="foundation@1000"))
    assert crashed.returncode == 1 and "no summary: nav1d-full_dpo-beta10_s3" in crashed.stdout
    resumed = launch(*point, "--out", str(tmp_path / "sweep"), "--", *LONG)
    assert resumed.returncode == 0 and "1 of them continue from a checkpoint" in resumed.stdout
    assert "--resume" in (tmp_path / "sweep" / "logs" / "nav1d-full_dpo-beta10_s3.log").read_text()
    reference = launch(*point, "--out", str(tmp_path / "reference"), "--", *LONG)
    assert reference.returncode == 0
    name = "nav1d-full_dpo-beta10_s3"
    assert stages(tmp_path / "sweep" / name) == stages(tmp_path / "reference" / name)

    failing = launch("dp_align.py", "--env", "nav1d-full", "--set", "dpo-beta=-1", "--out", str(tmp_path / "bad"), "--",
                     *TINY)
    assert failing.returncode == 1 and "no summary: nav1d-full_dpo-beta-1_s0" in failing.stdout
    assert "error: --dpo-beta must be > 0" in failing.stdout  # the end of its log


# ------------------------------------------------------------------------------------------------------------------
# A real SLURM cluster
# ------------------------------------------------------------------------------------------------------------------
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ensure_slurm_installed() -> None:
    if all(shutil.which(binary) for binary in SLURM_BINARIES):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("SLURM (slurm-wlm, munge) is not installed, and installing it needs root and apt-get")
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        result = subprocess.run(command, capture_output=True, text=True,
                                env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if result.returncode != 0:  # no package mirror reachable: nothing to test against
            pytest.skip(f"installing SLURM failed ({' '.join(command)}: {result.stderr.strip()[-200:]})")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """munged, slurmctld and slurmd on this machine, with a config of their own in a temporary folder; the tests
    reach it through SLURM_CONF."""
    ensure_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("starting slurmd needs root")
    folder = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for sub in ("state", "spool"):
        (folder / sub).mkdir()
    conf = folder / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sweeptest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", f"AuthInfo=socket={folder}/munge.socket", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}", "ReturnToService=2", "MpiDefault=none",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    subprocess.run(["munged", "--force", f"--socket={folder}/munge.socket", f"--pid-file={folder}/munged.pid",
                    f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge.seed"], check=True)
    subprocess.run(["slurmctld", "-i"], check=True)
    subprocess.run(["slurmd", "-N", host], check=True)
    deadline = time.time() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout:
        assert time.time() < deadline, (folder / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    yield folder
    subprocess.run(["scancel", "--partition=test"], capture_output=True)
    for pid_file in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
        if (folder / pid_file).is_file():
            subprocess.run(["kill", (folder / pid_file).read_text().strip()], capture_output=True)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def test_a_slurm_job_array_gives_the_local_sweeps_numbers(slurm_cluster, local_sweep, tmp_path):
    result = launch(*GRID, "--out", str(tmp_path / "slurm"), "--executor", "slurm", "--partition", "test",
                    "--time-min", "10", "--poll-s", "1", "--", *TINY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "submitted SLURM job array" in result.stdout and "(4 tasks)" in result.stdout
    numbers = lambda rows: [{key: value for key, value in row.items() if not key.startswith("wall_time")} for row in rows]
    assert numbers(aggregate(tmp_path / "slurm")) == numbers(aggregate(local_sweep))  # the same but for the time taken


def test_a_job_cancelled_mid_run_is_resumed_by_a_relaunch(slurm_cluster, tmp_path):
    point = ["dp_align.py", "--env", "nav1d-full", "--seed", "4", "--set", "dpo-beta=10", "--executor", "slurm",
             "--partition", "test", "--poll-s", "1"]
    submitted = launch(*point, "--out", str(tmp_path / "sweep"), "--no-wait", "--", *LONG)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job = submitted.stdout.split("submitted SLURM job array ")[1].split()[0]
    checkpoint = tmp_path / "sweep" / "nav1d-full_dpo-beta10_s4" / "checkpoints" / "latest.pt"
    deadline = time.time() + 300
    while not checkpoint.is_file():
        assert time.time() < deadline, "the job never wrote a checkpoint"
        time.sleep(0.2)
    subprocess.run(["scancel", job], check=True)
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        time.sleep(0.5)
    assert not (checkpoint.parent.parent / "summary.json").is_file()  # it was stopped before its end

    relaunched = launch(*point, "--out", str(tmp_path / "sweep"), "--", *LONG)
    assert relaunched.returncode == 0 and "1 of them continue from a checkpoint" in relaunched.stdout
    reference = launch(*point[:7], "--out", str(tmp_path / "reference"), "--", *LONG)
    assert reference.returncode == 0
    name = "nav1d-full_dpo-beta10_s4"
    assert stages(tmp_path / "sweep" / name) == stages(tmp_path / "reference" / name)


def staged_jobs(out: Path) -> list[Job]:
    """A base run and a run that loads its foundation and critic, as the Nav1D methods table pairs them."""
    base = Job("dp_align", ["--env", "nav1d-full", *TINY], 0, out / "base_s0")
    checkpoint = str(base.run_dir / "checkpoints" / "latest.pt")
    variant = Job("dp_align", ["--env", "nav1d-full", "--load-foundation", checkpoint, "--load-critic", checkpoint,
                               *TINY, "--dpo-beta", "1"], 0, out / "variant_s0", needs=base.run_dir)
    return [base, variant]


def test_runs_that_load_a_checkpoint_go_to_slurm_as_a_second_array_held_until_the_first_ends(slurm_cluster, tmp_path):
    parser = argparse.ArgumentParser()
    sweep.add_slurm_arguments(parser)
    options = parser.parse_args(["--executor", "slurm", "--partition", "test", "--time-min", "10", "--poll-s", "1"])
    jobs = staged_jobs(tmp_path / "slurm")
    job_ids = submit_to_slurm(jobs, tmp_path / "slurm" / "submitit", options)
    first, second = sorted({job_id.split("_")[0] for job_id in job_ids}, key=int)
    held = subprocess.run(["squeue", "-h", "-j", second, "-o", "%E"], capture_output=True, text=True).stdout
    assert f"afterany:{first}" in held  # the variant waits on the base's array, not on its own turn in an array
    sweep.wait_for_slurm(job_ids, poll_s=1)
    assert all(job.finished() for job in jobs), [job.log_path.read_text()[-500:] for job in jobs if job.log_path.exists()]
    local = staged_jobs(tmp_path / "local")
    assert run_jobs(local, parallel=2) == []
    for on_slurm, here in zip(jobs, local):
        assert on_slurm.summary()["stages"] == here.summary()["stages"]
    assert submit_to_slurm(jobs, tmp_path / "slurm" / "submitit", options) == []  # nothing left to submit
