"""EDA (eda_d4rl.py): the loss identities, the candidate sampler, and end-to-end smoke runs on Nav1D and Hopper."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import eda_d4rl
from conftest import make_tiny_hopper_dataset
from common.diffusion import Diffusion, VPSDE
from common.runtime import UserError

TINY_NAV1D = ["--behavior-steps", "30", "--critic-steps", "30", "--align-steps", "20", "--K", "4",
              "--eval-episodes", "3", "--sampler-steps", "4", "--log-every", "10", "--save-every", "10",
              "--eval-every", "10", "--hidden", "16", "--critic-hidden", "16", "--behavior-batch-size", "32",
              "--align-batch-size", "8", "--cpu-threads", "1"]


def tiny_model(state_dim=3, action_dim=2, dropout=0.0, seed=0) -> eda_d4rl.EnergyModel:
    torch.manual_seed(seed)
    args = eda_d4rl.Args(hidden=32, blocks=2, expansion=2, dropout=dropout)
    return eda_d4rl.EnergyModel(state_dim, action_dim, args, VPSDE()).double()


def test_noise_prediction_is_minus_sigma_times_energy_gradient():
    model = tiny_model()
    actions_t, states = torch.randn(5, 2, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.rand(5, dtype=torch.float64) * 0.9 + 0.05
    eps = model.noise_prediction(actions_t, t, states)
    step = 1e-6
    for dim in range(2):
        shift = torch.zeros_like(actions_t)
        shift[:, dim] = step
        with torch.no_grad():
            slope = (model(actions_t + shift, t, states) - model(actions_t - shift, t, states)) / (2 * step)
        torch.testing.assert_close(eps[:, dim], -model.sde.sigma(t) * slope, rtol=1e-6, atol=1e-8)


def test_behavior_loss_trains_through_the_gradient():
    model = tiny_model(dropout=0.1).float()
    loss = eda_d4rl.behavior_loss(model, torch.rand(16, 2) * 2 - 1, torch.randn(16, 3), model.sde)
    loss.backward()
    assert all(p.grad is not None for p in model.net.input_layer.parameters())


def alignment_inputs(batch=6, K=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, 3, generator=generator, dtype=torch.float64)
    candidates = torch.rand(batch, K, 2, generator=generator, dtype=torch.float64) * 2 - 1
    return states, candidates


@pytest.mark.parametrize("labels", ["soft", "hard"])
def test_alignment_loss_is_log_k_for_equal_models_and_uniform_labels(labels):
    behavior = tiny_model()
    policy = copy.deepcopy(behavior)
    states, candidates = alignment_inputs()
    args = eda_d4rl.Args(beta=0.7, labels=labels)
    uniform_q = torch.full(candidates.shape[:2], 2.5, dtype=torch.float64)
    loss, _ = eda_d4rl.alignment_loss(policy, behavior, states, candidates, uniform_q, args, behavior.sde)
    assert loss.item() == pytest.approx(math.log(candidates.shape[1]), abs=1e-12)


def test_alignment_gradients_reach_the_policy_only():
    behavior = tiny_model()
    policy = copy.deepcopy(behavior)
    states, candidates = alignment_inputs()
    q_labels = torch.randn(candidates.shape[:2], dtype=torch.float64)
    loss, _ = eda_d4rl.alignment_loss(policy, behavior, states, candidates, q_labels, eda_d4rl.Args(),
                                      behavior.sde)
    loss.backward()
    assert all(parameter.grad is None for parameter in behavior.parameters())
    assert sum(parameter.grad.abs().sum() for parameter in policy.parameters() if parameter.grad is not None) > 0


class GaussianBehavior(eda_d4rl.EnergyModel):
    """Exact energy of Gaussian actions N(mean(s), std^2): f = log N(a_t; alpha mean, alpha^2 std^2 + sigma^2)."""

    def __init__(self, std):
        torch.nn.Module.__init__(self)
        self.sde, self.std = VPSDE(), std
        self.weight = torch.nn.Parameter(torch.tensor(1.0))  # a parameter, to check that sampling leaves it alone

    def forward(self, actions_t, t, states):
        alpha, sigma = self.sde.alpha(t)[:, None], self.sde.sigma(t)[:, None]
        variance = alpha**2 * self.std**2 + sigma**2
        mean = self.weight * states[:, :1] * 0.5
        return (-(actions_t - alpha * mean) ** 2 / (2 * variance)).sum(-1)


def test_candidates_come_from_the_frozen_behavior_model():
    behavior = GaussianBehavior(std=0.2)
    critic = lambda s, a: (-(a - 0.3).pow(2).sum(-1), -(a - 0.3).pow(2).sum(-1) + 1.0)  # noqa: E731
    states = torch.tensor([[-1.0, 0.0], [1.0, 0.0]])
    K = 4000
    diffusion = Diffusion("dpm_solver++", steps=15, sde=behavior.sde)
    low, high = torch.full((1,), -5.0), torch.full((1,), 5.0)
    actions, q_labels = eda_d4rl.generate_candidates(behavior, critic, diffusion, states, K, low, high,
                                                     torch.Generator().manual_seed(0))
    assert actions.shape == (2, K, 1) and q_labels.shape == (2, K)
    torch.testing.assert_close(actions.mean(1).squeeze(-1), torch.tensor([-0.5, 0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(actions.std(1).squeeze(-1), torch.tensor([0.2, 0.2]), atol=0.02, rtol=0)
    torch.testing.assert_close(q_labels, -(actions.squeeze(-1) - 0.3) ** 2)  # the min of the two target heads
    assert behavior.weight.grad is None and behavior.weight.item() == 1.0


@pytest.mark.parametrize("ratio, expected", [(1.0, 8000), (0.01, 80), (0.5, 4000), (1e-9, 1)])
def test_data_ratio_subset_size(ratio, expected):
    indices = eda_d4rl.select_states(8000, ratio, torch.Generator().manual_seed(0))
    assert len(indices) == expected and len(torch.unique(indices)) == expected
    assert indices.min() >= 0 and indices.max() < 8000


@pytest.mark.parametrize("field, value", [("K", 1), ("beta", 0.0), ("data_ratio", 0.0), ("data_ratio", 1.5),
                                          ("num_candidates", 0)])
def test_bad_arguments_are_user_errors(field, value):
    with pytest.raises(UserError, match=field.replace("_", "-")):
        eda_d4rl.validate_args(eda_d4rl.Args(**{field: value}))


def test_bad_argument_exits_2_with_one_line_before_any_work(tmp_path):
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "run"), "--K", "1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("error: --K must be >= 2") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_missing_d4rl_dataset_exits_2_with_one_line(tmp_path):
    result = run_script(tmp_path, "--env", "hopper-medium-v2", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "hopper" in lines[0]


# ----------------------------------------------------------------------------------------------------------------
# Subprocess runs
# ----------------------------------------------------------------------------------------------------------------
def script_env(tmp_path):
    env = dict(os.environ, D4RL_DATASET_DIR=str(tmp_path / "no_d4rl"), OMP_NUM_THREADS="1")
    env["HOME"] = str(tmp_path)  # no ~/.d4rl or ~/.minari from the machine
    return env


def run_script(tmp_path, *argv, timeout=300):
    return subprocess.run([sys.executable, "eda_d4rl.py", *argv], cwd=eda_d4rl.__file__.rsplit("/", 1)[0],
                          env=script_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def stage_numbers(run_dir):
    return json.loads((run_dir / "summary.json").read_text())["stages"]


@pytest.fixture(scope="module")
def tiny_nav1d_run(tmp_path_factory):
    """One tiny complete Nav1D run, shared by the tests that only read it."""
    tmp_path = tmp_path_factory.mktemp("tiny_nav1d")
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "run"), *TINY_NAV1D)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp_path / "run"


def test_nav1d_smoke_run_interrupt_resume_and_determinism(tmp_path, tiny_nav1d_run):
    straight = tiny_nav1d_run
    summary = json.loads((straight / "summary.json").read_text())
    assert set(summary["stages"]) == {"behavior", "aligned", "behavior_1cand", "aligned_1cand"}
    for stage in ("behavior", "aligned"):  # the divergence monitor's reading joins the evaluation
        assert summary["stages"][stage]["denoising_error"] > 0 and 0 <= summary["stages"][stage]["actions_at_bounds"] <= 1
    assert summary["script"] == "eda_d4rl" and summary["coherency"]["aligned"] == 1.0
    assert summary["throughput"]["alignment_steps_per_s"] > 0 and "action_latency_ms" in summary["throughput"]
    assert (straight / "args.json").exists() and list(straight.glob("events.out.tfevents.*"))

    # Ctrl-C in the middle of the alignment, then --resume: the same numbers as the uninterrupted run
    interrupted = tmp_path / "interrupted"
    longer = [*TINY_NAV1D, "--align-steps", "400", "--eval-every", "0", "--save-every", "50"]
    process = subprocess.Popen([sys.executable, "eda_d4rl.py", "--env", "nav1d-full", "--run-dir",
                                str(interrupted), *longer], cwd=eda_d4rl.__file__.rsplit("/", 1)[0],
                               env=script_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = interrupted / "checkpoints" / "latest.pt"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if latest.exists():
            try:
                state = torch.load(latest, weights_only=False)
            except Exception:  # being replaced right now
                state = {}
            if state.get("stage") == "alignment" and state.get("step", 0) > 0:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted: checkpoint saved to" in stderr
    resumed = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(interrupted), "--resume", *longer)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage alignment" in resumed.stdout
    reference = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "reference"), *longer)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert stage_numbers(interrupted) == stage_numbers(tmp_path / "reference")


def test_load_behavior_and_critic_from_another_run(tmp_path, tiny_nav1d_run):
    checkpoint = tiny_nav1d_run / "checkpoints" / "latest.pt"
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "reuse"), *TINY_NAV1D,
                        "--load-behavior", str(checkpoint), "--load-critic", str(checkpoint))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "behavior loaded from" in result.stdout and "critic loaded from" in result.stdout
    wrong_shape = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "bad"), *TINY_NAV1D,
                             "--hidden", "24", "--load-behavior", str(checkpoint))
    assert wrong_shape.returncode == 2 and "does not fit" in wrong_shape.stderr
    other_data = run_script(tmp_path, "--env", "nav1d-expert", "--run-dir", str(tmp_path / "other"), *TINY_NAV1D,
                            "--load-critic", str(checkpoint))
    assert other_data.returncode == 2 and "trained on other data" in other_data.stderr
    assert not (tmp_path / "other").exists()


def test_hopper_minari_smoke_run_prints_a_normalized_score(tmp_path):
    dataset_id = "mujoco/hopper/edatiny-v0"
    make_tiny_hopper_dataset(dataset_id)
    result = run_script(tmp_path, "--env", dataset_id, "--run-dir", str(tmp_path / "hopper"),
                        "--behavior-steps", "3", "--critic-steps", "3", "--align-steps", "3", "--K", "2",
                        "--hidden", "16", "--blocks", "1", "--critic-hidden", "16", "--behavior-batch-size", "16",
                        "--align-batch-size", "4", "--eval-episodes", "2", "--num-candidates", "2",
                        "--sampler-steps", "2", "--log-every", "1", "--eval-every", "0", "--cpu-threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "normalized score" in result.stdout
    stages = stage_numbers(tmp_path / "hopper")
    assert np.isfinite(stages["aligned"]["normalized_mean"])


def test_non_finite_loss_stops_naming_stage_and_step_without_saving(tmp_path):
    run_dir = tmp_path / "diverging"
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(run_dir), *TINY_NAV1D,
                        "--behavior-lr", "1e30")
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr and "stage 'behavior" in result.stderr and "at step 10" in result.stderr
    assert not (run_dir / "checkpoints" / "latest.pt").exists()


def test_the_alignment_diagnosis_reads_a_run_and_refuses_what_it_cannot_read(tmp_path, tiny_nav1d_run, capsys):
    from benchmarks import eda_diagnose

    run_dir = tmp_path / "ratio"
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(run_dir), *TINY_NAV1D, "--data-ratio", "0.3",
                        "--eval-episodes", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    report = eda_diagnose.diagnose(run_dir, num_states=64, samples=4, draws=2)
    recorded = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=False)["done"]["candidates"]
    labels = report["labels"]  # the same labels the run made, read back
    assert labels["q_range_within_state"] == pytest.approx(recorded["q_range_within_state"], rel=1e-5)
    assert labels["best_candidate_target"] == pytest.approx(recorded["best_candidate_target"], rel=1e-5)
    assert 0 <= labels["target_entropy"] <= labels["ln_K"] == pytest.approx(math.log(4))
    for split in ("training", "held_out"):
        assert 0 < report["loss"][split]["loss"] < 2 * labels["ln_K"] and 0 <= report["loss"][split]["accuracy"] <= 1
    for stats in report["samples"].values():
        assert stats["q_best_of_n"] >= stats["q_one_sample"] and 0 <= stats["at_bounds"] <= 1
    assert eda_diagnose.main([str(tiny_nav1d_run), "--states", "8"]) == 2  # every state labelled: nothing held out
    assert eda_diagnose.main([str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.count("error:") == 2
