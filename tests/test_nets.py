"""Networks: shapes, the EDA backbone size, cascade warm start, and LoRA (init, training, disabling, merging, resume)."""
import pytest
import torch
import torch.nn as nn

from common.nets import (
    mish,
    DiT1d,
    GaussianFourierTime,
    IDQLResidualMLP,
    InverseDynamics,
    LoRAConv1d,
    LoRALinear,
    MLP,
    MLPDenoiser,
    SinusoidalTimeEmbedding,
    TemporalUNet,
    TwinQ,
    ValueNet,
    count_parameters,
    inject_lora,
    load_foundation_into_cascade,
    lora_disabled,
    lora_parameters,
    merge_lora,
)
from common.runtime import UserError

B, H, X_DIM, COND_DIM = 4, 8, 3, 5


@pytest.fixture(autouse=True)
def _seed_and_single_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine spinning threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _sequence_models(extra_in_dim=0):
    return {
        "unet": TemporalUNet(X_DIM, H, COND_DIM, base_dim=16, dim_mults=(1, 2, 4), extra_in_dim=extra_in_dim),
        "dit": DiT1d(X_DIM, H, COND_DIM, hidden=32, depth=2, heads=4, extra_in_dim=extra_in_dim),
        "mlp": MLPDenoiser(X_DIM, H, COND_DIM, hidden=64, layers=2, extra_in_dim=extra_in_dim),
    }


def _perturb(model, scale=0.1):
    """Move every parameter off its init so zero-initialised layers (DiT output) do not make comparisons trivial."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn_like(parameter))


def _inputs(batch=B):
    return torch.randn(batch, H, X_DIM), torch.rand(batch), torch.randn(batch, COND_DIM)


def test_time_embeddings():
    t = torch.rand(B)
    assert SinusoidalTimeEmbedding(32)(t).shape == (B, 32)
    at_zero = SinusoidalTimeEmbedding(8)(torch.zeros(1))
    torch.testing.assert_close(at_zero, torch.tensor([[0.0] * 4 + [1.0] * 4]))
    assert SinusoidalTimeEmbedding(7)(t).shape == (B, 7)
    fourier = GaussianFourierTime(16, 30.0)
    assert fourier(t).shape == (B, 32)
    assert "W" in fourier.state_dict() and count_parameters(fourier) == 0
    torch.manual_seed(1)
    same_seed = GaussianFourierTime(16, 30.0)
    torch.manual_seed(1)
    assert torch.equal(same_seed.W, GaussianFourierTime(16, 30.0).W)


def test_critic_and_inverse_dynamics_shapes():
    s, a = torch.randn(B, 11), torch.rand(B, 3) * 2 - 1
    q1, q2 = TwinQ(11, 3)(s, a)
    assert q1.shape == q2.shape == (B,) and not torch.equal(q1, q2)
    assert ValueNet(11)(s).shape == (B,)
    actions = InverseDynamics(11, 3)(s, torch.randn(B, 11))
    assert actions.shape == (B, 3) and actions.abs().max() <= 1
    assert MLP(4, [8, 8], 2, activation=nn.Mish, layer_norm=True)(torch.randn(B, 4)).shape == (B, 2)
    assert count_parameters(TwinQ(11, 3)) == 2 * ((14 * 256 + 256) + (256 * 256 + 256) + 257)


def test_idql_residual_mlp_hopper_shapes_and_size():
    model = IDQLResidualMLP(x_dim=3, cond_dim=11)
    out = model(torch.randn(B, 3), torch.rand(B), torch.randn(B, 11))
    assert out.shape == (B, 3)
    # EDA's behavior network layer by layer: time MLP 2*(32*32+32), x 3*128+128, state 11*96+96, input 256*256+256,
    # 3 blocks of [LayerNorm 2*256, 256*1024+1024, 1024*256+256], head 256*3+3. The "~1.85M" quoted for EDA also
    # counts an unused Linear(256, 256) per block in the authors' code (3 * 65,792 more: 1,845,955) that never
    # enters the forward pass, so the function computed is the same.
    expected = 2 * 1056 + 512 + 1152 + 65792 + 3 * (512 + 263168 + 262400) + 771
    assert count_parameters(model) == expected == 1_648_579
    assert IDQLResidualMLP(3, 11, out_dim=1)(torch.randn(B, 3), torch.rand(B), torch.randn(B, 11)).shape == (B, 1)


def test_idql_energy_gradient_matches_finite_differences():
    """EDA's eps is -sigma * grad_a f with f the summed outputs: check the autograd gradient and the double backward."""
    model = IDQLResidualMLP(3, 11, dropout=0.0).double().eval()
    a, t, s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True), torch.rand(2).double(), torch.randn(2, 11).double()
    grad = torch.autograd.grad(model(a, t, s).sum(), a, create_graph=True)[0]
    step = 1e-6
    for dim in range(3):
        shift = torch.zeros_like(a)
        shift[:, dim] = step
        with torch.no_grad():
            numeric = (model(a + shift, t, s).sum(-1) - model(a - shift, t, s).sum(-1)) / (2 * step)
        torch.testing.assert_close(grad[:, dim], numeric, rtol=1e-5, atol=1e-7)
    grad.pow(2).sum().backward()  # the score-matching loss differentiates through the gradient
    assert model.input_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["unet", "dit", "mlp"])
