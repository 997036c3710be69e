"""The divergence monitor: a model that has walked off the data shows a higher denoising error on dataset samples and
more samples at the action bounds than one that matches the data, and reading it leaves the run's RNG untouched."""
import pytest
import torch

from common.diffusion import Diffusion
from common.training import DivergenceMonitor, fraction_at_bounds
from test_preset_sampler_accuracy import MixtureOptimalModel

pytestmark = pytest.mark.usefixtures("single_thread")
DATA = ([1.0], [0.5], [0.1])  # dataset actions ~ N(0.5, 0.1^2)
COLLAPSED = ([0.5, 0.5], [1.05, 0.6], [0.01, 0.05])  # half of the mass past the bound, the rest shifted and narrowed


class GaussianActions:
    """One-dimensional actions with a dummy condition, as an alignment sample space presents them."""

    device = torch.device("cpu")

    def __init__(self, diffusion: Diffusion):
        self.diffusion = diffusion

    def dataset_samples(self, batch: int):
        return DATA[1][0] + DATA[2][0] * torch.randn(batch, 1), torch.zeros(batch, 1)

    def eps_error(self, model, samples, cond, t, noise):
        return self.diffusion.eps_error(model, samples, cond, t, noise)

    def sample(self, model, cond):
        return self.diffusion.sample(model, (1,), cond)

    def actions(self, samples):
        return samples


def test_fraction_at_bounds_counts_entries_on_either_bound_after_clipping():
    actions = torch.tensor([[-1.0, 0.0, 0.9995, 1.5], [-0.5, -1.2, 0.2, 0.998]])
    assert fraction_at_bounds(actions) == pytest.approx(4 / 8)
    assert fraction_at_bounds(torch.tensor([0.0, 2.0]), low=-2.0, high=2.0) == pytest.approx(0.5)


@pytest.mark.parametrize("sampler", ["ddpm", "sm", "fm"])
def test_a_model_off_the_data_reads_higher_on_both_measures(sampler):
    diffusion = Diffusion(sampler, 20, train_steps=200)
    monitor = DivergenceMonitor(GaussianActions(diffusion), batch=2048)
    matching = monitor(MixtureOptimalModel(diffusion, *DATA))
    collapsed = monitor(MixtureOptimalModel(diffusion, *COLLAPSED))
    assert matching["actions_at_bounds"] < 0.01 and collapsed["actions_at_bounds"] > 0.3, (matching, collapsed)
    assert collapsed["denoising_error"] > 1.5 * matching["denoising_error"], (matching, collapsed)


def test_reading_the_monitor_is_deterministic_and_leaves_the_global_rng_alone():
    diffusion = Diffusion("ddpm", 20, train_steps=200)
    torch.manual_seed(123)
    monitor = DivergenceMonitor(GaussianActions(diffusion), batch=256)
    model = MixtureOptimalModel(diffusion, *DATA)
    state = torch.get_rng_state()
    first = monitor(model)
    assert torch.equal(torch.get_rng_state(), state)
    assert monitor(model) == first
