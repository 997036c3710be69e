"""Networks shared by the method scripts, and LoRA adapters for them.

Every denoiser follows the call convention of `common/diffusion.py`: `model(x, t, cond)` with `t` the network time in
[0, 1] of shape (B,). The sequence denoisers (TemporalUNet, DiT1d, MLPDenoiser) take an optional fourth argument
`x_cond` (B, H, extra_in_dim): the conditioning sample of a cascade model. It enters through its own
zero-initialised projection `x_cond_proj`, added to the main input projection, so a cascade model loaded with the
foundation's weights computes exactly the foundation's function until it is trained.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.runtime import UserError

CASCADE_INPUT_PREFIX = "x_cond_proj."


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish, x * tanh(softplus(x)), through one sigmoid: with u = sigmoid(-x), tanh(softplus(x)) = (1 - u^2) / (1 + u^2).

    Equal to F.mish to ~1e-6 (with the same gradients), but F.mish is not vectorised on CPU: on the planner's
    activations (16 x 128 x 8) it takes ~64 us against ~25 us here, and the U-Net calls it 27 times per forward."""
    u2 = torch.sigmoid(-x).square()
    return torch.addcdiv(x, x * u2, 1.0 + u2, value=-2.0)


class Mish(nn.Module):
    """Module form of `mish` (no parameters, so state dicts match nn.Mish models)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mish(x)


# ----------------------------------------------------------------------------------------------------------------
# Time embeddings


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sin/cos features of t * scale: t in [0, 1] is stretched to the usual discrete-step range."""

    def __init__(self, dim: int, max_period: float = 10000.0, scale: float = 1000.0):
        super().__init__()
        half = dim // 2
        self.dim = dim
        self.scale = scale
        frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / max(half, 1))
        self.register_buffer("frequencies", frequencies, persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = (t.reshape(-1, 1).to(self.frequencies.dtype) * self.scale) * self.frequencies
        features = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        if self.dim % 2:
            features = F.pad(features, (0, 1))
        return features


class GaussianFourierTime(nn.Module):
    """Random Fourier features of t with fixed frequencies W ~ N(0, scale^2) (score-SDE / EDA time encoding).

    W is a buffer: not trained, but saved in the state dict so a reloaded model sees the same features.
    """

    def __init__(self, num_freqs: int = 16, scale: float = 30.0):
        super().__init__()
        self.register_buffer("W", torch.randn(num_freqs) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        angles = t.reshape(-1, 1).to(self.W.dtype) * self.W * (2.0 * math.pi)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------
# Plain MLPs: critics, inverse dynamics


class MLP(nn.Module):
    """Linear (+LayerNorm) + activation per hidden layer, then a linear output layer."""

    def __init__(self, in_dim: int, hidden_dims: Sequence[int], out_dim: int, activation: type[nn.Module] = nn.ReLU,
                 layer_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for hidden in hidden_dims:
            layers.append(nn.Linear(width, hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(activation())
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TwinQ(nn.Module):
    """Two independent Q heads [S+A -> hidden x layers -> 1] (IQL); forward returns (q1, q2), each (B,)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.q1 = MLP(state_dim + action_dim, [hidden] * layers, 1)
        self.q2 = MLP(state_dim + action_dim, [hidden] * layers, 1)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state_action = torch.cat([state, action], dim=-1)
        return self.q1(state_action).squeeze(-1), self.q2(state_action).squeeze(-1)


class ValueNet(nn.Module):
    """State value V(s) [S -> hidden x layers -> 1] for IQL; forward returns (B,)."""

    def __init__(self, state_dim: int, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.net = MLP(state_dim, [hidden] * layers, 1)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state).squeeze(-1)


class InverseDynamics(nn.Module):
    """a = g(s, s'), tanh-squashed to the normalised action box [-1, 1] (Decision Diffuser)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256):
        super().__init__()
        self.net = MLP(2 * state_dim, [hidden, hidden], action_dim)

    def forward(self, state: torch.Tensor, next_state: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(torch.cat([state, next_state], dim=-1)))


# ----------------------------------------------------------------------------------------------------------------
# EDA behaviour model backbone


def _check_cond(cond: torch.Tensor | None, cond_dim: int, model: str, what: str = "cond") -> None:
    """A missing input, or one given to a model built without it (which would silently ignore it), is a wiring bug."""
    if (cond is None) == (cond_dim > 0):
        dim_name = "cond_dim" if what == "cond" else "extra_in_dim"
        raise ValueError(f"{model} was built with {dim_name}={cond_dim} but got {what}="
                         f"{None if cond is None else tuple(cond.shape)}")


class _PreNormResidualBlock(nn.Module):
    """x + Linear(SiLU(Linear(LayerNorm(Dropout(x))))): the IDQL residual block."""

    def __init__(self, dim: int, expansion: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * expansion),
            nn.SiLU(),
            nn.Linear(dim * expansion, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class IDQLResidualMLP(nn.Module):
    """IDQL-style residual MLP (EDA's behavior network): forward(x, t, cond) -> (B, out_dim).

    EDA sums the outputs into the scalar energy f(a_t | s, t); all activations are smooth so the double backward of
    its score-matching loss is well defined.
    """

    def __init__(self, x_dim: int, cond_dim: int, out_dim: int | None = None, hidden: int = 256, blocks: int = 3,
                 expansion: int = 4, dropout: float = 0.1, x_embed: int = 128, cond_embed: int = 96,
                 time_embed: int = 32):
        super().__init__()
        if time_embed % 2:
            raise ValueError(f"time_embed must be even (sin/cos pairs), got {time_embed}")
        self.cond_dim = cond_dim
        self.time_features = GaussianFourierTime(num_freqs=time_embed // 2)
        self.time_mlp = nn.Sequential(nn.Linear(time_embed, time_embed), nn.SiLU(), nn.Linear(time_embed, time_embed))
        self.x_embed = nn.Linear(x_dim, x_embed)
        self.cond_embed = nn.Linear(cond_dim, cond_embed) if cond_dim > 0 else None
        trunk_in = x_embed + time_embed + (cond_embed if cond_dim > 0 else 0)
        self.input_layer = nn.Linear(trunk_in, hidden)
        self.blocks = nn.Sequential(*[_PreNormResidualBlock(hidden, expansion, dropout) for _ in range(blocks)])
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, x_dim if out_dim is None else out_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        _check_cond(cond, self.cond_dim, "IDQLResidualMLP")
        parts = [self.x_embed(x), self.time_mlp(self.time_features(t))]
        if self.cond_embed is not None:
            parts.append(self.cond_embed(cond))
        return self.head(self.blocks(self.input_layer(torch.cat(parts, dim=-1))))


# ----------------------------------------------------------------------------------------------------------------
# Sequence denoisers (Diffuser U-Net, DiT, flattened MLP)




class _Conv1dBlock(nn.Module):
    """Conv1d -> GroupNorm -> Mish, length preserving."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 5, groups: int = 8):
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(groups, out_ch)
        self.act = Mish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class _TemporalResidualBlock(nn.Module):
    """Two conv blocks with FiLM (scale, shift) from the time(+cond) embedding between them, plus a 1x1 skip.

    Takes the embedding already passed through Mish (computed once per forward for all blocks)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, kernel_size: int = 5):
        super().__init__()
        self.block1 = _Conv1dBlock(in_ch, out_ch, kernel_size)
        self.block2 = _Conv1dBlock(out_ch, out_ch, kernel_size)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb).unsqueeze(-1).chunk(2, dim=1)
        h = self.block1(x) * (1.0 + scale) + shift
        return self.block2(h) + self.skip(x)


class _Upsample1d(nn.Module):
    """Nearest-neighbour x2 then Conv1d(k=3): a plain Conv1d, so LoRA can adapt it (unlike ConvTranspose1d)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TemporalUNet(nn.Module):
    """Diffuser-style temporal U-Net over a trajectory window: forward(x (B,H,x_dim), t, cond, x_cond) -> (B,H,x_dim).

    Channels base_dim * dim_mults; each level halves the horizon, so H must be divisible by 2**(levels-1).
    The time embedding (sinusoidal -> MLP) plus, with cond_dim > 0, an embedding of cond drives FiLM in every block.
    """

    def __init__(self, x_dim: int, horizon: int, cond_dim: int = 0, base_dim: int = 32,
                 dim_mults: Sequence[int] = (1, 2, 4), extra_in_dim: int = 0):
        super().__init__()
        levels = len(dim_mults)
        if levels < 1:
            raise UserError("TemporalUNet needs at least one entry in dim_mults")
        if horizon < 1 or horizon % (2 ** (levels - 1)):
            raise UserError(f"horizon {horizon} must be a positive multiple of {2 ** (levels - 1)} for a U-Net with "
                            f"{levels} levels (dim_mults={tuple(dim_mults)}); use e.g. a power of two")
        channels = [base_dim * m for m in dim_mults]
        if any(c % 8 for c in channels):
            raise UserError(f"U-Net channels {channels} must be multiples of 8 (GroupNorm with 8 groups); "
                            f"change base_dim={base_dim}")
        self.horizon = horizon
        self.cond_dim = cond_dim
        emb_dim = base_dim
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(base_dim), nn.Linear(base_dim, 4 * base_dim), Mish(),
                                      nn.Linear(4 * base_dim, emb_dim))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, 4 * base_dim), Mish(), nn.Linear(4 * base_dim, emb_dim))
                         if cond_dim > 0 else None)
        self.input_proj = nn.Conv1d(x_dim, base_dim, 1)
        self.extra_in_dim = extra_in_dim
        self.x_cond_proj = _zero_init(nn.Conv1d(extra_in_dim, base_dim, 1)) if extra_in_dim > 0 else None

        self.down = nn.ModuleList()
        width = base_dim
        for level, out_ch in enumerate(channels):
            self.down.append(nn.ModuleList([
                _TemporalResidualBlock(width, out_ch, emb_dim),
                _TemporalResidualBlock(out_ch, out_ch, emb_dim),
                nn.Conv1d(out_ch, out_ch, 3, stride=2, padding=1) if level < levels - 1 else nn.Identity(),
            ]))
            width = out_ch
        self.mid1 = _TemporalResidualBlock(width, width, emb_dim)
        self.mid2 = _TemporalResidualBlock(width, width, emb_dim)
        self.up = nn.ModuleList()
        for level in reversed(range(1, levels)):
            self.up.append(nn.ModuleList([
                _TemporalResidualBlock(width + channels[level], channels[level - 1], emb_dim),
                _TemporalResidualBlock(channels[level - 1], channels[level - 1], emb_dim),
                _Upsample1d(channels[level - 1]),
            ]))
            width = channels[level - 1]
        self.output = nn.Sequential(_Conv1dBlock(width, width), nn.Conv1d(width, x_dim, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                x_cond: torch.Tensor | None = None) -> torch.Tensor:
        _check_cond(cond, self.cond_dim, "TemporalUNet")
        _check_cond(x_cond, self.extra_in_dim, "TemporalUNet", "x_cond")
        emb = self.time_mlp(t)
        if self.cond_mlp is not None:
            emb = emb + self.cond_mlp(cond)
        emb = mish(emb)
        h = self.input_proj(x.transpose(1, 2))
        if self.x_cond_proj is not None:
            h = h + self.x_cond_proj(x_cond.transpose(1, 2))
        skips = []
        for level, (block1, block2, downsample) in enumerate(self.down):
            h = block2(block1(h, emb), emb)
            if level > 0:  # as in Diffuser, the full-resolution activations get no skip connection
                skips.append(h)
            h = downsample(h)
        h = self.mid2(self.mid1(h, emb), emb)
        for block1, block2, upsample in self.up:
            h = upsample(block2(block1(torch.cat([h, skips.pop()], dim=1), emb), emb))
        return self.output(h).transpose(1, 2)


class _DiTBlock(nn.Module):
    """Pre-LN transformer block whose LayerNorm shift/scale and residual gates come from the conditioning (adaLN-zero):
    the gates start at zero, so every block starts as the identity."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * hidden, hidden))
        self.modulation = _zero_init(nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).unsqueeze(1).chunk(6, dim=-1)
        batch, tokens, hidden = x.shape
        h = self.norm1(x) * (1.0 + scale1) + shift1
        q, k, v = self.qkv(h).view(batch, tokens, 3, self.heads, hidden // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, hidden)
        x = x + gate1 * self.attn_out(attended)
        h = self.norm2(x) * (1.0 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class DiT1d(nn.Module):
    """Small DiT over a chunk: one token per horizon step; forward(x (B,H,x_dim), t, cond, x_cond) -> (B,H,x_dim).

    The conditioning vector is time embedding + cond embedding (DP adds the observation embedding to the time
    embedding). adaLN-zero blocks and a zero output layer make the untrained model output 0; the output
    layer receives gradients from the first step, so the model trains as usual.
    """

    def __init__(self, x_dim: int, horizon: int, cond_dim: int, hidden: int = 128, depth: int = 4, heads: int = 4,
                 extra_in_dim: int = 0):
        super().__init__()
        if hidden % heads:
            raise UserError(f"DiT hidden size {hidden} must be divisible by heads={heads}")
        self.horizon = horizon
        self.cond_dim = cond_dim
        self.token_embed = nn.Linear(x_dim, hidden)
        self.extra_in_dim = extra_in_dim
        self.x_cond_proj = _zero_init(nn.Linear(extra_in_dim, hidden)) if extra_in_dim > 0 else None
        self.position = nn.Parameter(torch.randn(1, horizon, hidden) * 0.02)
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(hidden), nn.Linear(hidden, hidden), nn.SiLU(),
                                      nn.Linear(hidden, hidden))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                         if cond_dim > 0 else None)
        self.blocks = nn.ModuleList([_DiTBlock(hidden, heads) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = _zero_init(nn.Linear(hidden, 2 * hidden))
        self.output = _zero_init(nn.Linear(hidden, x_dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                x_cond: torch.Tensor | None = None) -> torch.Tensor:
        _check_cond(cond, self.cond_dim, "DiT1d")
        _check_cond(x_cond, self.extra_in_dim, "DiT1d", "x_cond")
        c = self.time_mlp(t)
        if self.cond_mlp is not None:
            c = c + self.cond_mlp(cond)
        h = self.token_embed(x)
        if self.x_cond_proj is not None:
            h = h + self.x_cond_proj(x_cond)
        h = h + self.position
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_modulation(F.silu(c)).unsqueeze(1).chunk(2, dim=-1)
        return self.output(self.final_norm(h) * (1.0 + scale) + shift)


class MLPDenoiser(nn.Module):
    """Cheap denoiser: the whole (H, x_dim) chunk flattened through an MLP, with time(+cond) embedding concatenated."""

    def __init__(self, x_dim: int, horizon: int, cond_dim: int, hidden: int = 256, layers: int = 3,
                 extra_in_dim: int = 0):
        super().__init__()
        if layers < 1:
            raise UserError(f"MLPDenoiser needs at least one hidden layer, got layers={layers}")
        self.horizon = horizon
        self.x_dim = x_dim
        self.cond_dim = cond_dim
        self.input_proj = nn.Linear(horizon * x_dim, hidden)
        self.extra_in_dim = extra_in_dim
        self.x_cond_proj = _zero_init(nn.Linear(horizon * extra_in_dim, hidden)) if extra_in_dim > 0 else None
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(hidden), nn.Linear(hidden, hidden), Mish(),
                                      nn.Linear(hidden, hidden))
        self.cond_mlp = (nn.Sequential(nn.Linear(cond_dim, hidden), Mish(), nn.Linear(hidden, hidden))
                         if cond_dim > 0 else None)
        trunk: list[nn.Module] = [Mish(), nn.Linear(2 * hidden, hidden)]
        for _ in range(layers - 1):
            trunk += [Mish(), nn.Linear(hidden, hidden)]
        trunk += [Mish(), nn.Linear(hidden, horizon * x_dim)]
        self.trunk = nn.Sequential(*trunk)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                x_cond: torch.Tensor | None = None) -> torch.Tensor:
        _check_cond(cond, self.cond_dim, "MLPDenoiser")
        _check_cond(x_cond, self.extra_in_dim, "MLPDenoiser", "x_cond")
        emb = self.time_mlp(t)
        if self.cond_mlp is not None:
            emb = emb + self.cond_mlp(cond)
        h = self.input_proj(x.flatten(1))
        if self.x_cond_proj is not None:
            h = h + self.x_cond_proj(x_cond.flatten(1))
        return self.trunk(torch.cat([h, emb], dim=-1)).view_as(x)


def _zero_init(layer: nn.Module) -> nn.Module:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def load_foundation_into_cascade(cascade: nn.Module, foundation_state: dict) -> None:
    """Warm-start a cascade model (extra_in_dim > 0) from a foundation state dict of the same architecture.

    Every foundation key must load; the only keys allowed to stay at their initial values are those of the
    zero-initialised conditioning-sample projection, so the cascade starts as the foundation.
    """
    if getattr(cascade, "x_cond_proj", None) is None:
        raise ValueError("load_foundation_into_cascade needs a model built with extra_in_dim > 0")
    try:
        missing, unexpected = cascade.load_state_dict(foundation_state, strict=False)
    except RuntimeError as error:  # shape mismatch: a foundation of another size or task
        raise UserError(f"foundation checkpoint does not fit the cascade model: {str(error).splitlines()[-1].strip()}")
    wrong_missing = [key for key in missing if not key.startswith(CASCADE_INPUT_PREFIX)]
    if unexpected or wrong_missing:
        raise UserError(f"foundation checkpoint does not fit the cascade model: missing {wrong_missing[:5]}, "
                        f"unexpected {list(unexpected)[:5]} (LoRA weights must be merged into the foundation first)")


# ----------------------------------------------------------------------------------------------------------------
# LoRA


class _LoRABase(nn.Module):
    """Frozen base layer plus a trainable low-rank update base(x) + lora_up(lora_down(x)) * alpha / rank.

    lora_down keeps the default kaiming-uniform init, lora_up starts at zero, so the wrapped layer starts equal to the
    base layer. `enabled = False` (see `lora_disabled`) gives back the base layer, i.e. the reference model.
    The update is linear, so it is applied as the weight delta lora_up.W @ lora_down.W (see `forward`).
    """

    lora_down: nn.Module
    lora_up: nn.Module

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.enabled = True
        for parameter in base.parameters():
            parameter.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        # One base-shaped op on W + delta instead of three ops on the activations: fewer kernel launches for the
        # small batches of planning, and the same gradients for the factors.
        return self._forward_with_weight(x, self.base.weight + self.delta_weight())

    def _finish_init(self) -> None:
        weight = self.base.weight
        self.lora_down.to(device=weight.device, dtype=weight.dtype)
        self.lora_up.to(device=weight.device, dtype=weight.dtype)
        nn.init.zeros_(self.lora_up.weight)

    @torch.no_grad()
    def merged_base(self) -> nn.Module:
        """The base layer with the low-rank update folded into its weight (in place)."""
        self.base.weight.add_(self.delta_weight())
        return self.base


class LoRALinear(_LoRABase):
    """LoRA around an nn.Linear: W + (alpha/rank) * B A with A (rank, in) kaiming-uniform and B (out, rank) zeros."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__(base, rank, alpha)
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        self._finish_init()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_up.weight @ self.lora_down.weight) * self.scaling

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x, weight, self.base.bias)


class LoRAConv1d(_LoRABase):
    """LoRA around an nn.Conv1d: Conv1d(in, rank, k) with the base's stride/padding/dilation, then Conv1d(rank, out, 1)."""

    def __init__(self, base: nn.Conv1d, rank: int, alpha: float):
        super().__init__(base, rank, alpha)
        if base.groups != 1:
            raise ValueError("LoRAConv1d supports only groups=1 convolutions")
        self.lora_down = nn.Conv1d(base.in_channels, rank, base.kernel_size, stride=base.stride, padding=base.padding,
                                   dilation=base.dilation, padding_mode=base.padding_mode, bias=False)
        self.lora_up = nn.Conv1d(rank, base.out_channels, 1, bias=False)
        self._finish_init()

    def delta_weight(self) -> torch.Tensor:
        # (out, rank) @ (rank, in * k) -> (out, in, k)
        down = self.lora_down.weight
        return (self.lora_up.weight.flatten(1) @ down.flatten(1)).view(-1, *down.shape[1:]) * self.scaling

    def _forward_with_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.base._conv_forward(x, weight, self.base.bias)


def _lora_modules(model: nn.Module) -> Iterator[_LoRABase]:
    return (module for module in model.modules() if isinstance(module, _LoRABase))


def inject_lora(model: nn.Module, rank: int, alpha: float, include_conv: bool = True) -> list[nn.Parameter]:
    """Wrap every nn.Linear (and groups=1 nn.Conv1d if include_conv) of `model` in place with LoRA.

    All pre-existing parameters are frozen; returns the new trainable LoRA parameters. The same call on a fresh model
    reproduces the state-dict keys, so an adapted model's checkpoint loads after inject_lora with the same rank.
    """
    if isinstance(model, (nn.Linear, nn.Conv1d)):
        raise ValueError("inject_lora wraps the layers inside a model; wrap a single layer with LoRALinear/LoRAConv1d")
    if any(True for _ in _lora_modules(model)):
        raise ValueError("inject_lora: model already has LoRA adapters")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    targets = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear:
                targets.append((parent, name, LoRALinear(child, rank, alpha)))
            elif include_conv and type(child) is nn.Conv1d and child.groups == 1:
                targets.append((parent, name, LoRAConv1d(child, rank, alpha)))
    for parent, name, wrapped in targets:
        setattr(parent, name, wrapped)
    return lora_parameters(model)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable low-rank factors of every LoRA layer in `model`."""
    parameters = []
    for module in _lora_modules(model):
        parameters += [module.lora_down.weight, module.lora_up.weight]
    return parameters


@contextmanager
def lora_disabled(model: nn.Module):
    """Switch every adapter off inside the block: the model then computes the frozen reference (base) function."""
    modules = list(_lora_modules(model))
    previous = [module.enabled for module in modules]
    for module in modules:
        module.enabled = False
    try:
        yield model
    finally:
        for module, was_enabled in zip(modules, previous):
            module.enabled = was_enabled


class Reference(nn.Module):
    """The frozen reference of an aligned model: the policy with its LoRA adapters off, or a frozen full copy of the
    foundation (full fine-tuning). Called like the denoiser; it holds no weights of its own to train or save."""

    def __init__(self, policy: nn.Module, frozen_copy: nn.Module | None):
        super().__init__()
        self.frozen_copy = frozen_copy
        self._policy = [policy]  # a plain list: the reference must not own (or checkpoint) the policy's weights

    def forward(self, *inputs):
        if self.frozen_copy is not None:
            return self.frozen_copy(*inputs)
        with lora_disabled(self._policy[0]):
            return self._policy[0](*inputs)


def policy_with_reference(foundation: nn.Module, lora_rank: int, lora_alpha: float) -> tuple[nn.Module, Reference]:
    """The model alignment trains (a copy of the foundation with LoRA adapters on its Linear and Conv1d layers, or a
    trainable full copy when rank is 0) and its frozen reference."""
    policy = copy.deepcopy(foundation)
    if lora_rank > 0:
        inject_lora(policy, lora_rank, lora_alpha, include_conv=True)
        return policy, Reference(policy, None)
    return policy.requires_grad_(True), Reference(policy, copy.deepcopy(foundation).requires_grad_(False))


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain base layer back in its place (state-dict keys of
    the original architecture again, e.g. to warm-start a cascade). Merged base weights stay frozen."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _LoRABase):
                setattr(parent, name, child.merged_base())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries (buffers such as the fixed Fourier frequencies are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
