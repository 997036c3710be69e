"""Schedules, losses and samplers of common/diffusion.py, checked against Gaussian data where everything is exact.

For data x0 ~ N(m, s^2) (independent dims) and x_t = a x0 + b z, (x0, z, x_t) are jointly Gaussian, so the optimal
predictions E[x0 | x_t], E[z | x_t] and every linear combination of them (the velocities) are closed-form.
"""

import pytest
import torch

from common.diffusion import (
    Diffusion,
    SampleOutput,
    VPSDE,
    cosine_alphas_cumprod,
    linear_alphas_cumprod,
)
from common.runtime import UserError

DATA_MEAN = torch.tensor([1.5, -0.5])
DATA_STD = torch.tensor([0.5, 2.0])
NUM_SAMPLES = 50_000
# Sampler accuracy on the Gaussian: |mean - m| / s and |std - s| / s must both stay below this, per dim.
# Sampling noise alone is ~0.45% (mean) and ~0.3% (std) at 50k samples; the step counts below keep discretisation
# error under ~2.5% (the wide s = 2 dim is the hard one; VP-SDE samplers also start from N(0, I) while the true
# marginal at t = 1 has mean alpha(1) m with alpha(1) = 0.0066).
TOLERANCE = 0.03


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def seeded():
    """Fixed global seed: every check below runs on the same draws every time."""
    torch.manual_seed(0)


def target_coefficients(diffusion, alpha, sigma):
    """(c_x0, c_z): the training target is c_x0 * x0 + c_z * z for this parametrisation."""
    if diffusion.prediction == "eps":
        return torch.zeros_like(alpha), torch.ones_like(alpha)
    if diffusion.prediction == "x0":
        return torch.ones_like(alpha), torch.zeros_like(alpha)
    if diffusion.sampler == "fm":
        return -torch.ones_like(alpha), torch.ones_like(alpha)
    return -sigma, alpha


class GaussianOptimalModel(torch.nn.Module):
    """Bayes-optimal network output for Gaussian data; the data mean may come from `cond` (its first dims)."""

    def __init__(self, diffusion, mean=DATA_MEAN, std=DATA_STD):
        super().__init__()
        self.diffusion, self.mean, self.std = diffusion, mean, std

    def forward(self, x, t, cond):
        alpha, sigma = (level[:, None].to(x.dtype) for level in self.diffusion.noise_levels(t))
        mean = self.mean if cond is None else cond[:, : x.shape[1]]
        variance = alpha**2 * self.std**2 + sigma**2
        residual = x - alpha * mean
        x0_hat = mean + alpha * self.std**2 / variance * residual
        z_hat = sigma / variance * residual
        c_x0, c_z = target_coefficients(self.diffusion, alpha, sigma)
        return c_x0 * x0_hat + c_z * z_hat


def posterior_variance(diffusion, alpha, sigma):
    """Var(target | x_t) per dim for the Gaussian data: the irreducible loss of the optimal model."""
    c_x0, c_z = target_coefficients(diffusion, alpha, sigma)
    variance = alpha**2 * DATA_STD**2 + sigma**2
    covariance = c_x0 * alpha * DATA_STD**2 + c_z * sigma
    return c_x0**2 * DATA_STD**2 + c_z**2 - covariance**2 / variance


# ----- schedules --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [cosine_alphas_cumprod, linear_alphas_cumprod])
@pytest.mark.parametrize("T", [10, 1000])
def test_discrete_schedules_run_from_clean_to_noise(make, T):
    alphas_cumprod = make(T)
    assert alphas_cumprod.shape == (T + 1,)
    assert alphas_cumprod[0] == 1
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert alphas_cumprod[-1] < 1e-3


