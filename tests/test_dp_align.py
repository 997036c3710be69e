"""dp_align.py: loss unit tests, argument errors, smoke runs of every sampler with every method it supports,
Ctrl-C + --resume, and a tiny Hopper-v5 Minari dataset end to end."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import dp_align
from conftest import alignment_stages, make_tiny_hopper_dataset
from common.diffusion import Diffusion
from common.nets import MLPDenoiser, lora_parameters, policy_with_reference

SCRIPT = dp_align.__file__
# Tiny Nav1D runs: every stage a few steps, small networks, few evaluation episodes.
TINY = ["--foundation-steps", "20", "--critic-steps", "20", "--rl-steps", "2", "--qvpg-steps", "2", "--dpo-steps", "2",
        "--sft-steps", "2", "--cascade-steps", "2", "--eval-episodes", "4", "--hidden", "16", "--critic-hidden", "16",
        "--batch-size", "32", "--align-batch", "4", "--group-size", "4", "--sample-steps", "4", "--train-steps", "8",
        "--log-every", "1", "--num-candidates", "4"]


def run_script(tmp_path, *args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def small_model(seed=0):
    torch.manual_seed(seed)
    return MLPDenoiser(1, 2, 2, hidden=16, layers=2)


# ----------------------------------------------------------------------------------------------------------------
# Loss unit tests
# ----------------------------------------------------------------------------------------------------------------
def test_lora_reference_equals_the_foundation_after_training():
    foundation = small_model().requires_grad_(False)  # as the script's foundation (an EMA copy) is
    x, t, cond = torch.randn(8, 2, 1), torch.rand(8), torch.randn(8, 2)
    for rank in (4, 0):
        policy, reference = policy_with_reference(foundation, lora_rank=rank, lora_alpha=8.0)
        torch.testing.assert_close(policy(x, t, cond), foundation(x, t, cond))
        trainable = [p for p in policy.parameters() if p.requires_grad]
        with torch.no_grad():
            for parameter in trainable:
                parameter.add_(0.1 * torch.randn_like(parameter))
        assert not torch.allclose(policy(x, t, cond), foundation(x, t, cond))
        torch.testing.assert_close(reference(x, t, cond), foundation(x, t, cond))
        assert all(not p.requires_grad for p in foundation.parameters())  # it never unfreezes the foundation
    assert all(p.requires_grad for p in lora_parameters(policy_with_reference(foundation, 4, 8.0)[0]))


@pytest.mark.parametrize("backbone", ["dit", "mlp"])
def test_cascade_equals_the_foundation_at_initialisation(backbone):
    args = dp_align.Args(backbone=backbone, hidden=16, depth=2, heads=2, pred_horizon=2)
    foundation = dp_align.build_denoiser(args, action_dim=1, cond_dim=2)
    with torch.no_grad():  # a trained-looking foundation: DiT starts with zero output layers
        for parameter in foundation.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    cascade = dp_align.CascadeDenoiser(args, foundation, action_dim=1, obs_cond_dim=2)
    x, t, cond, sample = torch.randn(8, 2, 1), torch.rand(8), torch.randn(8, 2), torch.randn(8, 2, 1)
    torch.testing.assert_close(cascade(x, t, torch.cat([cond, sample.flatten(1)], 1)), foundation(x, t, cond))


@pytest.mark.parametrize("sampler,prediction", [("ddpm", "eps"), ("ddim", "x0"), ("ddim", "velocity"), ("fm", None)])
def test_clipped_sampling_stays_in_the_action_box_and_leaves_in_box_predictions_alone(sampler, prediction):
    diffusion = Diffusion(sampler, 4, prediction=prediction, clip_x0=1.0)
    model = small_model()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(20)  # a wild network: unclipped samples would leave the box by far
        chunks = diffusion.sample(model, (2, 1), torch.randn(64, 2)).x0
    assert chunks.abs().max() <= 1 + 1e-5
    x, t, x0 = torch.randn(32, 2, 1), diffusion.sample_train_time(32, "cpu"), torch.rand(32, 2, 1) * 1.8 - 0.9
    noise = (x - diffusion.add_noise(x0, t, torch.zeros_like(x0))) / diffusion.noise_levels(t)[1].view(-1, 1, 1)
    target = diffusion.training_target(x0, noise, t)  # the exact output for a clean chunk inside the box
    exact_network = lambda x_t, t_, cond: target
    torch.testing.assert_close(diffusion.with_clipped_x0(exact_network)(x, t, None), target, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Argument errors: exit code 2, one line
# ----------------------------------------------------------------------------------------------------------------
def test_deterministic_sampler_with_rl_exits_2_with_one_line_before_any_work(tmp_path):
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "run"), "--sampler", "fm",
                        "--align", "qvpg,rl")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "qvpg" in result.stderr and "--eta" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_deterministic_sampler_without_a_cascade_ignores_the_cascades_default_rl():
    assert dp_align.validate(dp_align.Args(sampler="fm", align="qvpg,dpo,sft"))[0] == ["qvpg", "dpo", "sft"]


@pytest.mark.parametrize("fields,needle", [
    (dict(sampler="ddim", align="dpo,rl"), "--eta"),
    (dict(sampler="ddim", eta=0.5, align="rl"), None),
    (dict(align="rl,magic"), "--align takes"),
    (dict(align=""), "--align takes"),
    (dict(align="rl,dpo,rl"), "names a method twice"),
    (dict(sampler="fm", align="qvpg,cascade"), "--cascade-align rl"),
    (dict(align="cascade", cascade_align="rl,cascade"), "--cascade-align takes"),
    (dict(qvpg_k=99), "--qvpg-k"),
    (dict(sft_quantile=0.0), "--sft-quantile"),
    (dict(sft_data_weight=-1.0), "--sft-data-weight must be >= 0"),
    (dict(group_size=1), "--group-size"),
    (dict(action_horizon=4, pred_horizon=2), "--action-horizon"),
])
def test_argument_validation(fields, needle):
    args = dp_align.Args(**fields)
    if needle is None:
        assert dp_align.validate(args) == (["rl"], ["rl"])
    else:
        with pytest.raises(dp_align.UserError, match=needle):
            dp_align.validate(args)


# ----------------------------------------------------------------------------------------------------------------
# Smoke runs: every sampler with every method it supports (one run per sampler), spreading the options over them
# ----------------------------------------------------------------------------------------------------------------
SMOKE_RUNS = {
    "ddpm": ["--align", "rl,qvpg,dpo,sft,cascade", "--credit", "similarity", "--kl-coef", "0.1",
             "--entropy-coef", "0.1", "--selection", "idql"],
    "ddim": ["--align", "qvpg,dpo,sft,cascade", "--cascade-align", "qvpg,dpo,sft", "--qvpg-random-k", "--kl-coef", "0.1", "--backbone", "mlp",
             "--selection", "softmax", "--lora-rank", "0"],
    "ddim-eta": ["--sampler", "ddim", "--eta", "0.5", "--align", "rl,cascade", "--rl-algo", "reinforce",
                 "--credit", "decay", "--passes", "2", "--online-episodes", "3", "--online-critic-steps", "2"],
    "sm": ["--align", "rl,qvpg,dpo,sft,cascade", "--sft-source", "reference", "--prediction", "x0"],
    "fm": ["--align", "qvpg,dpo,sft,cascade", "--cascade-align", "", "--kl-coef", "0.1", "--obs-horizon", "2", "--pred-horizon", "4",
           "--action-horizon", "2"],
}


@pytest.mark.parametrize("name", list(SMOKE_RUNS))
def test_smoke_run(tmp_path, name):
    sampler = name.split("-")[0]
    run_dir = tmp_path / "run"
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(run_dir), "--sampler", sampler, *TINY,
                        *SMOKE_RUNS[name])
    assert result.returncode == 0, result.stderr[-3000:]
    passes = 2 if "--passes" in SMOKE_RUNS[name] else 1
    stages = summary(run_dir)["stages"]
    expected = ["foundation"] + [f"pass{p}/{stage}" for p in range(1, passes + 1)
                                 for stage in alignment_stages(SMOKE_RUNS[name])] + ["aligned"]
    assert list(stages) == expected
    for name in ["foundation"] + [stage for stage in expected if stage.startswith("pass") and "cascade" not in stage]:
        assert stages[name]["denoising_error"] > 0 and 0 <= stages[name]["actions_at_bounds"] <= 1  # the monitor
    for stats in stages.values():
        assert np.isfinite(stats["return_mean"]) and 0 <= stats["coherency"] <= 1 and stats["episodes"] == 4
    data = summary(run_dir)
    assert set(data["coherency"]) == set(expected)
    assert {"foundation_steps_per_s", "critic_steps_per_s", "action_latency_ms"} <= set(data["throughput"])
    assert list((run_dir).glob("events.out.tfevents*"))


def test_ctrl_c_saves_and_resume_finishes_the_run(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--env", "nav1d-full", "--run-dir", str(run_dir), *TINY, "--align", "dpo,sft", "--save-every", "5"]
    process = subprocess.Popen([sys.executable, SCRIPT, *common, "--foundation-steps", "1000000"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = run_dir / "checkpoints" / "latest.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted: checkpoint saved to" in stderr
    interrupted_at = torch.load(checkpoint, weights_only=False)
    assert interrupted_at["stage"] == "foundation" and interrupted_at["step"] >= 5

    resumed = run_script(tmp_path, *common, "--foundation-steps", str(interrupted_at["step"] + 10), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming stage foundation at step {interrupted_at['step']}" in resumed.stdout
    assert list(summary(run_dir)["stages"]) == ["foundation", "pass1/dpo", "pass1/sft", "aligned"]

    # A second --resume with one more pass skips every finished stage and runs only pass 2.
    extended = run_script(tmp_path, *common, "--foundation-steps", str(interrupted_at["step"] + 10), "--resume",
                          "--passes", "2")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "[foundation]" not in extended.stdout and "[pass1/dpo]" not in extended.stdout
    stages = summary(run_dir)["stages"]
    assert list(stages) == ["foundation", "pass1/dpo", "pass1/sft", "pass2/dpo", "pass2/sft", "aligned"]


def test_same_seed_same_numbers_stages_load_from_another_run_and_non_finite_loss_stops(tmp_path):
    args = ["--env", "nav1d-full", *TINY, "--align", "rl"]
    first, second = (run_script(tmp_path, *args, "--run-dir", str(tmp_path / name)) for name in ("a", "b"))
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-3000:]
    assert summary(tmp_path / "a")["stages"] == summary(tmp_path / "b")["stages"]

    checkpoint = str(tmp_path / "a" / "checkpoints" / "latest.pt")
    reuse = run_script(tmp_path, *args, "--run-dir", str(tmp_path / "reuse"), "--load-foundation", checkpoint,
                       "--load-critic", checkpoint)
    assert reuse.returncode == 0, reuse.stderr[-3000:]
    assert "foundation loaded from" in reuse.stdout and "critic loaded from" in reuse.stdout
    assert "foundation_steps_per_s" not in summary(tmp_path / "reuse")["throughput"]  # loaded, not trained
    wrong_shape = run_script(tmp_path, *args, "--run-dir", str(tmp_path / "wrong"), "--hidden", "24",
                             "--load-foundation", checkpoint)
    assert wrong_shape.returncode == 2 and "does not fit" in wrong_shape.stderr

    exploding = run_script(tmp_path, *args, "--run-dir", str(tmp_path / "nan"), "--foundation-lr", "1e30")
    assert exploding.returncode == 1
    assert "non-finite loss" in exploding.stderr and "stage 'foundation" in exploding.stderr
    assert not (tmp_path / "nan" / "checkpoints" / "latest.pt").exists()  # nothing non-finite was ever saved


def test_unknown_choices_are_refused_by_the_command_line(tmp_path):
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "run"), "--sampler", "euler")
    assert result.returncode == 2 and "euler" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_without_a_checkpoint_exits_2(tmp_path):
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "empty"), "--resume")
    assert result.returncode == 2 and "no checkpoint" in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# A tiny Hopper-v5 Minari dataset end to end
# ----------------------------------------------------------------------------------------------------------------
def test_tiny_hopper_minari_dataset_end_to_end(tmp_path):
    dataset_id = "mujoco/hopper/dptiny-v0"
    make_tiny_hopper_dataset(dataset_id)
    run_dir = tmp_path / "hopper"
    result = run_script(tmp_path, "--env", dataset_id, "--run-dir", str(run_dir), *TINY, "--eval-episodes", "2",
                        "--eval-max-steps", "20", "--align", "rl,dpo", "--obs-horizon", "2", "--pred-horizon", "4",
                        "--action-horizon", "2", "--sample-steps", "3", "--train-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    data = summary(run_dir)
    assert list(data["stages"]) == ["foundation", "pass1/rl", "pass1/dpo", "aligned"]
    assert "coherency" not in data
    assert all(np.isfinite(stats["normalized_mean"]) for stats in data["stages"].values())
