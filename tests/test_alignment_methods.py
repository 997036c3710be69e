"""The alignment methods shared by dp_align.py and diffuser_align.py: the same text in both scripts (the
method visible in each script, one behaviour), the IQL update the same in all three, and the identities
(PPO ratio 1 before the first update, DPO loss log 2 against itself, QV-PG gradients only in the last K steps,
credit weights of mean 1, standardised advantages, the ELBO proxy ranking likely samples first)."""
import inspect
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import diffuser_align
import dp_align
import eda_d4rl
from common.diffusion import Diffusion, gaussian_log_prob
from common.nets import MLPDenoiser, policy_with_reference

BANNER = "# Alignment methods."


def method_block(module) -> str:
    """The text from the alignment-methods banner to the next banner (the banner's own closing rule skipped)."""
    text = Path(module.__file__).read_text()
    start = text.index(BANNER)
    body = text.index("\n", text.index("# =====", start)) + 1
    return text[start:text.index("# =====", body)]


def test_the_methods_are_the_same_text_in_both_alignment_scripts():
    block = method_block(dp_align)
    assert block == method_block(diffuser_align)
    for name in ("rl", "qvpg", "dpo", "sft", "cascade", "dpo_loss", "likelihood_threshold", "credit_weights",
                 "group_advantages", "step_kl", "iql_losses", "iql_update"):
        assert f"\ndef {name}(" in block


def test_the_iql_update_is_the_same_text_in_all_three_scripts():
    for function in ("iql_losses", "iql_update"):
        sources = {inspect.getsource(getattr(module, function)) for module in (eda_d4rl, dp_align, diffuser_align)}
        assert len(sources) == 1, function


def chunk_space(diffusion, reward):
    """A ChunkSpace stand-in over 2-step, 1-d chunks conditioned on a 1-d observation."""
    return SimpleNamespace(
        diffusion=diffusion, shape=(2, 1), device=torch.device("cpu"), likelihood_threshold=None,
        conditions=lambda batch: torch.zeros(batch, 1),
        sample=lambda model, cond, n=1, **kwargs: diffusion.sample(model, (2, 1), cond, samples_per_cond=n, **kwargs),
        reward=reward, free_mask=lambda samples: None, step_distribution=diffusion.step_distribution,
        eps_error=diffusion.eps_error, predicted_noise=diffusion.predicted_noise, loss=diffusion.loss,
        dataset_samples=lambda batch: (torch.randn(batch, 2, 1), torch.zeros(batch, 1)))


@pytest.mark.parametrize("module", [dp_align, diffuser_align])
@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.5), ("sm", 0.0)])
def test_ppo_ratio_is_one_before_the_first_update(module, sampler, eta):
    diffusion = Diffusion(sampler, 5, train_steps=10 if sampler != "sm" else None, eta=eta)
    torch.manual_seed(0)
    model = MLPDenoiser(1, 2, 1, hidden=16, layers=2)
    with torch.no_grad():
        rollout = diffusion.sample(model, (2, 1), torch.randn(6, 1), samples_per_cond=3, return_chain=True)
    advantages = torch.randn(18)
    steps = rollout.stochastic.nonzero().flatten().tolist()
    assert steps, "a stochastic sampler must have stochastic steps"
    for step in steps:
        mean, std = diffusion.step_distribution(model, rollout.chain[step], step, rollout.cond)
        log_prob = gaussian_log_prob(rollout.chain[step + 1], mean, std)
        loss, ratio = module.ppo_step_loss(log_prob, rollout.log_probs[step], advantages, torch.ones(18), 0.2)
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-4, rtol=0)
        torch.testing.assert_close(loss, -advantages.mean(), atol=1e-4, rtol=0)
    big_step = torch.ones(2)  # ratio e: the positive advantage is clipped at 1.2, the negative one is not
    loss, _ = module.ppo_step_loss(big_step, torch.zeros(2), torch.tensor([1.0, -2.0]), torch.ones(2), 0.2)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 2.0 * math.e) / 2))


