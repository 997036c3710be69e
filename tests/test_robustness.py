"""Robustness of every script: crashes lose at most `save_every` steps, damaged checkpoints are detected, foreign
checkpoints are refused, and bad input exits with code 2 and one line (no traceback).

Each script's own test file covers its Ctrl-C path, its non-finite-loss stop and same-seed determinism; this file
checks the contracts that all scripts share, the same way for each.
"""
import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.runtime import CRASH_AFTER_CHECKPOINT
from conftest import REPO_ROOT
from test_diffuser_align import TINY as TINY_DIFFUSER
from test_dp_align import TINY as TINY_DP
from test_eda import TINY_NAV1D as TINY_EDA

SAVE_EVERY = 10
STEPS = 30  # of every training stage: checkpoints at 10 and 20 inside it
# For each script: tiny Nav1D arguments that run every stage it has, and the checkpoints after which the run is killed,
# one inside each stage: the evaluations, each alignment method, the cascade's own alignment and the online stage
# included (common.runtime.CRASH_AFTER_CHECKPOINT).
ALIGN_STEPS = [flag for method in ("rl", "qvpg", "dpo", "sft", "cascade") for flag in (f"--{method}-steps", str(STEPS))]
SCRIPTS = {
    "eda_d4rl": ([*TINY_EDA, "--behavior-steps", str(STEPS), "--critic-steps", str(STEPS), "--align-steps",
                  str(STEPS), "--candidate-batch-size", "400"],
                 ["behavior@20", "critic@20", "candidates@1", "alignment@20", "evaluation@1", "evaluation@3"]),
    "dp_align": ([*TINY_DP, "--foundation-steps", str(STEPS), "--critic-steps", str(STEPS), *ALIGN_STEPS,
                  "--align", "rl,qvpg,dpo,sft,cascade", "--passes", "2", "--online-episodes", "2",
                  "--online-critic-steps", str(STEPS)],
                 ["foundation@20", "critic@20", "foundation evaluation@0", "pass1/rl@20", "pass1/qvpg@20",
                  "pass1/dpo@20", "pass1/sft@20", "pass1/cascade@20", "pass1/cascade/rl@20", "pass2/online@20",
                  "pass2/sft@20"]),
    "diffuser_align": ([*TINY_DIFFUSER, "--planner", "dd", "--foundation-steps", str(STEPS), "--critic-steps",
                        str(STEPS), "--inverse-dynamics-steps", str(STEPS), *ALIGN_STEPS,
                        "--align", "rl,qvpg,dpo,sft,cascade"],
                       ["foundation@20", "inverse_dynamics@20", "critic@20", "foundation evaluation@0",
                        "pass1/rl@20", "pass1/qvpg@20", "pass1/dpo@20", "pass1/sft@20", "pass1/cascade@20",
                        "pass1/cascade/rl@20"]),
}
# the arguments of the other tests here: tiny runs with one alignment method
TINY_RUNS = {"eda_d4rl": TINY_EDA, "dp_align": [*TINY_DP, "--align", "dpo"],
             "diffuser_align": [*TINY_DIFFUSER, "--align", "dpo"]}


def script_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run(script: str, *argv: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"{script}.py", *argv], cwd=REPO_ROOT, env=script_env(),
                          capture_output=True, text=True, timeout=timeout)


