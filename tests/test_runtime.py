"""Run plumbing: presets never override explicit flags, checkpoints are atomic and fall back when damaged."""
import json
from dataclasses import dataclass

import pytest
import torch

from common.runtime import (
    CorruptCheckpointError,
    UserError,
    apply_presets,
    load_module_state,
    read_checkpoint_file,
    start_run,
)


@dataclass
class Args:
    exp_name: str = "test"
    seed: int = 0
    env: str = "nav1d-full"
    device: str = "cpu"
    torch_deterministic: bool = True
    run_dir: str = ""
    resume: bool = False
    cpu_threads: int = 0
    beta: float = 1.0
    steps: int = 5
    preset: str = ""


def test_presets_apply_most_specific_last_and_never_override_the_command_line():
    args = Args(steps=9)  # as tyro leaves it after parsing `--steps 9`
    presets = {"nav1d": {"beta": 2.0, "steps": 7}, "nav1d-full": {"beta": 3.0}, "hopper": {"beta": 9.0}}
    applied = apply_presets(args, presets, argv=["--steps", "9"])
    assert (args.beta, args.steps) == (3.0, 9)
    assert applied == {"beta": 3.0}
    args = Args(beta=0.5)
    apply_presets(args, presets, argv=["--beta=0.5"])
    assert (args.beta, args.steps) == (0.5, 7)
    args = Args(torch_deterministic=False)
    apply_presets(args, {"nav1d": {"torch_deterministic": True}}, argv=["--no-torch-deterministic"])
    assert args.torch_deterministic is False


def test_the_compute_preset_goes_over_the_dataset_presets_and_under_the_command_line():
    presets = {"nav1d": {"beta": 2.0, "steps": 7}}
    compute = {"cpu": {"steps": 3, "cpu_threads": 2}}
    args = Args(preset="cpu", cpu_threads=4)
    applied = apply_presets(args, presets, argv=["--preset", "cpu", "--cpu-threads", "4"], compute_presets=compute)
    assert (args.beta, args.steps, args.cpu_threads) == (2.0, 3, 4)
    assert applied == {"beta": 2.0, "steps": 3}
    args = Args()  # no --preset: the dataset presets alone
    apply_presets(args, presets, argv=[], compute_presets=compute)
    assert (args.beta, args.steps) == (2.0, 7)


def test_checkpoints_rotate_and_fall_back_to_the_previous_one_when_truncated(tmp_path):
    run = start_run(Args(run_dir=str(tmp_path / "run")), script="unit")
    run.save_checkpoint({"step": 1})
    run.save_checkpoint({"step": 2})
    assert run.load_checkpoint()["step"] == 2
    data = run.latest.read_bytes()
    run.latest.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptCheckpointError):
        read_checkpoint_file(run.latest)
    assert run.load_checkpoint()["step"] == 1
    assert json.loads((tmp_path / "run" / "args.json").read_text())["beta"] == 1.0
    run.close()


def test_run_refuses_to_overwrite_and_resume_needs_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="nothing|no checkpoint"):
        start_run(Args(run_dir=str(tmp_path / "empty"), resume=True), script="unit")
    run = start_run(Args(run_dir=str(tmp_path / "run")), script="unit")
    run.save_checkpoint({"step": 1})
    run.close()
    with pytest.raises(UserError, match="already holds a run"):
        start_run(Args(run_dir=str(tmp_path / "run")), script="unit")
    with pytest.raises(UserError, match="written by unit.py, not other.py"):
        start_run(Args(run_dir=str(tmp_path / "run"), resume=True), script="other").load_checkpoint()


def test_shape_mismatch_is_a_user_error():
    with pytest.raises(UserError, match="critic"):
        load_module_state(torch.nn.Linear(3, 2), torch.nn.Linear(4, 2).state_dict(), "critic")