def test_vp_sde_formulas():
    sde = VPSDE()
    t = torch.linspace(1e-3, 1, 50, dtype=torch.float64)
    assert torch.allclose(sde.log_alpha(t), -(20 - 0.1) * t**2 / 4 - 0.1 * t / 2)
    assert torch.allclose(sde.alpha(t) ** 2 + sde.sigma(t) ** 2, torch.ones_like(t))
    assert torch.allclose(sde.lambda_(t), sde.log_alpha(t) - sde.sigma(t).log())
    assert torch.allclose(sde.inverse_lambda(sde.lambda_(t)), t)
    # d log alpha / dt = -beta / 2
    time = t.clone().requires_grad_()
    (slope,) = torch.autograd.grad(sde.log_alpha(time).sum(), time)
    assert torch.allclose(slope, -sde.beta(t) / 2)


# ----- samplers against the exact Gaussian ------------------------------------------------------------------------
SAMPLER_CASES = {
    "ddpm cosine 300 steps": ("ddpm", dict(steps=300)),
    "ddpm cosine 500 of 1000 levels": ("ddpm", dict(steps=500, train_steps=1000)),
    "ddpm linear 500 steps": ("ddpm", dict(steps=500, schedule="linear")),
    "ddim eta=0 200 steps": ("ddim", dict(steps=200)),
    "ddim eta=0.5 200 steps": ("ddim", dict(steps=200, eta=0.5)),
    "ddim eta=0 x0-pred 200 steps": ("ddim", dict(steps=200, prediction="x0")),
    "sm 300 steps": ("sm", dict(steps=300)),
    "sm euler-maruyama 1000 steps": ("sm", dict(steps=1000, sde_solver="euler")),
    "fm euler 200 steps": ("fm", dict(steps=200)),
    "fm heun 20 steps": ("fm", dict(steps=20, fm_solver="heun")),
    "dpm_solver++ 15 steps": ("dpm_solver++", dict(steps=15)),
    "dpm_solver++ 25 steps": ("dpm_solver++", dict(steps=25)),
    "dpm_solver++ velocity-pred 15 steps": ("dpm_solver++", dict(steps=15, prediction="velocity")),
    "dpm_solver++_2s 201 steps": ("dpm_solver++_2s", dict(steps=201)),
    "ddpm quadratic 150 of 8000 levels": ("ddpm", dict(steps=150, train_steps=8000, spacing="quadratic")),
    "fm euler quadratic 100 steps": ("fm", dict(steps=100, spacing="quadratic")),
}


def test_quadratic_spacing_is_densest_near_the_data_and_needs_enough_levels():
    levels = Diffusion("ddpm", 10, train_steps=100, spacing="quadratic").step_levels
    assert levels[0] == 100 and levels[-1] == 0 and all(a > b for a, b in zip(levels, levels[1:]))
    gaps = [a - b for a, b in zip(levels, levels[1:])]
    assert gaps[0] > gaps[-2]  # wide steps at high noise, narrow ones near the data
    times = Diffusion("fm", 4, spacing="quadratic").step_time
    assert times == pytest.approx([1.0, 0.5625, 0.25, 0.0625, 0.0])
    with pytest.raises(UserError, match="needs about 135 noise levels"):
        Diffusion("ddpm", 20, train_steps=50, spacing="quadratic")


@pytest.mark.parametrize("steps", [14, 15])
def test_singlestep_solver_evaluates_the_network_steps_times_on_the_time_uniform_grid(steps):
    """The EDA authors' setup: `steps` evaluations, 2nd-order steps over pairs of intervals of a time-uniform grid
    (the intermediate at the middle grid time), one 1st-order step when `steps` is odd."""
    diffusion = Diffusion("dpm_solver++_2s", steps=steps)
    model, times = GaussianOptimalModel(diffusion), []

    def recording(x, t, cond):
        times.append(round(float(t[0]), 6))
        return model(x, t, cond)

    diffusion.sample(recording, (8, 2), generator=torch.Generator().manual_seed(0))
    assert times == [round(t, 6) for t in diffusion.step_time[:-1]]
    assert diffusion.step_time == pytest.approx(torch.linspace(1, 1e-3, steps + 1, dtype=torch.float64).tolist())


