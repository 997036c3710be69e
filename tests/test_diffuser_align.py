"""diffuser_align.py: planning and alignment identities on tiny models, and end-to-end smoke runs (Nav1D, Hopper)."""
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

import diffuser_align as da
from conftest import alignment_stages, make_tiny_hopper_dataset
from common.nets import TemporalUNet, TwinQ, inject_lora, lora_disabled
from common.runtime import UserError

STATE_DIM, ACTION_DIM, HORIZON = 2, 1, 8
X_DIM = STATE_DIM + ACTION_DIM


def tiny_unet(extra_in_dim=0, seed=0):
    torch.manual_seed(seed)
    return TemporalUNet(X_DIM, HORIZON, 0, base_dim=8, dim_mults=(1, 2), extra_in_dim=extra_in_dim)


def perturbed(module, seed=1, scale=0.05):
    """A copy whose every parameter is moved, so that it differs from the original at every denoising step."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module


def tiny_planner(sampler="ddpm", planner="diffuser", steps=5, **overrides):
    args = da.Args(planner=planner, sampler=sampler, horizon=HORIZON, sample_steps=steps, train_steps=steps,
                   num_candidates=4, **overrides)
    torch.manual_seed(0)
    critic = TwinQ(STATE_DIM, ACTION_DIM, hidden=16)
    return da.Planner(args, da.make_diffusion(args), tiny_unet(), critic, STATE_DIM, ACTION_DIM)


# ----------------------------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sm", "fm"])
def test_inpainted_state_equals_the_given_state_at_every_denoising_step(sampler):
    planner = tiny_planner(sampler)
    states = torch.randn(3, STATE_DIM)
    out = planner.sample(states, 4, return_chain=True)
    expected = states.repeat_interleave(4, 0)
    for latent in out.chain:
        assert torch.equal(latent[:, 0, :STATE_DIM], expected)
    assert not torch.allclose(out.chain[-1][:, 1:], out.chain[0][:, 1:])  # the rest of the plan did move


def test_training_masks_always_know_the_current_state_and_a_causal_prefix():
    known = da.random_prefix_masks(4000, HORIZON, STATE_DIM, X_DIM, "cpu", planning_share=0.5)
    assert known[:, 0, :STATE_DIM].all()
    fully_known_steps = known.all(-1).sum(1)
    assert fully_known_steps.min() == 0 and fully_known_steps.max() == HORIZON - 1
    # the planning case (only the current state known) gets its share of the batch, the prefixes the rest
    assert (fully_known_steps == 0).float().mean() == pytest.approx(0.5, abs=0.03)
    assert (fully_known_steps == 1).float().mean() == pytest.approx(0.5 / (HORIZON - 1), abs=0.03)
    for row in known[:20]:  # fully known steps form a prefix, followed by one step whose state only is known
        prefix = int(row.all(-1).sum())
        assert row[:prefix].all() and row[prefix, :STATE_DIM].all() and not row[prefix, STATE_DIM:].any()


@pytest.mark.parametrize("planner_kind", ["diffuser", "dd"])
def test_loss_weights_count_free_entries_and_weigh_the_first_free_action(planner_kind):
    planner = tiny_planner(planner=planner_kind)
    offline = {"observations": torch.zeros(50, STATE_DIM), "actions": torch.zeros(50, ACTION_DIM),
               "episode_last": torch.full((50,), 49)}
    space = da.PlanSpace(da.Args(planner=planner_kind, horizon=HORIZON, first_action_weight=10.0), planner, offline)
    known, weights = space.training_masks(500)
    assert torch.equal(weights == 0, known)  # known entries never count
    heavy = weights == 10.0
    if planner_kind == "dd":  # states only: nothing is weighted up
        assert not heavy.any()
        return
    prefix = known.all(-1).sum(1)  # the step whose state only is known: the first free action
    expected = torch.zeros_like(heavy)
    expected[torch.arange(500), prefix, STATE_DIM:] = True
    assert torch.equal(heavy, expected)
    assert ((weights == 1.0) | heavy | known).all()


class ActionIsQ(torch.nn.Module):
    """A critic whose Q is the first action entry, so the best plan is known."""

    def forward(self, states, actions):
        return actions[:, 0], actions[:, 0] + 1.0


def test_plan_selection_executes_the_argmax_q_plan():
    planner = tiny_planner()
    planner.q_target = ActionIsQ()
    states = torch.randn(3, STATE_DIM)
    plans = torch.randn(3 * planner.num_plans, HORIZON, X_DIM)
    plans[:, 0, :STATE_DIM] = states.repeat_interleave(planner.num_plans, 0)
    plans[..., STATE_DIM] = torch.rand(3 * planner.num_plans, HORIZON) * 1.8 - 0.9  # inside the action box
    planner.sample = lambda states, repeats, **kwargs: type("Out", (), {"x0": plans})()
    actions, chosen = planner.act(states)
    grouped_first_actions = plans[:, 0, STATE_DIM].view(3, planner.num_plans)
    torch.testing.assert_close(actions[:, 0], grouped_first_actions.max(1).values)
    torch.testing.assert_close(chosen, plans.view(3, planner.num_plans, HORIZON, X_DIM)[torch.arange(3),
                                                                                        grouped_first_actions.argmax(1)])
    rewards = torch.tensor([0.1, 0.5, -1.0, 0.4, 2.0, 1.0])
    assert da.select_best_plans(rewards, 3).tolist() == [1, 1]


def test_compiled_planning_chooses_the_same_plans_as_eager_and_follows_the_live_weights():
    eager, compiled = tiny_planner(), tiny_planner(compile=True)
    states = torch.randn(3, STATE_DIM)
    results = []
    for planner in (eager, compiled):
        torch.manual_seed(5)
        results.append(planner.act(states))
    assert compiled.compiled(compiled.denoiser) is not compiled.denoiser  # a compiled wrapper, made once
    assert compiled.compiled(compiled.denoiser) is compiled.compiled(compiled.denoiser)
    torch.testing.assert_close(results[1], results[0], atol=1e-4, rtol=1e-4)
    for planner in (eager, compiled):  # training between evaluations must reach the compiled wrapper
        perturbed(planner.denoiser)
        torch.manual_seed(5)
        results.append(planner.act(states))
    torch.testing.assert_close(results[3], results[2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(results[2][1], results[0][1])


def test_mean_plan_reward_averages_q_over_the_plan():
    planner = tiny_planner(plan_reward="mean")
    planner.q_target = ActionIsQ()
    plans = torch.randn(5, HORIZON, X_DIM)
    torch.testing.assert_close(planner.rewards(plans), plans[:, :, STATE_DIM].clamp(-1, 1).mean(1))


def test_decision_diffuser_scores_plans_with_inverse_dynamics_actions():
    args = da.Args(planner="dd", horizon=HORIZON, sample_steps=3, train_steps=3, num_candidates=4)
    inverse_dynamics = lambda s, s_next: (s_next - s)[..., :1]
    planner = da.Planner(args, da.make_diffusion(args), None, ActionIsQ(), STATE_DIM, ACTION_DIM, inverse_dynamics)
    plans = torch.randn(6, HORIZON, STATE_DIM)
    torch.testing.assert_close(planner.rewards(plans), (plans[:, 1, 0] - plans[:, 0, 0]).clamp(-1, 1))


# ----------------------------------------------------------------------------------------------------------------
# Alignment losses
# ----------------------------------------------------------------------------------------------------------------
class CallRecorder(torch.nn.Module):
    """Wraps a denoiser and records, per call, whether a gradient reached that call's output."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.reached = inner, []

    def forward(self, x, t, cond):
        out = self.inner(x, t, cond)
        index = len(self.reached)
        self.reached.append(False)
        if out.requires_grad:
            out.register_hook(lambda grad, index=index: self.reached.__setitem__(index, True))
        return out


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "fm"])
def test_qvpg_gradients_reach_only_the_last_k_denoising_steps(sampler):
    planner = tiny_planner(sampler, steps=6)
    recorder = CallRecorder(planner.denoiser)
    planner.q_target = TwinQ(STATE_DIM, ACTION_DIM, hidden=8).requires_grad_(False)
    out = planner.sample(torch.randn(2, STATE_DIM), 3, model=recorder, grad_last_k=2)
    (-planner.rewards(out.x0).mean()).backward()
    assert recorder.reached == [False] * 4 + [True] * 2
    assert all(p.grad is not None for p in planner.denoiser.input_proj.parameters())