def read_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def numbers(summary_path: Path) -> dict:
    import json

    return json.loads(summary_path.read_text())["stages"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigkill_in_every_stage_then_resume_matches_an_uninterrupted_run(tmp_path, script):
    """Killed right after a checkpoint inside each stage in turn, resumed each time: the same numbers as a run that
    was never interrupted. After the first kill latest.pt is also truncated, so that resume must use previous.pt."""
    argv, crashes = SCRIPTS[script]
    argv = ["--env", "nav1d-full", *argv, "--save-every", str(SAVE_EVERY)]
    reference = run(script, *argv, "--run-dir", str(tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "crashed"
    command = [sys.executable, f"{script}.py", *argv, "--run-dir", str(run_dir)]
    for index, crash in enumerate(crashes):
        killed = subprocess.run(command + (["--resume"] if index else []), cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=600, env=dict(script_env(), **{CRASH_AFTER_CHECKPOINT: crash}))
        assert killed.returncode == -signal.SIGKILL, (crash, killed.stderr[-3000:])
        state = read_checkpoint(run_dir / "checkpoints" / "latest.pt")
        stage, _, step = crash.rpartition("@")
        assert state["stage"] == stage and state["step"] >= int(step)
        if index == 0:
            latest = run_dir / "checkpoints" / "latest.pt"
            latest.write_bytes(latest.read_bytes()[:1000])
    resumed = subprocess.run(command + ["--resume"], cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resuming.*{crashes[-1].rpartition('@')[0]}", resumed.stdout), resumed.stdout[-2000:]
    assert numbers(run_dir / "summary.json") == numbers(tmp_path / "reference" / "summary.json")


def test_truncated_checkpoint_without_a_previous_one_is_a_clear_error(tmp_path):
    tiny = TINY_RUNS["eda_d4rl"]
    run_dir = tmp_path / "run"
    result = run("eda_d4rl", "--env", "nav1d-full", *tiny, "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "previous.pt").unlink(missing_ok=True)
    (checkpoints / "latest.pt").write_bytes((checkpoints / "latest.pt").read_bytes()[:500])
    resumed = run("eda_d4rl", "--env", "nav1d-full", *tiny, "--run-dir", str(run_dir), "--resume")
    assert resumed.returncode == 2
    assert "corrupt or truncated" in resumed.stderr and "Traceback" not in resumed.stderr


def test_checkpoints_of_another_script_are_refused(tmp_path):
    tiny = TINY_RUNS["eda_d4rl"]
    eda_run = tmp_path / "eda"
    assert run("eda_d4rl", "--env", "nav1d-full", *tiny, "--run-dir", str(eda_run)).returncode == 0
    for script in ("dp_align", "diffuser_align"):
        result = run(script, "--env", "nav1d-full", *TINY_RUNS[script], "--run-dir", str(eda_run), "--resume")
        assert result.returncode == 2, (script, result.stderr[-2000:])
        assert "eda_d4rl.py" in result.stderr and "Traceback" not in result.stderr
        result = run(script, "--env", "nav1d-full", *TINY_RUNS[script], "--run-dir", str(tmp_path / script),
                     "--load-critic", str(eda_run / "checkpoints" / "latest.pt"))
        assert result.returncode == 2, (script, result.stderr[-2000:])
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Bad input: exit code 2, one line on stderr, no traceback, before any work
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_d4rl_files(tmp_path_factory):
    """A truncated HDF5 file and one with NaN rewards, under D4RL names."""
    folder = tmp_path_factory.mktemp("d4rl")
    with h5py.File(folder / "hopper_medium-v2.hdf5", "w") as handle:
        size = 50
        handle["observations"] = np.zeros((size, 11), np.float32)
        handle["actions"] = np.zeros((size, 3), np.float32)
        rewards = np.ones(size, np.float32)
        rewards[7] = np.nan
        handle["rewards"] = rewards
        handle["terminals"] = np.zeros(size, bool)
        handle["timeouts"] = np.arange(size) % 25 == 24
    (folder / "walker2d_medium-v2.hdf5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with h5py.File(folder / "hopper_expert-v2.hdf5", "w") as handle:  # every key there, no rows
        for key, shape, dtype in [("observations", (0, 11), np.float32), ("actions", (0, 3), np.float32),
                                  ("rewards", (0,), np.float32), ("terminals", (0,), bool), ("timeouts", (0,), bool)]:
            handle[key] = np.zeros(shape, dtype)
    return folder


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


BAD_INPUT = {
    "unknown env": (["--env", "no-such-dataset-v9"], ["no-such-dataset-v9", "namespace"]),  # no server lookup
    "dataset not on disk": (["--env", "halfcheetah-medium-v2"], ["halfcheetah-medium-v2"]),
    "truncated dataset file": (["--env", "walker2d-medium-v2"], ["walker2d"]),
    "NaN rewards": (["--env", "hopper-medium-v2"], ["non-finite"]),
    "dataset file without rows": (["--env", "hopper-expert-v2"], ["0 rows"]),
    "resume with nothing": (["--env", "nav1d-full", "--resume"], ["--resume"]),
}
PER_SCRIPT_BAD_INPUT = {
    "eda_d4rl": {"K < 2": ["--K", "1"], "beta <= 0": ["--beta", "0"], "data_ratio > 1": ["--data-ratio", "1.5"],
                 "data_ratio = 0": ["--data-ratio", "0"]},
    "dp_align": {"unknown method": ["--align", "rl,ppo2"], "deterministic sampler with rl":
                 ["--sampler", "ddim", "--align", "rl"], "a method twice": ["--align", "rl,rl"],
                 "no method": ["--align="], "EMA that never moves": ["--ema-decay", "1"],
                 "no PPO epochs": ["--ppo-epochs", "0"]},
    "diffuser_align": {"unknown method": ["--align", "rl,ppo2"], "horizon not a power of two": ["--horizon", "12"],
                       "deterministic sampler with rl": ["--sampler", "fm", "--align", "rl"],
                       "a method twice": ["--align", "dpo,dpo"]},
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_dataset_and_resume_input_exits_2_with_one_line(tmp_path, monkeypatch, broken_d4rl_files, script, case):
    argv, fragments = BAD_INPUT[case]
    monkeypatch.setenv("D4RL_DATASET_DIR", str(broken_d4rl_files))
    result = run(script, *argv, "--run-dir", str(tmp_path / "run"), timeout=120)
    assert_one_line_error(result, *fragments)


@pytest.mark.parametrize("script, case", [(s, c) for s, cases in PER_SCRIPT_BAD_INPUT.items() for c in cases])
def test_bad_arguments_exit_2_with_one_line(tmp_path, script, case):
    result = run(script, "--env", "nav1d-full", *PER_SCRIPT_BAD_INPUT[script][case], "--run-dir",
                 str(tmp_path / "run"), timeout=120)
    assert_one_line_error(result)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_a_run_dir_that_cannot_be_made_exits_2_with_one_line(tmp_path, script, case):
    (tmp_path / "taken").write_text("not a folder")
    run_dir = tmp_path / "taken" / ("" if case == "a file" else "run")
    result = run(script, "--env", "nav1d-full", "--run-dir", str(run_dir), timeout=120)
    assert_one_line_error(result, "--run-dir", str(run_dir))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_data_folder_that_cannot_be_made_exits_2_with_one_line(tmp_path, monkeypatch, script):
    """A Nav1D dataset is made on first use; MINARI_DATASETS_PATH pointing under a file cannot hold it."""
    (tmp_path / "taken").write_text("not a folder")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "taken" / "datasets"))
    result = run(script, "--env", "nav1d-partial", "--run-dir", str(tmp_path / "run"), timeout=120)
    assert_one_line_error(result, str(tmp_path / "taken"))


def test_a_figure_path_that_cannot_be_made_exits_2_with_one_line(tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    result = run("nav1d", "--dataset", "full", "--figure", str(tmp_path / "taken" / "task.png"), timeout=120)
    assert_one_line_error(result, str(tmp_path / "taken"))


def test_a_full_disk_while_saving_exits_2_and_leaves_no_half_file(tmp_path):
    """The file-size limit stands in for a full disk: the first checkpoint larger than it cannot be written."""
    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "dp_align.py", "--env", "nav1d-full", *TINY_DP, "--run-dir",
                             str(run_dir)], cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True,
                            timeout=300, preexec_fn=small_disk)
    assert_one_line_error(result, "File too large", str(run_dir / "checkpoints" / "latest.pt"))
    assert list(run_dir.rglob("*.tmp*")) == []


@pytest.mark.parametrize("script, flag", [("dp_align", "--sampler"), ("diffuser_align", "--sampler"),
                                          ("diffuser_align", "--planner")])
def test_unknown_sampler_or_planner_is_refused(tmp_path, script, flag):
    result = run(script, "--env", "nav1d-full", flag, "nope", "--run-dir", str(tmp_path / "run"), timeout=120)
    assert result.returncode == 2 and "nope" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_diverging_later_stage_keeps_the_last_good_checkpoint(tmp_path, script):
    """The critic blows up after the first stage was checkpointed: the run stops naming the stage, and what is left on
    disk is a readable checkpoint whose weights are all finite."""
    tiny = TINY_RUNS[script]
    run_dir = tmp_path / "diverging"
    result = run(script, "--env", "nav1d-full", *tiny, "--critic-lr", "1e30", "--run-dir", str(run_dir))
    assert result.returncode == 1, result.stderr[-2000:]
    assert "non-finite loss" in result.stderr and "critic" in result.stderr and "step" in result.stderr
    kept = read_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert kept is not None
    tensors = [value for model in kept["models"].values() for value in model.values() if torch.is_tensor(value)]
    assert tensors and all(torch.isfinite(value).all() for value in tensors if value.is_floating_point())


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_takes_the_runs_own_arguments_and_refuses_changing_the_experiment(tmp_path, script):
    tiny = TINY_RUNS[script]
    run_dir = tmp_path / "run"
    first_stage_steps = {"eda_d4rl": "--behavior-steps"}.get(script, "--foundation-steps")
    made = run(script, "--env", "nav1d-partial", *tiny, "--run-dir", str(run_dir))
    assert made.returncode == 0, made.stderr[-3000:]
    saved = (run_dir / "args.json").read_text()
    files = sorted(path.name for path in run_dir.iterdir())

    for changed, flag in ((["--env", "nav1d-full"], "--env"), ([first_stage_steps, "999"], first_stage_steps),
                          (["--seed", "7"], "--seed")):
        refused = run(script, "--run-dir", str(run_dir), "--resume", *changed)
        assert_one_line_error(refused, flag, "would change the run")
        assert (run_dir / "args.json").read_text() == saved  # nothing in the run directory was touched
        assert sorted(path.name for path in run_dir.iterdir()) == files

    resumed = run(script, "--run-dir", str(run_dir), "--resume", "--cpu-threads", "1")  # nothing else given
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "args.json").read_text())["env"] == "nav1d-partial"
    assert json.loads((run_dir / "summary.json").read_text())["env"] == "nav1d-partial"