@pytest.mark.parametrize("case", list(SAMPLER_CASES))
def test_sampler_reproduces_gaussian(case, record_property):
    sampler, options = SAMPLER_CASES[case]
    diffusion = Diffusion(sampler, **options)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        samples = diffusion.sample(GaussianOptimalModel(diffusion), (NUM_SAMPLES, 2), generator=generator).x0
    mean_error = ((samples.mean(0) - DATA_MEAN).abs() / DATA_STD).max().item()
    std_error = ((samples.std(0) - DATA_STD).abs() / DATA_STD).max().item()
    print(f"{case:40s} mean error {100 * mean_error:5.2f}%  std error {100 * std_error:5.2f}%")
    record_property("mean_error", mean_error)
    record_property("std_error", std_error)
    assert mean_error < TOLERANCE and std_error < TOLERANCE


def test_parametrisations_give_the_same_samples():
    """The exact model in eps, x0 or velocity form must drive a deterministic sampler identically."""
    results = []
    for prediction in ("eps", "x0", "velocity"):
        diffusion = Diffusion("ddim", steps=10, prediction=prediction)
        generator = torch.Generator().manual_seed(1)
        results.append(diffusion.sample(GaussianOptimalModel(diffusion), (256, 2), generator=generator).x0)
    assert torch.allclose(results[0], results[1], atol=1e-3)
    assert torch.allclose(results[0], results[2], atol=1e-3)


# ----- log-probs, in-painting, gradients, conditioning, continuation ----------------------------------------------
@pytest.mark.parametrize("sampler, options", [("ddpm", dict(steps=8)), ("ddim", dict(steps=8, eta=0.5)),
                                              ("sm", dict(steps=8))])
def test_step_log_probs_equal_normal_log_probs(sampler, options):
    diffusion = Diffusion(sampler, **options)
    model = GaussianOptimalModel(diffusion)
    out = diffusion.sample(model, (64, 2), return_chain=True, generator=torch.Generator().manual_seed(2))
    assert out.chain.shape == (9, 64, 2) and out.log_probs.shape == (8, 64) and out.stochastic.shape == (8,)
    assert torch.equal(out.chain[-1], out.x0)
    for step in range(8):
        mean, std = diffusion.step_distribution(model, out.chain[step], step, None)
        if out.stochastic[step]:
            expected = torch.distributions.Normal(mean, std).log_prob(out.chain[step + 1]).sum(-1)
            assert torch.allclose(out.log_probs[step], expected, atol=1e-4)
        else:
            assert std == 0 and torch.equal(out.log_probs[step], torch.zeros(64))
            assert torch.allclose(out.chain[step + 1], mean)
    # the last step lands on the clean level (ddpm/ddim) or returns its mean (sm): deterministic
    assert out.stochastic[:-1].all() and not out.stochastic[-1]


def test_ddpm_step_is_the_posterior_q_of_the_previous_level():
    """Unstrided ddpm step = q(x_{k-1} | x_k, x0_hat): the DDPM posterior mean and variance beta_tilde."""
    diffusion = Diffusion("ddpm", steps=10, prediction="x0")
    x0_hat = torch.randn(5, 2)
    x = torch.randn(5, 2)
    alphas_cumprod = diffusion.alphas_cumprod.float()
    for step, level in enumerate(diffusion.step_levels[:-1]):
        mean, std = diffusion.step_distribution(lambda x, t, cond: x0_hat, x, step, None)
        now, previous = alphas_cumprod[level], alphas_cumprod[level - 1]
        beta = 1 - now / previous
        expected_mean = (previous.sqrt() * beta * x0_hat + (1 - beta).sqrt() * (1 - previous) * x) / (1 - now)
        assert torch.allclose(mean, expected_mean, atol=1e-5)
        assert std == pytest.approx(((1 - previous) / (1 - now) * beta).sqrt().item(), rel=1e-5)


@pytest.mark.parametrize("sampler, options", [("ddpm", dict(steps=6)), ("ddim", dict(steps=6)),
                                              ("sm", dict(steps=6)), ("fm", dict(steps=6, fm_solver="heun")),
                                              ("dpm_solver++", dict(steps=6))])
