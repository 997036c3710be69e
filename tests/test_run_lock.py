"""One process per run directory (and per Nav1D dataset being made): a second one is refused naming the holder, the
lock of a process that died is taken over, and half-written files it left are removed."""
import os
import signal
import subprocess
import sys
import time

import pytest

from common.runtime import ExclusiveLock, UserError
from conftest import REPO_ROOT

HOLD = """
import sys, time
from pathlib import Path
from common.runtime import ExclusiveLock
lock = ExclusiveLock(Path(sys.argv[1]), "the test file")
print("locked", flush=True)
time.sleep(60)
"""
TINY = ["--env", "nav1d-full", "--foundation-steps", "1000000", "--critic-steps", "2", "--rl-steps", "2",
        "--hidden", "16", "--critic-hidden", "16", "--batch-size", "8", "--align-batch", "2", "--group-size", "2",
        "--sample-steps", "2", "--train-steps", "4", "--eval-episodes", "2", "--num-candidates", "2", "--align", "rl",
        "--save-every", "5", "--log-every", "1", "--cpu-threads", "1"]


def start(arguments: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *arguments], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_a_held_lock_names_its_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    path = tmp_path / "x.lock"
    holder = start(["-c", HOLD, str(path)])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"the test file is in use by process {holder.pid}"):
            ExclusiveLock(path, "the test file")
    finally:
        holder.kill()
        holder.wait()
    lock = ExclusiveLock(path, "the test file")  # the OS dropped the dead process's lock; its pid is still written
    assert f"taking over the test file from process {holder.pid}" in capsys.readouterr().err
    assert path.read_text().strip() == str(os.getpid())
    lock.release()
    ExclusiveLock(path, "the test file").release()  # a cleanly released lock leaves nothing to take over
    assert "taking over" not in capsys.readouterr().err


def test_a_second_process_on_a_live_run_directory_is_refused_and_a_killed_run_resumes_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    first = start(["dp_align.py", "--run-dir", str(run_dir), *TINY])
    try:
        deadline = time.time() + 120
        while not (run_dir / "checkpoints" / "latest.pt").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "dp_align.py", "--run-dir", str(run_dir), *TINY, "--resume"],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert second.stderr.strip() == (f"error: run directory '{run_dir}' is in use by process {first.pid}; "
                                         "wait for it to end or use another one")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    leftover = run_dir / "checkpoints" / ".latest.pt.tmp999999"
    leftover.write_bytes(b"half a checkpoint")
    resumed = subprocess.run([sys.executable, "dp_align.py", "--run-dir", str(run_dir), *TINY, "--resume",
                              "--foundation-steps", "10"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"taking over run directory '{run_dir}' from process {first.pid}" in resumed.stderr
    assert not leftover.exists() and (run_dir / "summary.json").exists()


def test_two_processes_making_the_same_nav1d_dataset_both_get_it(tmp_path):
    make = "from common import nav1d; print(nav1d.make_dataset('partial').total_episodes)"
    environment = dict(os.environ, MINARI_DATASETS_PATH=str(tmp_path), OMP_NUM_THREADS="1")
    processes = [subprocess.Popen([sys.executable, "-c", make], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=environment) for _ in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for _, err in outputs]
    assert [out.strip() for out, _ in outputs] == ["1000", "1000"]