@pytest.mark.parametrize("sampler", ["ddpm", "fm"])
@pytest.mark.parametrize("lora_rank", [4, 0])
def test_dpo_loss_is_log_2_when_the_model_equals_the_reference(sampler, lora_rank):
    diffusion = Diffusion(sampler, 5)
    torch.manual_seed(0)
    foundation = MLPDenoiser(1, 2, 2, hidden=16, layers=2).requires_grad_(False)
    policy, reference = policy_with_reference(foundation, lora_rank=lora_rank, lora_alpha=8.0)
    space = SimpleNamespace(diffusion=diffusion, predicted_noise=diffusion.predicted_noise, free_mask=lambda x: None)
    winners, losers, cond = torch.randn(16, 2, 1), torch.randn(16, 2, 1), torch.randn(16, 2)
    loss, accuracy = dp_align.dpo_loss(space, policy, reference, winners, losers, cond, beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert accuracy.item() == 0.0  # logits are exactly 0: no pair is preferred yet
    loss.backward()  # and the loss has gradients for what alignment trains
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters() if p.requires_grad)
    with_kl, _ = dp_align.dpo_loss(space, policy, reference, winners, losers, cond, beta=100.0, kl_coef=10.0)
    assert with_kl.item() == pytest.approx(math.log(2), abs=1e-5)  # no divergence while the models agree


class StepBias(nn.Module):
    """x0_hat = x / 2 + bias[k] for discrete noise level k: each sampler step has its own parameter."""

    def __init__(self, levels):
        super().__init__()
        self.levels = levels
        self.bias = nn.Parameter(torch.linspace(-0.5, 0.5, levels + 1))

    def forward(self, x, t, cond):
        return 0.5 * x + self.bias[(t * self.levels).round().long()].view(-1, 1, 1)


@pytest.mark.parametrize("k", [1, 3])
def test_qvpg_gradients_reach_only_the_last_k_steps(k):
    steps = 6
    diffusion = Diffusion("ddim", steps, eta=0.0, prediction="x0")  # deterministic: QV-PG's home ground
    policy = StepBias(steps)
    space = chunk_space(diffusion, reward=lambda cond, chunks: -(chunks[:, 0] - 0.3).pow(2).sum(-1))
    args = dp_align.Args(group_size=2, align_batch=3, sample_steps=steps, qvpg_k=k, kl_coef=0.0, entropy_coef=0.0)
    metrics = dp_align.qvpg(space, policy, policy, torch.optim.SGD(policy.parameters(), lr=0.0), args)
    assert torch.isfinite(metrics["loss"])
    used_levels = diffusion.step_levels[:-1]  # level of each step, in sampling order
    with_gradient = {level for level in used_levels if policy.bias.grad[level].abs() > 0}
    assert with_gradient == set(used_levels[-k:])


def test_every_method_runs_one_step_and_moves_only_what_it_trains():
    diffusion = Diffusion("ddpm", 4, train_steps=8)
    torch.manual_seed(0)
    foundation = MLPDenoiser(1, 2, 1, hidden=16, layers=2).requires_grad_(False)
    space = chunk_space(diffusion, reward=lambda cond, chunks: -(chunks[:, 0] - 0.3).pow(2).sum(-1))
    args = dp_align.Args(group_size=4, align_batch=3, sample_steps=4, train_steps=8, kl_coef=0.1, entropy_coef=0.1,
                         epochs_per_batch=2, dpo_noise_draws=2, sft_elbo_draws=2, sft_top_fraction=0.5)
    for method in ("rl", "qvpg", "dpo", "sft"):
        policy, reference = policy_with_reference(foundation, lora_rank=2, lora_alpha=4.0)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in trainable]
        metrics = getattr(dp_align, method)(space, policy, reference, torch.optim.Adam(trainable, lr=1e-2), args)
        assert all(torch.isfinite(torch.as_tensor(value)).all() for value in metrics.values()), method
        assert any(not torch.equal(p, b) for p, b in zip(trainable, before)), method
        assert all(not p.requires_grad for p in foundation.parameters())