def test_inpainted_entries_are_kept_exactly(sampler, options):
    diffusion = Diffusion(sampler, **options)
    model = GaussianOptimalModel(diffusion)
    mask = torch.zeros(32, 3, 2, dtype=torch.bool)
    mask[:, 0, :] = True  # e.g. the current state of a plan
    mask[:, 1, 0] = True
    values = torch.randn(32, 3, 2)

    def flat_model(x, t, cond):  # the Gaussian model per entry of a (B, 3, 2) sample
        return model(x.reshape(-1, 2), t.repeat_interleave(3), cond).reshape(x.shape)

    out = diffusion.sample(flat_model, (32, 3, 2), inpaint_mask=mask, inpaint_values=values, return_chain=True,
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.chain[:, mask], values[mask].expand(out.chain.shape[0], -1))
    if diffusion.stochastic:  # in-painted entries do not count in the step log-probs
        mean, std = diffusion.step_distribution(flat_model, out.chain[0], 0, None)
        free = torch.distributions.Normal(mean, std).log_prob(out.chain[1])[~mask].reshape(32, -1).sum(-1)
        assert torch.allclose(out.log_probs[0], free, atol=1e-4)


class PerLevelScale(torch.nn.Module):
    """Gaussian model times (1 + w[level]): one scalar parameter per discrete noise level."""

    def __init__(self, diffusion):
        super().__init__()
        self.inner = GaussianOptimalModel(diffusion)
        self.train_steps = diffusion.train_steps
        self.weight = torch.nn.Parameter(torch.zeros(diffusion.train_steps + 1))

    def forward(self, x, t, cond):
        levels = (t * self.train_steps).round().long()
        return self.inner(x, t, cond) * (1 + self.weight[levels])[:, None]


@pytest.mark.parametrize("sampler, options", [("ddpm", dict(steps=10)), ("ddim", dict(steps=5, train_steps=10))])
@pytest.mark.parametrize("last_k", [1, 3])
def test_grad_last_k_reaches_only_the_last_steps(sampler, options, last_k):
    diffusion = Diffusion(sampler, **options)
    model = PerLevelScale(diffusion)
    out = diffusion.sample(model, (16, 2), grad_last_k=last_k, generator=torch.Generator().manual_seed(4))
    out.x0.square().sum().backward()
    used_levels = diffusion.step_levels[:-1]  # level of the network call of each step
    for step, level in enumerate(used_levels):
        has_grad = model.weight.grad[level] != 0
        assert has_grad == (step >= len(used_levels) - last_k), (step, level)


def test_grad_last_k_fm_and_full_gradient():
    diffusion = Diffusion("fm", steps=4)
    scale = torch.nn.Parameter(torch.ones(()))
    inner = GaussianOptimalModel(diffusion)
    model = lambda x, t, cond: inner(x, t, cond) * scale  # noqa: E731
    start = torch.randn(8, 2)
    full = diffusion.sample(model, (8, 2), x_start=start)
    (grad_full,) = torch.autograd.grad(full.x0.sum(), scale)
    last = diffusion.sample(model, (8, 2), x_start=start, grad_last_k=1, return_chain=True)
    (grad_last,) = torch.autograd.grad(last.x0.sum(), scale)
    assert torch.equal(full.x0, last.x0)
    # only the last Euler step x0 = x - h * scale * v(x, t=1/4), h = 1/4, depends on the scale
    expected = -0.25 * inner(last.chain[-2].detach(), torch.full((8,), 0.25), None).sum()
    assert torch.isclose(grad_last, expected, atol=1e-5)
    assert not torch.isclose(grad_full, grad_last)