def test_sequence_denoiser_shapes_and_gradients(name):
    model = _sequence_models()[name]
    x, t, cond = _inputs()
    out = model(x, t, cond)
    assert out.shape == x.shape
    out.pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_unet_unconditional_and_default_size():
    model = TemporalUNet(14, 32)
    x = torch.randn(2, 32, 14)
    assert model(x, torch.rand(2)).shape == x.shape
    assert model(x, torch.rand(2), None).shape == x.shape


@pytest.mark.parametrize("horizon, dim_mults", [(10, (1, 2, 4)), (12, (1, 2, 4, 8)), (0, (1, 2))])
def test_unet_rejects_horizon_not_divisible(horizon, dim_mults):
    with pytest.raises(UserError, match="horizon"):
        TemporalUNet(X_DIM, horizon, dim_mults=dim_mults)


def test_unet_accepts_divisible_horizon():
    assert TemporalUNet(X_DIM, 12, dim_mults=(1, 2, 4), base_dim=8)(torch.randn(1, 12, X_DIM), torch.rand(1)).shape == (1, 12, X_DIM)


@pytest.mark.parametrize("name", ["unet", "dit", "mlp"])
def test_cascade_starts_as_the_foundation(name):
    foundation = _sequence_models()[name].eval()
    _perturb(foundation)
    cascade = _sequence_models(extra_in_dim=X_DIM)[name].eval()
    load_foundation_into_cascade(cascade, foundation.state_dict())
    x, t, cond = _inputs()
    x_cond = torch.randn_like(x)
    with torch.no_grad():
        expected = foundation(x, t, cond)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(cascade(x, t, cond, x_cond), expected, rtol=0, atol=0)
        _perturb(cascade.x_cond_proj)
        assert not torch.allclose(cascade(x, t, cond, x_cond), expected)


def test_cascade_rejects_a_foreign_foundation():
    cascade = _sequence_models(extra_in_dim=X_DIM)["unet"]
    other = TemporalUNet(X_DIM, H, COND_DIM, base_dim=8, dim_mults=(1, 2, 4))
    with pytest.raises(UserError, match="does not fit"):
        load_foundation_into_cascade(cascade, other.state_dict())
    foundation = _sequence_models()["unet"]
    state = foundation.state_dict()
    del state["input_proj.weight"]
    with pytest.raises(UserError, match="input_proj.weight"):
        load_foundation_into_cascade(cascade, state)