def test_credit_weights_have_mean_one_over_stochastic_steps():
    chain = torch.randn(6, 10, 2, 1)
    stochastic = torch.tensor([True, True, True, True, False])
    for scheme in ("uniform", "decay", "similarity"):
        weights = dp_align.credit_weights(chain, stochastic, scheme, 0.8)
        assert torch.all(weights[~stochastic] == 0)
        torch.testing.assert_close(weights[stochastic].mean(0), torch.ones(10))
    decay = dp_align.credit_weights(chain, stochastic, "decay", 0.8)[:, 0]
    assert torch.all(decay[1:4] > decay[:3])  # larger near x_0


def test_group_advantages_are_standardised_per_state():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    advantages = dp_align.group_advantages(rewards, 4).view(2, 4)
    torch.testing.assert_close(advantages.mean(1), torch.zeros(2))
    assert advantages[0].std().item() == pytest.approx(1.0, abs=1e-4) and torch.all(advantages[1] == 0)


def test_elbo_proxy_ranks_likely_samples_below_unlikely_ones():
    """With the exact noise predictor of N(0, I) data (eps_hat = sigma_t x_t), in-distribution samples score lower."""
    diffusion = Diffusion("ddpm", 10)
    exact = lambda x, t, cond: diffusion.noise_levels(t)[1].view(-1, 1, 1) * x  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    likely = torch.randn(256, 8, 3, generator=generator)
    cond = torch.zeros(256, 1)
    draws_t, draws_noise = torch.tensor([0.2, 0.5, 0.8]), torch.randn(3, 8, 3, generator=generator)
    space = SimpleNamespace(eps_error=diffusion.eps_error)
    likely_score = dp_align.elbo_proxy(space, exact, likely, cond, draws_t, draws_noise)
    unlikely_score = dp_align.elbo_proxy(space, exact, likely + 3.0, cond, draws_t, draws_noise)
    assert torch.quantile(likely_score, 0.9) < unlikely_score.min()


def test_plan_space_keeps_the_in_painted_state_out_of_likelihoods_and_losses():
    args = diffuser_align.Args(horizon=8, sample_steps=4, train_steps=4, num_candidates=2, unet_base_dim=8,
                               unet_dim_mults=(1, 2))
    planner = diffuser_align.Planner(args, diffuser_align.make_diffusion(args), None, None, 2, 1)
    offline = {"observations": torch.randn(20, 2), "actions": torch.rand(20, 1) * 2 - 1,
               "episode_last": torch.full((20,), 19)}
    space = diffuser_align.PlanSpace(args, planner, offline)
    plans, cond = space.dataset_samples(5)
    assert plans.shape == (5, 8, 3) and torch.equal(cond, plans[:, 0, :2])
    mask = space.free_mask(plans)
    assert torch.all(mask[:, 0, :2] == 0) and mask.sum() == plans.numel() - 5 * 2


@pytest.mark.parametrize("module", [dp_align, diffuser_align])
def test_sft_data_anchor_keeps_the_model_on_the_data(module):
    """--sft-data-weight adds the diffusion loss on dataset samples to each SFT update: a model far from the data
    fits it while it fits its own best samples (1.04 -> 0.18 here), and does not without the anchor (-> 0.98)."""
    diffusion = Diffusion("ddpm", 4, train_steps=8)

    def data(batch):
        return 0.8 + 0.05 * torch.randn(batch, 2, 1), torch.zeros(batch, 1)

    def data_loss(model):
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(1)
            return diffusion.loss(model, *data(1024)).mean().item()

    losses = {}
    for weight in (0.0, 4.0):
        torch.manual_seed(0)
        foundation = MLPDenoiser(1, 2, 1, hidden=16, layers=2).requires_grad_(False)
        space = chunk_space(diffusion, reward=lambda cond, chunks: -(chunks[:, 0] + 0.5).pow(2).sum(-1))
        space.dataset_samples = data
        policy, reference = policy_with_reference(foundation, lora_rank=2, lora_alpha=4.0)
        args = module.Args(group_size=4, align_batch=8, sample_steps=4, train_steps=8, epochs_per_batch=2,
                           sft_elbo_draws=2, sft_top_fraction=0.5, sft_quantile=1.0, sft_data_weight=weight)
        optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(100):
            metrics = module.sft(space, policy, reference, optimizer, args)
        assert metrics["acceptance"] > 0
        losses[weight] = data_loss(policy)
    assert losses[4.0] < 0.5 * losses[0.0]