def test_samples_per_cond_repeats_the_conditioning():
    diffusion = Diffusion("ddim", steps=50)
    cond = torch.tensor([[3.0, 0.0, 7.0], [-2.0, 1.0, 7.0]])
    model = GaussianOptimalModel(diffusion)
    out = diffusion.sample(model, (2,), cond, samples_per_cond=4000, generator=torch.Generator().manual_seed(5))
    assert isinstance(out, SampleOutput)
    assert out.x0.shape == (8000, 2)
    assert torch.equal(out.cond, cond.repeat_interleave(4000, dim=0))
    group_means = out.x0.reshape(2, 4000, 2).mean(1)
    assert torch.allclose(group_means, cond[:, :2], atol=0.1)
    unconditional = diffusion.sample(model, (5, 2), samples_per_cond=3)
    assert unconditional.x0.shape == (15, 2) and unconditional.cond is None


def test_x_start_continuation_reproduces_the_chain():
    diffusion = Diffusion("ddpm", steps=10)
    model = GaussianOptimalModel(diffusion)
    full = diffusion.sample(model, (16, 2), return_chain=True, generator=torch.Generator().manual_seed(6))
    branch_step = 4
    generator = torch.Generator().manual_seed(6)
    for _ in range(branch_step + 1):  # the draws the full run made for x_T and the first steps
        torch.randn((16, 2), generator=generator)
    rest = diffusion.sample(model, (16, 2), x_start=full.chain[branch_step], start_step=branch_step,
                            return_chain=True, generator=generator)
    assert rest.chain.shape == (10 - branch_step + 1, 16, 2) and rest.log_probs.shape == (10 - branch_step, 16)
    assert torch.allclose(rest.chain, full.chain[branch_step:], atol=1e-6)
    assert torch.allclose(rest.log_probs, full.log_probs[branch_step:], atol=1e-5)


def test_x_start_continuation_with_cond_and_multistep_solver():
    diffusion = Diffusion("dpm_solver++", steps=20)
    cond = torch.randn(3, 2)
    model = GaussianOptimalModel(diffusion)
    first = diffusion.sample(model, (2,), cond, return_chain=True)
    branches = diffusion.sample(model, (2,), cond, samples_per_cond=4, x_start=first.chain[10], start_step=10,
                                return_chain=True)
    assert branches.x0.shape == (12, 2) and branches.chain.shape == (11, 12, 2)
    # a deterministic solver continues every copy of a latent the same way, to near the original sample (not
    # exactly: the continuation's first step is first order, since the multistep history is not carried over)
    assert torch.equal(branches.chain[0], first.chain[10].repeat_interleave(4, 0))
    assert torch.allclose(branches.x0.reshape(3, 4, 2), branches.x0[::4, None], atol=1e-6)
    assert torch.allclose(branches.x0[::4], first.x0, atol=0.1)


def test_network_time_is_level_over_train_steps():
    diffusion = Diffusion("ddpm", steps=4, train_steps=8)
    seen = []

    def model(x, t, cond):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    diffusion.sample(model, (3, 2))
    assert seen == [1.0, 0.75, 0.5, 0.25]
    times = diffusion.sample_train_time(1000, "cpu")
    assert torch.allclose(times * 8, (times * 8).round()) and times.min() >= 1 / 8 and times.max() <= 1
    continuous = Diffusion("sm", steps=4).sample_train_time(1000, "cpu")
    assert continuous.min() >= 1e-3 and continuous.max() <= 1


# ----- training losses --------------------------------------------------------------------------------------------
LOSS_CASES = [("ddpm", "eps"), ("ddpm", "x0"), ("ddpm", "velocity"), ("sm", "eps"), ("sm", "x0"),
              ("dpm_solver++", "velocity"), ("fm", None)]


@pytest.mark.parametrize("sampler, prediction", LOSS_CASES)
def test_eps_error_vanishes_for_an_oracle(sampler, prediction):
    """A network that outputs the exact training target implies the exact noise in every parametrisation."""
    diffusion = Diffusion(sampler, steps=10, prediction=prediction)
    x0 = DATA_MEAN + DATA_STD * torch.randn(512, 2)
    noise = torch.randn(512, 2)
    t = diffusion.sample_train_time(512, "cpu")
    target = diffusion.training_target(x0, noise, t)
    oracle = lambda x, time, cond: target  # noqa: E731
    assert diffusion.eps_error(oracle, x0, None, t, noise).max() < 1e-8
    assert diffusion.loss(oracle, x0, t=t, noise=noise).max() < 1e-10