def _train_step(parameters, loss):
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("make_layer, make_input", [
    (lambda: nn.Linear(6, 5), lambda: torch.randn(B, 6)),
    (lambda: nn.Conv1d(6, 5, 5, padding=2), lambda: torch.randn(B, 6, 9)),
    (lambda: nn.Conv1d(6, 5, 3, stride=2, padding=1), lambda: torch.randn(B, 6, 9)),
])
def test_lora_layer_init_training_disable_and_merge(make_layer, make_input):
    base = make_layer()
    reference = make_layer()
    reference.load_state_dict(base.state_dict())
    wrapper = (LoRALinear if isinstance(base, nn.Linear) else LoRAConv1d)(base, rank=2, alpha=4.0)
    x = make_input()
    torch.testing.assert_close(wrapper(x), reference(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in base.parameters())

    _train_step(lora_parameters(wrapper), wrapper(x).pow(2).sum())
    with torch.no_grad():
        adapted = wrapper(x)
        assert not torch.allclose(adapted, reference(x))
        # the weight-delta forward is the LoRA definition base(x) + up(down(x)) * alpha / rank
        low_rank_path = reference(x) + wrapper.lora_up(wrapper.lora_down(x)) * 2.0
        torch.testing.assert_close(adapted, low_rank_path, rtol=1e-5, atol=1e-6)
        with lora_disabled(wrapper):
            torch.testing.assert_close(wrapper(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(wrapper(x), adapted)
        torch.testing.assert_close(wrapper.merged_base()(x), adapted, rtol=1e-5, atol=1e-6)


def test_inject_lora_on_unet_trains_only_adapters_and_merges():
    model = TemporalUNet(X_DIM, H, COND_DIM, base_dim=16, extra_in_dim=X_DIM)
    _perturb(model)
    x, t, cond = _inputs()
    x_cond = torch.randn_like(x)
    with torch.no_grad():
        before = model(x, t, cond, x_cond)
    convs = sum(isinstance(m, nn.Conv1d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    params = inject_lora(model, rank=4, alpha=8.0)
    assert sum(isinstance(m, LoRAConv1d) for m in model.modules()) == convs
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == linears
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert count_parameters(model, trainable_only=True) == sum(p.numel() for p in params)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, cond, x_cond), before, rtol=0, atol=0)

    _train_step(params, model(x, t, cond, x_cond).pow(2).mean())
    with torch.no_grad():
        adapted = model(x, t, cond, x_cond)
        assert not torch.allclose(adapted, before)
        with lora_disabled(model):
            torch.testing.assert_close(model(x, t, cond, x_cond), before, rtol=0, atol=0)
        merge_lora(model)
        assert not any(isinstance(m, (LoRALinear, LoRAConv1d)) for m in model.modules())
        torch.testing.assert_close(model(x, t, cond, x_cond), adapted, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == set(TemporalUNet(X_DIM, H, COND_DIM, base_dim=16, extra_in_dim=X_DIM).state_dict())


@pytest.mark.parametrize("name", ["dit", "mlp"])
def test_inject_lora_linear_only_models(name):
    model = _sequence_models()[name]
    _perturb(model)
    x, t, cond = _inputs()
    with torch.no_grad():
        before = model(x, t, cond)
    params = inject_lora(model, rank=2, alpha=2.0, include_conv=False)
    assert params and all(p.requires_grad for p in params)
    _train_step(params, model(x, t, cond).pow(2).mean())
    with torch.no_grad():
        assert not torch.allclose(model(x, t, cond), before)
        with lora_disabled(model):
            torch.testing.assert_close(model(x, t, cond), before, rtol=0, atol=0)


def test_unet_without_conv_lora_keeps_convs_plain():
    model = TemporalUNet(X_DIM, H, base_dim=16)
    inject_lora(model, rank=2, alpha=2.0, include_conv=False)
    assert not any(isinstance(m, LoRAConv1d) for m in model.modules())
    assert any(isinstance(m, LoRALinear) for m in model.modules())


def test_lora_checkpoint_resumes_on_a_fresh_injected_model():
    model = TemporalUNet(X_DIM, H, COND_DIM, base_dim=16)
    params = inject_lora(model, rank=2, alpha=4.0)
    x, t, cond = _inputs()
    _train_step(params, model(x, t, cond).pow(2).mean())
    state = model.state_dict()

    fresh = TemporalUNet(X_DIM, H, COND_DIM, base_dim=16)
    inject_lora(fresh, rank=2, alpha=4.0)
    fresh.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, cond), model(x, t, cond), rtol=0, atol=0)


def test_inject_lora_twice_is_refused():
    model = MLPDenoiser(X_DIM, H, COND_DIM, hidden=16, layers=1)
    inject_lora(model, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="already"):
        inject_lora(model, rank=2, alpha=2.0)


@pytest.mark.parametrize("name", ["unet", "dit", "mlp"])
def test_sequence_denoisers_fit_a_fixed_batch(name):
    """Zero-initialised layers (DiT adaLN-zero and output, cascade projections) must not stall training."""
    model = _sequence_models(extra_in_dim=X_DIM)[name]
    x, t, cond = _inputs()
    x_cond, target = torch.randn_like(x), torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = (model(x, t, cond, x_cond) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert model.x_cond_proj.weight.abs().sum() > 0


def test_lora_follows_the_base_dtype_and_moves_with_the_model():
    model = TemporalUNet(X_DIM, H, base_dim=8).double()
    params = inject_lora(model, rank=2, alpha=2.0)
    assert all(p.dtype == torch.float64 for p in params)
    model.float()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, H, X_DIM)
    assert model(x, torch.rand(2)).shape == x.shape


@pytest.mark.parametrize("name", ["unet", "dit", "mlp"])
def test_missing_or_ignored_inputs_are_refused(name):
    x, t, cond = _inputs()
    with pytest.raises(ValueError, match="cond"):
        _sequence_models()[name](x, t, None)
    with pytest.raises(ValueError, match="x_cond"):
        _sequence_models()[name](x, t, cond, torch.randn_like(x))
    with pytest.raises(ValueError, match="x_cond"):
        _sequence_models(extra_in_dim=X_DIM)[name](x, t, cond)
    with pytest.raises(ValueError, match="cond_dim=0"):
        TemporalUNet(X_DIM, H, base_dim=8)(x, t, cond)


def test_fast_mish_matches_torch_mish_in_value_and_gradient():
    x = torch.linspace(-60.0, 60.0, 20001, dtype=torch.float64, requires_grad=True)
    ours, reference = mish(x), nn.functional.mish(x)
    assert torch.allclose(ours, reference, atol=1e-12, rtol=1e-10)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    (grad_reference,) = torch.autograd.grad(reference.sum(), x)
    assert torch.allclose(grad_ours, grad_reference, atol=1e-10, rtol=1e-8)
    x32 = torch.linspace(-60.0, 60.0, 20001)
    assert (mish(x32) - nn.functional.mish(x32)).abs().max() < 1e-5
    assert torch.isfinite(mish(torch.tensor([-1e4, 1e4]))).all()
