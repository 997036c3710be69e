"""Every sampler, built exactly as the Nav1D presets of dp_align.py and diffuser_align.py build it, reproduces narrow
and bounded data when its denoiser is exact.

The alignment methods push samples onto the action bound and into narrow bands; a sampler whose coarse steps shrink
such data (10 even DDPM steps halve a narrow spread) would undo them, however good the network. The data here are
Gaussian mixtures, whose Bayes-optimal denoiser is closed-form, so only the sampler's discretisation is measured.

Stated tolerances (README, "Samplers at few steps"):
- narrow data N(0.5, 0.1^2): sample std within 25% of the data's, sample mean within 0.1 data std of the data's;
- bounded data, 60% at the bound 1 (std 0.01) and 40% N(0, 0.3^2), clipped to [-1, 1] as actions are: the mass
  within 0.03 of the bound within 0.03 of the data's, and the spread of the rest (below 0.7) within 12% of the data's.
Each statistic is compared with the same statistic of draws from the mixture itself.
"""

import pytest
import torch

import diffuser_align
import dp_align
from common.diffusion import Diffusion
from common.runtime import apply_presets

NUM_SAMPLES = 20_000
NARROW = ([1.0], [0.5], [0.1])
BOUNDED = ([0.6, 0.4], [1.0, 0.0], [0.01, 0.3])
SCRIPTS = {"dp_align": dp_align, "diffuser_align": diffuser_align}


pytestmark = pytest.mark.usefixtures("single_thread")


class MixtureOptimalModel(torch.nn.Module):
    """Bayes-optimal network output for 1-d Gaussian-mixture data (weights, means, stds), in float64, for every
    parametrisation of `diffusion`."""

    def __init__(self, diffusion, weights, means, stds):
        super().__init__()
        self.diffusion = diffusion
        self.log_weights = torch.tensor(weights, dtype=torch.float64).log()
        self.means = torch.tensor(means, dtype=torch.float64)
        self.variances = torch.tensor(stds, dtype=torch.float64) ** 2

    def forward(self, x, t, cond):
        alpha, sigma = (level[:, None].double() for level in self.diffusion.noise_levels(t))
        residual = x.double() - alpha * self.means  # (B, components)
        variance = alpha**2 * self.variances + sigma**2
        responsibility = (self.log_weights - 0.5 * residual**2 / variance - 0.5 * variance.log()).softmax(-1)
        x0_hat = (responsibility * (self.means + alpha * self.variances / variance * residual)).sum(-1, keepdim=True)
        z_hat = (responsibility * sigma / variance * residual).sum(-1, keepdim=True)
        output = {"eps": z_hat, "x0": x0_hat}.get(self.diffusion.prediction)
        if output is None:  # velocity: z - x0 for fm, alpha z - sigma x0 for the VP samplers
            output = z_hat - x0_hat if self.diffusion.sampler == "fm" else alpha * z_hat - sigma * x0_hat
        return output.to(x.dtype)


def preset_diffusion(script, sampler: str):
    """The Diffusion a `--env nav1d-full --sampler <sampler>` run of `script` samples with."""
    argv = ["--env", "nav1d-full", "--sampler", sampler]
    args = script.Args(env="nav1d-full", sampler=sampler)
    apply_presets(args, script.PRESETS, argv=argv)
    return script.make_diffusion(args)


def draw(diffusion, mixture) -> torch.Tensor:
    with torch.no_grad():
        samples = diffusion.sample(MixtureOptimalModel(diffusion, *mixture), (NUM_SAMPLES, 1),
                                   generator=torch.Generator().manual_seed(0)).x0
    return samples.squeeze(1).double()


def draw_data(mixture) -> torch.Tensor:
    """The mixture itself, NUM_SAMPLES draws: the statistics below are compared with theirs."""
    weights, means, stds = (torch.tensor(values, dtype=torch.float64) for values in mixture)
    generator = torch.Generator().manual_seed(1)
    component = torch.multinomial(weights, NUM_SAMPLES, replacement=True, generator=generator)
    return means[component] + stds[component] * torch.randn(NUM_SAMPLES, generator=generator, dtype=torch.float64)


def statistics(narrow: torch.Tensor, bounded: torch.Tensor) -> dict[str, float]:
    bounded = bounded.clamp(-1, 1)  # actions are clipped to the box
    return {"narrow_mean": narrow.mean().item(), "narrow_std": narrow.std().item(),
            "mass_at_bound": (bounded > 0.97).double().mean().item(), "rest_std": bounded[bounded < 0.7].std().item()}


def errors(samples: dict[str, float], data: dict[str, float]) -> dict[str, float]:
    """Mean error in narrow stds, spread errors relative, bound mass absolute."""
    return {"narrow_mean": abs(samples["narrow_mean"] - data["narrow_mean"]) / data["narrow_std"],
            "narrow_std": samples["narrow_std"] / data["narrow_std"] - 1,
            "mass_at_bound": samples["mass_at_bound"] - data["mass_at_bound"],
            "rest_std": samples["rest_std"] / data["rest_std"] - 1}


DATA = statistics(draw_data(NARROW), draw_data(BOUNDED))


def within_tolerance(error: dict[str, float]) -> bool:
    return (abs(error["narrow_std"]) < 0.25 and error["narrow_mean"] < 0.1 and abs(error["mass_at_bound"]) < 0.03
            and abs(error["rest_std"]) < 0.12)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "sm", "fm"])
@pytest.mark.parametrize("script_name", list(SCRIPTS))
def test_preset_sampler_reproduces_narrow_and_bounded_data(script_name, sampler, record_property):
    diffusion = preset_diffusion(SCRIPTS[script_name], sampler)
    error = errors(statistics(draw(diffusion, NARROW), draw(diffusion, BOUNDED)), DATA)
    print(f"{script_name} {sampler} ({diffusion.steps} steps, {diffusion.spacing}): "
          + ", ".join(f"{name} {value:+.3f}" for name, value in error.items()))
    for name, value in error.items():
        record_property(name, value)
    assert within_tolerance(error), error


def test_the_yardstick_passes_many_steps_and_fails_ten_even_ones():
    """The optimal model with 1000 DDPM steps lands far inside the tolerances; 10 even steps of 10 levels, the
    Nav1D preset of dp_align.py before, fall outside them."""
    fine = Diffusion("ddpm", 1000, train_steps=1000)
    error = errors(statistics(draw(fine, NARROW), draw(fine, BOUNDED)), DATA)
    assert abs(error["narrow_std"]) < 0.03 and error["narrow_mean"] < 0.03 and abs(error["mass_at_bound"]) < 0.01
    assert abs(error["rest_std"]) < 0.03
    coarse = Diffusion("ddpm", 10, train_steps=10, clip_x0=1.0)
    assert not within_tolerance(errors(statistics(draw(coarse, NARROW), draw(coarse, BOUNDED)), DATA))