@pytest.mark.parametrize("sampler, prediction", LOSS_CASES)
def test_loss_of_optimal_model_is_the_irreducible_variance(sampler, prediction):
    diffusion = Diffusion(sampler, steps=10, prediction=prediction)
    model = GaussianOptimalModel(diffusion)
    x0 = DATA_MEAN + DATA_STD * torch.randn(NUM_SAMPLES, 2, generator=torch.Generator().manual_seed(7))
    t = torch.full((NUM_SAMPLES,), 0.5)
    alpha, sigma = (level[:1] for level in diffusion.noise_levels(t))
    loss = diffusion.loss(model, x0, t=t).mean()
    irreducible = posterior_variance(diffusion, alpha, sigma).mean()
    assert loss.item() == pytest.approx(irreducible.item(), rel=0.05)
    # the eps error of the optimal model is Var(z | x_t), whatever the parametrisation
    z_variance = (alpha**2 * DATA_STD**2 / (alpha**2 * DATA_STD**2 + sigma**2)).mean()
    eps_error = diffusion.eps_error(model, x0, None, t, torch.randn_like(x0)).mean()
    assert eps_error.item() == pytest.approx(z_variance.item(), rel=0.05)


def test_loss_mask_and_known_entries():
    diffusion = Diffusion("ddpm", steps=10)
    x0 = torch.randn(4, 3, 2)
    noise = torch.randn(4, 3, 2)
    t = torch.full((4,), 0.6)
    known = torch.zeros(4, 3, 2, dtype=torch.bool)
    known[:, 0] = True
    inputs = []

    def model(x, time, cond):
        inputs.append(x)
        return torch.zeros_like(x)

    loss = diffusion.loss(model, x0, mask=~known, known=known, t=t, noise=noise)
    assert torch.equal(inputs[0][known], x0[known])
    assert torch.equal(inputs[0][~known], diffusion.add_noise(x0, t, noise)[~known])
    assert torch.allclose(loss, noise[:, 1:].square().flatten(1).mean(1))


def test_stochastic_flag_and_step_count():
    assert Diffusion("ddpm", steps=5).stochastic
    assert Diffusion("ddim", steps=5, eta=0.3).stochastic
    assert Diffusion("sm", steps=5).stochastic
    for sampler in ("fm", "dpm_solver++"):
        assert not Diffusion(sampler, steps=5).stochastic
    assert not Diffusion("ddim", steps=5).stochastic
    assert Diffusion("dpm_solver++", steps=15).num_sample_steps == 15


@pytest.mark.parametrize("kwargs", [
    dict(sampler="euler"),
    dict(sampler="ddpm", prediction="score"),
    dict(sampler="fm", prediction="eps"),
    dict(sampler="ddim", fm_solver="rk4"),
    dict(sampler="ddpm", fm_solver="heun"),
    dict(sampler="ddpm", eta=0.5),
    dict(sampler="ddim", eta=-1.0),
    dict(sampler="ddim", steps=20, train_steps=10),
    dict(sampler="ddpm", schedule="sigmoid"),
    dict(sampler="sm", steps=0),
])
def test_invalid_configurations_are_user_errors(kwargs):
    with pytest.raises(UserError):
        Diffusion(**kwargs)


def test_invalid_calls_are_user_errors():
    diffusion = Diffusion("dpm_solver++", steps=4)
    with pytest.raises(UserError):
        diffusion.step_distribution(lambda x, t, c: x, torch.zeros(2, 2), 0, None)
    with pytest.raises(UserError):
        diffusion.sample(lambda x, t, c: x, (2, 2), x_start=torch.zeros(3, 2))
    with pytest.raises(UserError):
        diffusion.sample(lambda x, t, c: x, (2, 2), inpaint_mask=torch.ones(2, 2, dtype=torch.bool))