def test_lora_reference_equals_the_foundation_and_adapters_change_the_output():
    foundation = perturbed(tiny_unet())
    planner_net = copy.deepcopy(foundation)
    adapters = inject_lora(planner_net, 4, 8.0, include_conv=True)
    x, t = torch.randn(5, HORIZON, X_DIM), torch.rand(5)
    with torch.no_grad():
        torch.testing.assert_close(planner_net(x, t, None), foundation(x, t, None))
        for parameter in adapters:
            parameter.add_(0.1)
        assert not torch.allclose(planner_net(x, t, None), foundation(x, t, None))
        with lora_disabled(planner_net):
            torch.testing.assert_close(planner_net(x, t, None), foundation(x, t, None))


def test_cascade_equals_the_foundation_at_initialisation():
    foundation = perturbed(tiny_unet())
    cascade = da.CascadeDenoiser(da.Args(horizon=HORIZON, unet_base_dim=8, unet_dim_mults=(1, 2)), foundation, X_DIM)
    x, t, condition = torch.randn(5, HORIZON, X_DIM), torch.rand(5), torch.randn(5, HORIZON, X_DIM)
    with torch.no_grad():
        torch.testing.assert_close(cascade(x, t, condition), foundation(x, t, None))


# ----------------------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    (dict(sampler="ddim", align="rl"), "qvpg"),
    (dict(sampler="fm", align="rl,dpo"), "qvpg"),
    (dict(horizon=12), "power of two"),
    (dict(align="rl,ppo"), "--align takes"),
    (dict(align="dpo,dpo"), "names a method twice"),
    (dict(sampler="fm", align="cascade"), "--cascade-align rl"),
    (dict(align="cascade", cascade_align="sft,sft"), "--cascade-align 'sft,sft' names a method twice"),
    (dict(group_size=1), "--group-size"),
    (dict(dpo_beta=0.0), "--dpo-beta"),
    (dict(sft_data_weight=-1.0), "--sft-data-weight must be >= 0"),
    (dict(cascade_branch_fraction=1.0), "--cascade-branch-fraction"),
])
def test_bad_arguments_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        da.validate_args(da.Args(**overrides))
    assert da.validate_args(da.Args(sampler="ddim", eta=1.0, align="rl,cascade", cascade_align="dpo,sft")) == (
        ["rl", "cascade"], ["dpo", "sft"])
    # the cascade's default method (rl) only matters to a sequence that has a cascade
    assert da.validate_args(da.Args(sampler="ddim", align="qvpg,dpo,sft"))[0] == ["qvpg", "dpo", "sft"]


@pytest.mark.parametrize("flag,value", [("--planner", "decision"), ("--sampler", "dpm_solver++")])
def test_unknown_choices_are_refused_by_the_command_line(tmp_path, flag, value):
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "run"), flag, value)
    assert result.returncode == 2 and value in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# End-to-end smoke runs (subprocess, tiny sizes)
# ----------------------------------------------------------------------------------------------------------------
TINY = ["--foundation-steps", "12", "--critic-steps", "12", "--inverse-dynamics-steps", "12", "--batch-size", "16",
        "--critic-batch-size", "16", "--critic-hidden", "16", "--inverse-dynamics-hidden", "16", "--unet-base-dim",
        "8", "--eval-episodes", "2", "--sample-steps", "4", "--train-steps", "4", "--num-candidates", "3",
        "--align-batch", "2", "--group-size", "4", "--rl-steps", "2", "--qvpg-steps", "2", "--dpo-steps", "2",
        "--sft-steps", "2", "--cascade-steps", "2", "--cascade-branches", "2", "--qvpg-k", "2", "--save-every", "5",
        "--sft-elbo-draws", "2", "--epochs-per-batch", "2", "--dpo-noise-draws", "2", "--log-every", "1"]


def run_script(tmp_path, *argv, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MINARI_DATASETS_PATH=os.environ["MINARI_DATASETS_PATH"])
    return subprocess.run([sys.executable, "diffuser_align.py", *argv], cwd=da.__file__.rsplit("/", 1)[0], env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_of(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


SMOKE_CASES = {  # one run per planner x sampler, covering every method it supports and the option code paths
    "diffuser-ddpm": ["--planner", "diffuser", "--sampler", "ddpm", "--align", "rl,qvpg,dpo,sft,cascade",
                      "--credit", "similarity", "--kl-coef", "0.1", "--entropy-coef", "0.01", "--passes", "2",
                      "--online-episodes", "1", "--online-critic-steps", "3", "--eval-every", "1"],
    "diffuser-ddim": ["--planner", "diffuser", "--sampler", "ddim", "--align", "qvpg,dpo,sft,cascade",
                      "--cascade-align", "qvpg,dpo,sft",
                      "--lora-rank", "0", "--plan-reward", "mean", "--kl-coef", "0.1"],
    "diffuser-ddim-eta": ["--planner", "diffuser", "--sampler", "ddim", "--eta", "1.0", "--align", "rl"],
    "diffuser-sm": ["--planner", "diffuser", "--sampler", "sm", "--align", "rl,qvpg,dpo,sft,cascade",
                    "--cascade-align", "rl,sft",
                    "--rl-algo", "reinforce", "--credit", "decay", "--sft-source", "reference"],
    "diffuser-fm": ["--planner", "diffuser", "--sampler", "fm", "--align", "qvpg,dpo,sft,cascade", "--cascade-align", "",
                    "--qvpg-random-k"],
    "dd-ddpm": ["--planner", "dd", "--sampler", "ddpm", "--align", "rl,qvpg,dpo,sft,cascade", "--plan-reward", "mean"],
}


@pytest.mark.parametrize("case", SMOKE_CASES)
def test_smoke_run_every_planner_sampler_and_method(tmp_path, case):
    run_dir = tmp_path / case
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(run_dir), *TINY, *SMOKE_CASES[case])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(run_dir)
    passes = 2 if "--passes" in SMOKE_CASES[case] else 1
    expected = {"foundation", "aligned"} | {f"pass{p}/{stage}" for p in range(1, passes + 1)
                                            for stage in alignment_stages(SMOKE_CASES[case])}
    assert set(summary["stages"]) == expected
    for name in {stage for stage in expected if "cascade" not in stage and "online" not in stage} - {"aligned"}:
        stats = summary["stages"][name]  # the divergence monitor's reading of the policy joins its evaluation
        assert stats["denoising_error"] > 0 and 0 <= stats["actions_at_bounds"] <= 1, name
    assert set(summary["coherency"]) == expected
    assert all(0.0 <= value <= 1.0 for value in summary["coherency"].values())
    assert all(np.isfinite(stats["return_mean"]) for stats in summary["stages"].values())
    assert "foundation_steps_per_s" in summary["throughput"]
    assert "stage" in result.stdout and "aligned" in result.stdout  # the final table


def test_rl_with_a_deterministic_sampler_exits_with_a_one_line_error(tmp_path):
    result = run_script(tmp_path, "--env", "nav1d-full", "--sampler", "fm", "--align", "rl",
                        "--run-dir", str(tmp_path / "bad"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "qvpg" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()  # rejected before any work


def test_non_finite_loss_stops_the_run_naming_stage_and_step(tmp_path):
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(tmp_path / "nan"), *TINY,
                        "--foundation-lr", "1e30")
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr and "stage 'foundation" in result.stderr and "at step" in result.stderr


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path):
    argv = ["--env", "nav1d-full", *TINY, "--foundation-steps", "200", "--save-every", "10", "--align", "rl,dpo"]
    reference = run_script(tmp_path, "--run-dir", str(tmp_path / "straight"), *argv)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "interrupted"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "diffuser_align.py", "--run-dir", str(run_dir), *argv],
                               cwd=da.__file__.rsplit("/", 1)[0], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "latest.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted: checkpoint saved" in stderr

    resumed = run_script(tmp_path, "--run-dir", str(run_dir), "--resume", *argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming stage foundation" in resumed.stdout
    straight, again = summary_of(tmp_path / "straight"), summary_of(run_dir)
    assert again["stages"] == straight["stages"]

    finished = run_script(tmp_path, "--run-dir", str(run_dir), "--resume", *argv)  # nothing left: skips every stage
    assert finished.returncode == 0 and summary_of(run_dir)["stages"] == straight["stages"]

    checkpoint = str(tmp_path / "straight" / "checkpoints" / "latest.pt")
    reused = run_script(tmp_path, "--run-dir", str(tmp_path / "reused"), *argv, "--load-foundation", checkpoint,
                        "--load-critic", checkpoint, "--align", "dpo")
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert "foundation loaded from" in reused.stdout and "critic loaded from" in reused.stdout
    assert "foundation:" not in reused.stderr  # no foundation training progress bar
    wrong_size = run_script(tmp_path, "--run-dir", str(tmp_path / "wrong"), *argv, "--unet-base-dim", "16",
                            "--load-foundation", checkpoint)
    assert wrong_size.returncode == 2 and "does not fit" in wrong_size.stderr
    other_sampler = run_script(tmp_path, "--run-dir", str(tmp_path / "other"), *argv, "--sampler", "sm",
                               "--load-foundation", checkpoint)
    assert other_sampler.returncode == 2 and "other settings (--sampler ddpm)" in other_sampler.stderr


def test_hopper_minari_dataset_runs_end_to_end_with_horizon_32(tmp_path):
    dataset_id = "mujoco/hopper/diffusertiny-v0"
    make_tiny_hopper_dataset(dataset_id, episodes=4, steps=40)
    run_dir = tmp_path / "hopper"
    result = run_script(tmp_path, "--env", dataset_id, "--run-dir", str(run_dir), *TINY, "--eval-episodes", "1",
                        "--eval-max-steps", "3", "--align", "rl,dpo,sft")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = summary_of(run_dir)
    assert summary["args"]["horizon"] == 32 and summary["args"]["unet_dim_mults"] == [1, 2, 4]
    assert np.isfinite(summary["stages"]["aligned"]["normalized_mean"])
    assert "coherency" not in summary


@pytest.mark.parametrize("planner", ["diffuser", "dd"])
def test_the_planner_diagnosis_reads_a_run_and_refuses_what_it_cannot_read(tmp_path, planner, capsys):
    from benchmarks import planner_diagnose

    run_dir = tmp_path / "run"
    result = run_script(tmp_path, "--env", "nav1d-full", "--run-dir", str(run_dir), "--planner", planner,
                        "--align", "dpo", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    report = planner_diagnose.diagnose(run_dir, num_states=64)
    _, loaded, space, _ = planner_diagnose.load_planner(run_dir)
    torch.manual_seed(0)  # the same dataset windows as the diagnosis drew
    states, _ = loaded.states_actions(space.dataset_samples(64)[0])
    assert report["next_state"]["current_state"] == pytest.approx(float(((states[:, 0] - states[:, 1]) ** 2).mean()))
    shown = min(planner_diagnose.STEPS_SHOWN, report["settings"]["horizon"]) - 1
    assert len(report["noisy_level_error"]["states"]) == shown
    assert (report["noisy_level_error"]["actions"] is None) == (planner == "dd")
    assert all(value >= 0 and math.isfinite(value) for value in (report["first_action"]["plan"],
                                                                  report["next_state"]["plan"]))
    assert planner_diagnose.main([str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_the_diagnosis_neighbour_comes_from_another_episode():
    """Episode 0 holds states 0.0 and 0.1, episode 1 states 0.3 and 1.0: the nearest state of another episode."""
    from benchmarks import planner_diagnose

    offline = {"observations": torch.tensor([[0.0], [0.1], [0.3], [1.0]]),
               "actions": torch.tensor([[-1.0], [-0.5], [0.5], [1.0]]),
               "episode_first": torch.tensor([0, 0, 2, 2])}
    for chunk in (1, 3, 65_536):  # dataset states taken a few at a time, as in million-step files
        neighbours = planner_diagnose.neighbour_actions(offline["observations"][[0, 1, 3]], offline, chunk=chunk)
        assert neighbours.flatten().tolist() == [0.5, 0.5, -0.5]
