"""Diffusion planners (Diffuser, Decision Diffuser) aligned with a Q-function by RL, QV-PG, DPO, SFT and cascading.

Paper: Huh & Mohapatra, "Maximize Your Diffusion: A Study into Reward Maximization and Alignment for Diffusion-based
Control" (planning half: Table 2). Design notes: DESIGN.md section 4.

Overview. A foundation planner is trained on fixed-length windows of the offline data: Diffuser diffuses
(state, action) windows with a temporal U-Net, Decision Diffuser (DD) diffuses state windows and reads actions off an
inverse-dynamics model. Both are trained with masked in-painting (a random causal prefix of the window is given, the
loss counts only the rest), which is how the current state is imposed at planning time. An IQL critic, trained on
the same data, scores a plan by Q(s_0, a_0): every environment step draws 16 plans, executes the first action of the
best one and replans. Alignment then moves the planner towards high-Q plans with one set of LoRA adapters (the frozen
base is the reference model): `rl` treats the denoising chain as an MDP (REINFORCE or PPO-clip with credit weights
over denoising steps and an optional KL to the reference), `qvpg` back-propagates -Q through the last K denoising
steps, `dpo` is Diffusion-DPO on pairs ranked by Q, `sft` fine-tunes on the best plans whose reference likelihood is
high enough, and `cascade` trains a second, warm-started model that turns a plan into a better one and is applied
once at inference. `--align rl,dpo,sft --passes P` runs the methods in sequence, evaluating after each.
"""
from __future__ import annotations

import copy
import functools
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import nav1d

from common.data import (Normalizer, evaluate, gather_windows, iql_rewards, load_offline_data, normalized_score,
                         sample_windows_index)
from common.diffusion import SAMPLERS, Diffusion, gaussian_log_prob
from common.nets import (InverseDynamics, TemporalUNet, TwinQ, ValueNet, count_parameters, inject_lora,
                         load_foundation_into_cascade, lora_disabled)
from common.runtime import (Timer, UserError, apply_presets, check_finite, cli, cuda_graphed, load_module_state,
                            capture_rng, read_checkpoint_file, print_results_table, restore_rng, stage_stats,
                            start_run, use_cuda_graphs)

PLANNERS = ("diffuser", "dd")
PLANNER_SAMPLERS = tuple(name for name in SAMPLERS if name != "dpm_solver++")  # multistep: no per-step Gaussian
METHODS = ("rl", "qvpg", "dpo", "sft", "cascade")


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """name of the experiment (part of the default run directory)"""
    seed: int = 0
    """seed of training and of the evaluation episodes"""
    env: str = "nav1d-full"
    """dataset: nav1d-partial|full|expert, a Minari id (mujoco/hopper/medium-v0) or a D4RL name (hopper-medium-v2)"""
    device: str = "auto"
    """auto, cpu or cuda"""
    torch_deterministic: bool = True
    """deterministic torch algorithms (same seed and device -> same numbers)"""
    run_dir: str = ""
    """output folder (default runs/{env}__{exp_name}__{seed}__{unix_time})"""
    resume: bool = False
    """continue the run in --run-dir from its latest checkpoint (finished stages are skipped)"""
    eval_episodes: int = 20
    """evaluation episodes after every stage"""
    eval_every: int = 0
    """also evaluate every N steps inside each alignment method, for learning curves (0: only after each method)"""
    save_every: int = 5000
    """checkpoint every N steps of a stage (and at the end of every stage)"""
    compile: bool = False
    """torch.compile the denoiser for foundation training and for planning (evaluation)"""
    cuda_graphs: bool = True
    """on a GPU, replay the foundation and critic steps and planning from CUDA graphs (no effect on a CPU)"""
    cpu_threads: int = 0
    """torch CPU threads (0: torch's default); small networks run faster on 1, above all on a busy machine"""

    planner: str = "diffuser"
    """diffuser: (state, action) windows; dd: state windows + inverse dynamics (Decision Diffuser)"""
    sampler: str = "ddpm"
    """ddpm|ddim|sm|fm; ddim (eta=0) and fm are deterministic: use qvpg (or --ddim-eta > 0) for RL alignment"""
    ddim_eta: float = 0.0
    """DDIM noise scale (0 deterministic, > 0 stochastic steps that RL alignment can use)"""
    prediction: str = ""
    """network output eps|x0|velocity; empty: x0 for ddpm/ddim (as Diffuser: eps-prediction divides by the tiny
    alpha of the noisiest level and blows up), eps for sm, velocity for fm"""
    denoising_steps: int = 20
    """sampler steps (also the number of discrete noise levels for ddpm/ddim)"""
    horizon: int = 32
    """planning window length in environment steps (a power of two for the U-Net)"""
    unet_base_dim: int = 32
    """channels of the first U-Net level (a multiple of 8)"""
    unet_dim_mults: tuple[int, ...] = (1, 2, 4)
    """channel multipliers per U-Net level"""
    num_plans: int = 16
    """plans drawn per environment step; the one with the highest plan reward is executed"""
    plan_reward: str = "q0"
    """q0: Q(s_0, a_0); mean: mean of Q over the plan's steps"""
    eval_max_steps: int = 0
    """cap on evaluation episode length (0: the environment's own limit)"""

    load_foundation: str = ""
    """take the trained foundation planner (and dd's inverse dynamics) from this diffuser_align checkpoint"""
    foundation_steps: int = 200_000
    """gradient steps of the foundation planner"""
    batch_size: int = 256
    """windows per foundation / inverse-dynamics batch"""
    foundation_lr: float = 2e-4
    """Adam learning rate of the foundation planner"""
    inverse_dynamics_steps: int = 100_000
    """gradient steps of the inverse-dynamics model (dd only)"""
    inverse_dynamics_hidden: int = 256
    """hidden width of the inverse-dynamics MLP"""

    load_critic: str = ""
    """take the trained IQL critic from this diffuser_align checkpoint"""
    critic_steps: int = 1_000_000
    """IQL gradient steps"""
    critic_batch_size: int = 256
    """transitions per IQL batch"""
    critic_lr: float = 3e-4
    """Adam learning rate of Q and V"""
    critic_hidden: int = 256
    """hidden width of Q and V"""
    expectile: float = 0.7
    """IQL expectile tau of the V loss"""
    discount: float = 0.99
    """discount factor"""
    polyak: float = 0.005
    """target-Q averaging rate"""

    align: str = "rl,dpo,sft"
    """comma-separated alignment methods run in this order each pass: rl, qvpg, dpo, sft, cascade"""
    passes: int = 1
    """repetitions of the --align sequence"""
    lora_rank: int = 8
    """LoRA rank on every Linear and Conv1d of the planner (0: full fine-tuning, frozen copy as reference)"""
    lora_alpha: float = 16.0
    """LoRA scale numerator (update scaled by alpha / rank)"""
    align_lr: float = 1e-4
    """Adam learning rate of the rl and qvpg methods"""
    dpo_lr: float = 3e-5
    """Adam learning rate of the dpo method"""
    sft_lr: float = 1e-5
    """Adam learning rate of the sft method"""
    cascade_lr: float = 1e-4
    """Adam learning rate of the cascade model"""
    align_states: int = 32
    """conditioning states (dataset states) per alignment batch"""
    align_samples: int = 16
    """plans sampled per conditioning state (advantages, pairs and SFT ranking are per state)"""
    entropy_coef: float = 0.0
    """weight of a nearest-neighbour entropy bonus among a state's plans, added to the plan reward"""
    rl_steps: int = 1000
    """updates of the rl method (each samples a fresh batch of chains)"""
    rl_algo: str = "ppo"
    """ppo (clipped ratio, several epochs per batch) or reinforce"""
    ppo_clip: float = 0.2
    """PPO ratio clip epsilon"""
    ppo_epochs: int = 2
    """updates per sampled batch for ppo"""
    rl_credit: str = "uniform"
    """weights over denoising steps: uniform, decay (geometric, larger near x_0) or similarity"""
    credit_decay: float = 0.9
    """ratio of the decay credit weights between consecutive denoising steps"""
    kl_coef: float = 0.0
    """weight of the per-step KL to the reference model (rl and qvpg)"""
    qvpg_steps: int = 1000
    """updates of the qvpg method"""
    qvpg_last_k: int = 5
    """denoising steps that gradients of -Q flow through"""
    qvpg_random_k: bool = False
    """draw K uniformly from 1..qvpg_last_k for every batch"""
    dpo_steps: int = 1000
    """updates of the dpo method"""
    dpo_beta: float = 200.0
    """Diffusion-DPO inverse temperature (errors are means over dims, so it is large for small windows)"""
    sft_steps: int = 1000
    """updates of the sft method"""
    sft_top_fraction: float = 0.25
    """fraction of each state's plans (highest reward first) proposed for fine-tuning"""
    sft_quantile: float = 0.9
    """likelihood threshold: a plan is accepted if its reference ELBO proxy is below this quantile of dataset windows"""
    sft_elbo_draws: int = 8
    """fixed (t, noise) draws of the ELBO proxy"""
    sft_source: str = "current"
    """which model proposes SFT plans: current (the aligned planner) or reference"""
    cascade_steps: int = 1000
    """updates of the cascade model"""
    cascade_branch_step: int = 10
    """denoising step whose latent is shared by the branched continuations forming a cascade pair"""
    cascade_branches: int = 4
    """continuations per shared latent; the worst becomes the condition, the best the target"""
    online_episodes: int = 0
    """episodes collected with the aligned planner between passes and added to the critic's data (0: offline)"""
    online_critic_steps: int = 10_000
    """IQL steps on the grown data after each online collection"""


PRESETS = {
    "nav1d": dict(horizon=8, unet_base_dim=16, unet_dim_mults=(1, 2), foundation_steps=3000, batch_size=256,
                  foundation_lr=1e-3, inverse_dynamics_steps=2000, inverse_dynamics_hidden=64, critic_steps=6000,
                  critic_hidden=64, expectile=0.9, eval_episodes=32, save_every=1000, align_states=32,
                  rl_steps=60, qvpg_steps=60, dpo_steps=60, sft_steps=60, cascade_steps=150, align_lr=1e-3,
                  lora_rank=8, online_critic_steps=1000, cpu_threads=1),
    # The expert data covers a narrow band of actions, so Q is unreliable off it: without a KL to the reference, rl
    # took Diffuser-DDPM from 7.50 to 5.14 (coherency 0.92 -> 0.50, seed 0); with kl_coef 10, 7.50 -> 7.51 (0.93).
    "nav1d-expert": dict(kl_coef=10.0),
    "hopper": dict(horizon=32, unet_base_dim=32, unet_dim_mults=(1, 2, 4)),
}


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (before any work)
# ----------------------------------------------------------------------------------------------------------------
def parse_methods(text: str) -> list[str]:
    methods = [name.strip() for name in text.split(",") if name.strip()]
    if not methods:
        raise UserError("--align needs at least one method (rl, qvpg, dpo, sft, cascade)")
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise UserError(f"unknown alignment method(s) {', '.join(unknown)} in --align; choose from {', '.join(METHODS)}")
    return methods


def validate_args(args: Args) -> list[str]:
    """Every argument mistake becomes a one-line UserError here, before data loading or training."""
    if args.planner not in PLANNERS:
        raise UserError(f"unknown --planner '{args.planner}'; choose diffuser or dd")
    if args.sampler not in PLANNER_SAMPLERS:
        raise UserError(f"unknown --sampler '{args.sampler}' for a planner; choose one of {', '.join(PLANNER_SAMPLERS)}")
    if args.prediction not in ("", "eps", "x0", "velocity"):
        raise UserError(f"unknown --prediction '{args.prediction}'; choose eps, x0 or velocity")
    if args.plan_reward not in ("q0", "mean"):
        raise UserError(f"unknown --plan-reward '{args.plan_reward}'; choose q0 or mean")
    if args.rl_algo not in ("ppo", "reinforce"):
        raise UserError(f"unknown --rl-algo '{args.rl_algo}'; choose ppo or reinforce")
    if args.rl_credit not in ("uniform", "decay", "similarity"):
        raise UserError(f"unknown --rl-credit '{args.rl_credit}'; choose uniform, decay or similarity")
    if args.sft_source not in ("current", "reference"):
        raise UserError(f"unknown --sft-source '{args.sft_source}'; choose current or reference")
    if args.horizon < 2 or args.horizon & (args.horizon - 1):
        raise UserError(f"--horizon must be a power of two >= 2 for the temporal U-Net, got {args.horizon}")
    if args.horizon % 2 ** (len(args.unet_dim_mults) - 1):
        raise UserError(f"--horizon {args.horizon} is too short for {len(args.unet_dim_mults)} U-Net levels")
    if args.unet_base_dim < 8 or args.unet_base_dim % 8:
        raise UserError(f"--unet-base-dim must be a positive multiple of 8 (GroupNorm), got {args.unet_base_dim}")
    positive = dict(denoising_steps=args.denoising_steps, num_plans=args.num_plans, batch_size=args.batch_size,
                    critic_batch_size=args.critic_batch_size, passes=args.passes, align_states=args.align_states,
                    eval_episodes=args.eval_episodes, save_every=args.save_every, sft_elbo_draws=args.sft_elbo_draws,
                    ppo_epochs=args.ppo_epochs, qvpg_last_k=args.qvpg_last_k, dpo_beta=args.dpo_beta,
                    foundation_lr=args.foundation_lr, critic_lr=args.critic_lr, align_lr=args.align_lr,
                    dpo_lr=args.dpo_lr, sft_lr=args.sft_lr, cascade_lr=args.cascade_lr)
    for name, value in positive.items():
        if value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    for name in ("foundation_steps", "inverse_dynamics_steps", "critic_steps", "rl_steps", "qvpg_steps", "dpo_steps",
                 "sft_steps", "cascade_steps", "online_episodes", "online_critic_steps", "eval_every",
                 "eval_max_steps", "lora_rank", "kl_coef", "entropy_coef", "ddim_eta"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.align_samples < 2:
        raise UserError(f"--align-samples must be >= 2 (rankings and advantages need several plans), got {args.align_samples}")
    if args.cascade_branches < 2:
        raise UserError(f"--cascade-branches must be >= 2, got {args.cascade_branches}")
    if not 0 <= args.cascade_branch_step < args.denoising_steps:
        raise UserError(f"--cascade-branch-step must be in [0, {args.denoising_steps}), got {args.cascade_branch_step}")
    if args.qvpg_last_k > args.denoising_steps:
        raise UserError(f"--qvpg-last-k ({args.qvpg_last_k}) exceeds --denoising-steps ({args.denoising_steps})")
    for name in ("expectile", "sft_quantile", "sft_top_fraction", "credit_decay"):
        if not 0 < getattr(args, name) <= (0.999999 if name == "expectile" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)}")
    if not 0 < args.discount <= 1 or not 0 < args.polyak <= 1 or not 0 < args.ppo_clip < 1:
        raise UserError("--discount and --polyak must be in (0, 1], --ppo-clip in (0, 1)")
    if args.ddim_eta > 0 and args.sampler != "ddim":
        raise UserError("--ddim-eta applies only to --sampler ddim")
    methods = parse_methods(args.align)
    if "rl" in methods and not make_diffusion(args).stochastic:
        raise UserError(f"--align rl needs a stochastic sampler (step likelihoods); --sampler {args.sampler} with these "
                        "settings is deterministic: use qvpg instead, or --sampler ddim --ddim-eta 1.0")
    return methods


def make_diffusion(args: Args) -> Diffusion:
    prediction = args.prediction or {"ddpm": "x0", "ddim": "x0", "sm": "eps", "fm": "velocity"}[args.sampler]
    return Diffusion(args.sampler, args.denoising_steps, eta=args.ddim_eta if args.sampler == "ddim" else 0.0,
                     prediction=prediction)


# ----------------------------------------------------------------------------------------------------------------
# Planning: in-painting, plan rewards, plan selection
# ----------------------------------------------------------------------------------------------------------------
def inpaint_current_state(states: torch.Tensor, horizon: int, x_dim: int, repeats: int):
    """Known-entry mask and values imposing each (normalised) state on step 0 of its `repeats` plans."""
    state_dim = states.shape[1]
    known = torch.zeros(states.shape[0] * repeats, horizon, x_dim, dtype=torch.bool, device=states.device)
    known[:, 0, :state_dim] = True
    values = torch.zeros(known.shape, device=states.device)
    values[:, 0, :state_dim] = states.repeat_interleave(repeats, 0)
    return known, values


def random_prefix_masks(batch: int, horizon: int, state_dim: int, x_dim: int, device) -> torch.Tensor:
    """Masked in-painting for training: steps before a random L in [0, H) are fully known, and the state of step L.

    L = 0 is the planning-time case (only the current state given); longer prefixes teach in-painting in general.
    """
    prefix = torch.randint(0, horizon, (batch, 1), device=device)
    steps = torch.arange(horizon, device=device).unsqueeze(0)
    known = (steps < prefix).unsqueeze(-1).expand(batch, horizon, x_dim).clone()
    known[..., :state_dim] |= (steps == prefix).unsqueeze(-1)
    return known


class CascadeDenoiser(nn.Module):
    """The cascade U-Net called as model(x, t, cond): `cond` is the plan being improved (extra input channels)."""

    def __init__(self, unet: TemporalUNet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond):
        return self.unet(x, t, None, x_cond=cond)


class Planner:
    """Everything needed to plan: the diffusion sampler, the denoiser, the critic and (dd) the inverse dynamics.

    Plans live in normalised space: states by the dataset normaliser, actions scaled from their bounds to [-1, 1].
    """

    def __init__(self, args: Args, diffusion: Diffusion, denoiser: nn.Module, q_target: TwinQ, state_dim: int,
                 action_dim: int, inverse_dynamics: nn.Module | None = None, cuda_graphs: bool = False):
        self.kind, self.horizon, self.num_plans, self.reward_kind = args.planner, args.horizon, args.num_plans, args.plan_reward
        self.diffusion, self.denoiser, self.q_target, self.inverse_dynamics = diffusion, denoiser, q_target, inverse_dynamics
        self.state_dim, self.action_dim = state_dim, action_dim
        self.x_dim = state_dim + (action_dim if self.kind == "diffuser" else 0)
        self.cascade: nn.Module | None = None
        self.compile = args.compile
        self._compiled: dict[nn.Module, nn.Module] = {}
        self.cuda_graphs = cuda_graphs
        self._graphed_act: dict[tuple, object] = {}  # (denoiser, cascade) -> act replayed from CUDA graphs

    def acting_denoiser(self) -> nn.Module:
        """The denoiser as `act` calls it: with --compile a torch.compile'd wrapper of the current denoiser, made once
        per denoiser object (it reads the live weights, so training in between needs no new compilation)."""
        if not self.compile:
            return self.denoiser
        if self.denoiser not in self._compiled:
            self._compiled[self.denoiser] = torch.compile(self.denoiser)
        return self._compiled[self.denoiser]

    def sample(self, states, repeats, model=None, **sample_kwargs):
        """`repeats` plans per state with the state in-painted; SampleOutput over (len(states) * repeats) plans."""
        known, values = inpaint_current_state(states, self.horizon, self.x_dim, repeats)
        batch_shape = (known.shape[0], self.horizon, self.x_dim)
        return self.diffusion.sample(model if model is not None else self.denoiser, batch_shape, None, inpaint_mask=known,
                                     inpaint_values=values, **sample_kwargs)

    def refine(self, plans):
        """One pass through the cascade model: a new plan conditioned on each given plan (same current state)."""
        known, values = inpaint_current_state(plans[:, 0, : self.state_dim], self.horizon, self.x_dim, 1)
        return self.diffusion.sample(self.cascade, (self.horizon, self.x_dim), plans, inpaint_mask=known,
                                     inpaint_values=values).x0

    def states_actions(self, plans):
        """(B, H, S) states and (B, H-1 or H, A) actions of plans; dd reads actions off g(s_t, s_{t+1})."""
        states = plans[..., : self.state_dim]
        if self.kind == "diffuser":
            return states, plans[..., self.state_dim:]
        return states, self.inverse_dynamics(states[:, :-1], states[:, 1:])

    def rewards(self, plans):
        """Plan reward: min twin-Q of the first step, or of every step averaged (--plan-reward mean)."""
        states, actions = self.states_actions(plans)
        steps = 1 if self.reward_kind == "q0" else actions.shape[1]
        actions = actions[:, :steps].clamp(-1, 1)  # the executed action; Q is not trusted outside the action box
        q1, q2 = self.q_target(states[:, :steps].flatten(0, 1), actions.flatten(0, 1))
        return torch.min(q1, q2).view(plans.shape[0], steps).mean(1)

    def act(self, states, use_cascade=False):
        """Draw num_plans per state in one sampler call, keep the best by plan reward; (actions, chosen plans).
        With CUDA graphs the returned tensors are overwritten by the next call."""
        denoiser, cascade = self.acting_denoiser(), self.cascade if use_cascade else None
        if not self.cuda_graphs:
            return self._act(states, denoiser, cascade)
        key = (denoiser, cascade)  # a new denoiser (LoRA, cascade) gets its own graphs; weights are read live
        if key not in self._graphed_act:
            self._graphed_act[key] = cuda_graphed(lambda s: self._act(s, denoiser, cascade), True)
        return self._graphed_act[key](states)

    @torch.no_grad()
    def _act(self, states, denoiser, cascade):
        plans = self.sample(states, self.num_plans, model=denoiser).x0
        if cascade is not None:
            plans = self.refine(plans)
        best = select_best_plans(self.rewards(plans), self.num_plans)
        chosen = plans.view(states.shape[0], self.num_plans, self.horizon, self.x_dim)[torch.arange(len(states), device=plans.device), best]
        _, actions = self.states_actions(chosen)
        return actions[:, 0].clamp(-1, 1), chosen


def select_best_plans(rewards: torch.Tensor, plans_per_state: int) -> torch.Tensor:
    """Index (within its state's group) of the highest-reward plan for every state."""
    return rewards.view(-1, plans_per_state).argmax(1)


def advantages_per_state(rewards: torch.Tensor, samples_per_state: int) -> torch.Tensor:
    """(r - mean) / (std + 1e-8) among the samples of one conditioning state, clipped to +-5 (DESIGN 4.2)."""
    grouped = rewards.view(-1, samples_per_state)
    normalised = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-8)
    return normalised.clamp(-5, 5).flatten()


def entropy_bonus(plans: torch.Tensor, samples_per_state: int) -> torch.Tensor:
    """log distance to the nearest other plan of the same state (a Kozachenko-Leonenko entropy term, up to constants)."""
    grouped = plans.flatten(1).view(-1, samples_per_state, plans[0].numel())
    distances = torch.cdist(grouped, grouped) + torch.eye(samples_per_state, device=plans.device) * 1e6
    return torch.log(distances.min(2).values + 1e-6).flatten()


# ----------------------------------------------------------------------------------------------------------------
# Alignment losses
# ----------------------------------------------------------------------------------------------------------------
def credit_weights(kind: str, chain: torch.Tensor, stochastic: torch.Tensor, decay: float) -> torch.Tensor:
    """(S, B) weights of the stochastic denoising steps, mean 1 over those steps for every sample."""
    steps, batch = chain.shape[0] - 1, chain.shape[1]
    if kind == "uniform":
        weights = torch.ones(steps, batch, device=chain.device)
    elif kind == "decay":  # geometric, largest on the last step (closest to x_0)
        weights = (decay ** torch.arange(steps - 1, -1, -1, device=chain.device, dtype=torch.float32)).unsqueeze(1)
        weights = weights.expand(steps, batch).clone()
    else:  # cosine similarity of each move with the direction to the final sample, clamped at 0
        moves = (chain[1:] - chain[:-1]).flatten(2)
        to_final = (chain[-1:] - chain[:-1]).flatten(2)
        weights = F.cosine_similarity(moves, to_final, dim=2, eps=1e-8).clamp(min=0)
    weights = weights * stochastic.unsqueeze(1)
    return weights / weights.sum(0, keepdim=True).clamp(min=1e-8) * stochastic.sum()


def step_log_prob(diffusion: Diffusion, model, chain, step: int, free_mask):
    """log pi(x_{step+1} | x_step) under `model` (sum over not-in-painted entries), and the step's (mean, std)."""
    mean, std = diffusion.step_distribution(model, chain[step], step, None)
    return gaussian_log_prob(chain[step + 1], mean, std, free_mask), mean, std


def policy_gradient_loss(log_prob, old_log_prob, advantages, weights, algo: str, clip: float):
    """Per-step loss (mean over samples) of REINFORCE or PPO-clip, and the importance ratio."""
    ratio = torch.exp(log_prob - old_log_prob)
    if algo == "reinforce":
        return -(weights * log_prob * advantages).mean(), ratio
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    return (weights * torch.max(-advantages * ratio, -advantages * clipped)).mean(), ratio


def kl_to_reference(mean, reference_mean, std, free_mask):
    """KL between the step Gaussians of policy and reference (equal variances): ||mu - mu_ref||^2 / (2 std^2).

    Deterministic steps (std 0) use std 1, i.e. a plain squared distance between the two updates."""
    variance = std**2 if std > 0 else 1.0
    return (((mean - reference_mean) ** 2) * free_mask).flatten(1).sum(1).mean() / (2 * variance)


def dpo_loss(diffusion: Diffusion, model, reference, winners, losers, known, beta: float):
    """Diffusion-DPO: the same t and noise for both members of a pair; returns (loss, implicit accuracy)."""
    t = diffusion.sample_train_time(winners.shape[0], winners.device)
    noise = torch.randn_like(winners)
    both = torch.cat([winners, losers])
    t2, noise2, known2 = torch.cat([t, t]), torch.cat([noise, noise]), torch.cat([known, known])
    errors = diffusion.eps_error(model, both, None, t2, noise2, mask=~known2, known=known2)
    with torch.no_grad(), reference() as reference_model:
        reference_errors = diffusion.eps_error(reference_model, both, None, t2, noise2, mask=~known2, known=known2)
    win_error, lose_error = errors.chunk(2)
    ref_win_error, ref_lose_error = reference_errors.chunk(2)
    margin = (win_error - lose_error) - (ref_win_error - ref_lose_error)
    return -F.logsigmoid(-beta * margin).mean(), (margin < 0).float().mean()


def elbo_proxy(diffusion: Diffusion, model, plans, known, draws: list[tuple[torch.Tensor, torch.Tensor]]):
    """Denoising error averaged over fixed (t, noise) draws: low means likely under `model` (an ELBO proxy)."""
    scores = torch.zeros(plans.shape[0], device=plans.device)
    for t_value, noise in draws:
        t = torch.full((plans.shape[0],), t_value, device=plans.device)
        scores += diffusion.eps_error(model, plans, None, t, noise.expand_as(plans), mask=~known, known=known)
    return scores / len(draws)


# ----------------------------------------------------------------------------------------------------------------
# Critic (IQL) and data helpers
# ----------------------------------------------------------------------------------------------------------------
def iql_losses(q, q_target, value, batch, expectile: float, discount: float):
    """IQL: expectile regression of V on min target-Q, and Q towards r + gamma (1 - done) V(s')."""
    states, actions, rewards, next_states, terminals = batch
    with torch.no_grad():
        target_q = torch.min(*q_target(states, actions))
        next_value = value(next_states)
    diff = target_q - value(states)
    value_loss = (torch.abs(expectile - (diff < 0).float()) * diff**2).mean()
    td_target = rewards + discount * (1.0 - terminals) * next_value
    q1, q2 = q(states, actions)
    return value_loss, ((q1 - td_target) ** 2 + (q2 - td_target) ** 2).mean()


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, rate: float) -> None:
    for target_param, param in zip(target.parameters(), source.parameters()):
        target_param.lerp_(param, rate)


def affine_fit(raw: np.ndarray, transformed: np.ndarray) -> tuple[float, float]:
    """(scale, shift) with transformed = scale * raw + shift: the IQL reward convention is affine per dataset."""
    if np.ptp(raw) == 0:
        return 1.0, float(np.mean(transformed - raw))
    scale, shift = np.polyfit(raw.astype(np.float64), transformed.astype(np.float64), 1)
    return float(scale), float(shift)


def collect_transitions(planner: Planner, make_env, episodes: int, seed: int, to_model, action_from_model, max_steps):
    """Roll out the planner (one env at a time) and return (s, a, r, s', terminal) arrays in dataset units."""
    rows = {key: [] for key in ("observations", "actions", "rewards", "next_observations", "terminals")}
    for episode in range(episodes):
        env = make_env()
        obs, _ = env.reset(seed=seed + episode)
        for _ in range(max_steps or 10**9):
            action, _ = planner.act(to_model(obs[None]))
            env_action = action_from_model(action)[0]
            next_obs, reward, terminated, truncated, _ = env.step(env_action)
            for key, value in zip(rows, (obs, env_action, reward, next_obs, terminated)):
                rows[key].append(np.asarray(value, dtype=np.float32))
            obs = next_obs
            if terminated or truncated:
                break
        env.close()
    return {key: np.stack(values) for key, values in rows.items()}


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    presets = apply_presets(args, PRESETS)
    methods = validate_args(args)
    run = start_run(args, script="diffuser_align")
    device, writer = run.device, run.writer
    if presets:
        print(f"preset values for {args.env}: {presets}")
    wall_start = time.time()
    checkpoint = run.load_checkpoint() if args.resume else None

    # ---------------- data ----------------
    data = load_offline_data(args.env)
    state_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    state_norm = Normalizer.from_array(data.observations)
    action_low, action_high = np.asarray(data.action_low, np.float32), np.asarray(data.action_high, np.float32)
    action_scale = lambda a: 2.0 * (np.asarray(a, np.float32) - action_low) / (action_high - action_low) - 1.0
    action_unscale = lambda a: action_low + (np.asarray(a) + 1.0) * 0.5 * (action_high - action_low)
    to_model = lambda obs: torch.as_tensor(state_norm.normalize(np.asarray(obs, np.float32)), device=device)
    action_from_model = lambda a: np.clip(action_unscale(a.cpu().numpy()), action_low, action_high)
    window_starts = sample_windows_index(data, args.horizon)
    states_np = state_norm.normalize(data.observations).astype(np.float32)
    actions_np = action_scale(data.actions).astype(np.float32)
    windows_source = np.concatenate([states_np, actions_np], 1) if args.planner == "diffuser" else states_np
    x_dim = windows_source.shape[1]
    critic_rewards = iql_rewards(data).astype(np.float32)
    reward_scale, reward_shift = affine_fit(data.rewards, critic_rewards)  # the same convention for online data
    transitions = dict(observations=states_np, actions=actions_np, rewards=critic_rewards,
                       next_observations=state_norm.normalize(data.next_observations).astype(np.float32),
                       terminals=data.terminals.astype(np.float32))
    rng = np.random.default_rng(args.seed)

    def window_batch(size: int) -> torch.Tensor:
        starts = window_starts[rng.integers(0, len(window_starts), size)]
        windows, _ = gather_windows(windows_source, starts, args.horizon, data.episode_ends)
        return torch.as_tensor(windows, device=device)

    def transition_batch(size: int):
        index = rng.integers(0, len(transitions["observations"]), size)
        return [torch.as_tensor(transitions[key][index], device=device) for key in
                ("observations", "actions", "rewards", "next_observations", "terminals")]

    # ---------------- models ----------------
    diffusion = make_diffusion(args)
    make_unet = lambda extra=0: TemporalUNet(x_dim, args.horizon, 0, args.unet_base_dim, args.unet_dim_mults,
                                             extra_in_dim=extra).to(device)
    foundation = make_unet()
    inverse_dynamics = InverseDynamics(state_dim, action_dim, args.inverse_dynamics_hidden).to(device)
    q, value = TwinQ(state_dim, action_dim, args.critic_hidden).to(device), ValueNet(state_dim, args.critic_hidden).to(device)
    q_target = copy.deepcopy(q).requires_grad_(False)
    print(f"foundation U-Net: {count_parameters(foundation):,} parameters, x_dim {x_dim}, horizon {args.horizon}")
    planner_net: nn.Module | None = None  # foundation + LoRA adapters (or a full copy), made after foundation training
    frozen_reference: nn.Module | None = None  # only for --lora-rank 0
    cascade_unet: TemporalUNet | None = None
    graphs = use_cuda_graphs(args, device)
    planner = Planner(args, diffusion, foundation, q_target, state_dim, action_dim,
                      inverse_dynamics if args.planner == "dd" else None, cuda_graphs=graphs)

    def build_aligned_planner() -> None:
        nonlocal planner_net, frozen_reference
        planner_net = copy.deepcopy(foundation)
        if args.lora_rank > 0:
            inject_lora(planner_net, args.lora_rank, args.lora_alpha, include_conv=True)
        else:
            frozen_reference = copy.deepcopy(foundation).requires_grad_(False)
        planner.denoiser = planner_net

    @contextmanager
    def reference():
        """The frozen foundation: adapters switched off, or the frozen copy for full fine-tuning."""
        if frozen_reference is not None:
            yield frozen_reference
        else:
            with lora_disabled(planner_net) as model:
                yield model

    def build_cascade() -> None:
        nonlocal cascade_unet
        cascade_unet = make_unet(extra=x_dim)
        load_foundation_into_cascade(cascade_unet, foundation.state_dict())
        planner.cascade = CascadeDenoiser(cascade_unet)

    # ---------------- checkpoint state ----------------
    completed: list[str] = []
    results: dict[str, dict] = {}
    throughput: dict[str, float] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    online_data: dict[str, np.ndarray] = {}
    resume_stage, resume_step, resume_optimizers = None, 0, {}
    if checkpoint is not None:
        completed, results, throughput = checkpoint["completed"], checkpoint["results"], checkpoint["throughput"]
        resume_stage, resume_step, resume_optimizers = checkpoint["stage"], checkpoint["step"], checkpoint["optimizers"]
        models = checkpoint["models"]
        load_module_state(foundation, models["foundation"], "the foundation planner")
        load_module_state(inverse_dynamics, models["inverse_dynamics"], "the inverse dynamics")
        for module, key in ((q, "q"), (q_target, "q_target"), (value, "value")):
            load_module_state(module, models[key], f"the critic ({key})")
        if "planner" in models:
            build_aligned_planner()
            load_module_state(planner_net, models["planner"], "the aligned planner")
        if "cascade" in models:
            build_cascade()
            load_module_state(cascade_unet, models["cascade"], "the cascade model")
        online_data = checkpoint["online_data"]
        if online_data:
            for key in transitions:
                transitions[key] = np.concatenate([transitions[key], online_data[key]])
        rng.bit_generator.state = checkpoint["numpy_rng"]
        restore_rng(checkpoint["rng"])
        print(f"resuming from stage '{resume_stage}' step {resume_step}; finished: {', '.join(completed) or 'none'}")

    def load_stage_from(path: str, stages: list[str], modules: dict[str, nn.Module], same: tuple[str, ...]) -> None:
        """Reuse finished stages of another run (same data and sizes), e.g. one foundation for many alignments."""
        other = read_checkpoint_file(path, "diffuser_align")
        differing = [f"{name}={other['args'].get(name)!r}" for name in same if other["args"].get(name) != getattr(args, name)]
        if differing:
            raise UserError(f"checkpoint '{path}' was trained with other settings ({', '.join(differing)})")
        missing = [stage for stage in stages if stage not in other["completed"]]
        if missing:
            raise UserError(f"checkpoint '{path}' has not finished stage(s) {', '.join(missing)}")
        for key, module in modules.items():
            load_module_state(module, other["models"][key], f"{key} from '{path}'")
        completed.extend(stages)
        print(f"loaded {', '.join(stages)} from {path}")

    if checkpoint is None and args.load_foundation:
        load_stage_from(args.load_foundation, ["foundation"] + (["inverse_dynamics"] if args.planner == "dd" else []),
                        dict(foundation=foundation, inverse_dynamics=inverse_dynamics),
                        ("env", "planner", "sampler", "prediction", "denoising_steps"))
    if checkpoint is None and args.load_critic:
        load_stage_from(args.load_critic, ["critic"], dict(q=q, q_target=q_target, value=value), ("env",))

    def save(stage: str, step: int) -> None:
        models = dict(foundation=foundation.state_dict(), inverse_dynamics=inverse_dynamics.state_dict(),
                      q=q.state_dict(), q_target=q_target.state_dict(), value=value.state_dict())
        if planner_net is not None:
            models["planner"] = planner_net.state_dict()
        if cascade_unet is not None:
            models["cascade"] = cascade_unet.state_dict()
        run.save_checkpoint(dict(stage=stage, step=step, completed=completed, results=results, throughput=throughput,
                                 models=models, optimizers={k: o.state_dict() for k, o in optimizers.items()},
                                 online_data=online_data, rng=capture_rng(), numpy_rng=rng.bit_generator.state))

    def make_optimizer(stage: str, parameters, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
        """capturable: the stage's step is replayed from a CUDA graph (the Adam step count stays on the device)."""
        optimizers.clear()
        optimizers[stage] = torch.optim.Adam(parameters, lr=lr, capturable=capturable)
        if stage == resume_stage and stage in resume_optimizers:
            optimizers[stage].load_state_dict(resume_optimizers[stage])
        return optimizers[stage]

    def train(stage: str, total_steps: int, step_fn, log_every: int = 50, curve=None) -> float:
        """Run step_fn(step) -> {name: detached loss tensor} from the resumed step; checkpoints, Ctrl-C, finiteness;
        returns steps/s.

        Losses are read back (a host-device sync) only to be logged, every `log_every` steps and before every
        checkpoint, where a non-finite one stops the run: a checkpoint never follows a non-finite loss.
        `curve(step)` is called every --eval-every steps (alignment learning curves)."""
        start = resume_step if stage == resume_stage else 0
        bar = tqdm(range(start, total_steps), desc=stage, leave=False, dynamic_ncols=True, disable=total_steps == 0)
        began = time.perf_counter()
        for step in bar:
            losses = step_fn(step)
            saving = run.interrupted() or (step + 1) % args.save_every == 0 or step == total_steps - 1
            if step % log_every == 0 or saving:
                values = {name: float(value) for name, value in losses.items()}
                for name, value in values.items():
                    check_finite(value, stage, step)
                    writer.add_scalar(f"losses/{stage}/{name}", value, step)
                bar.set_postfix({name: f"{v:.4g}" for name, v in list(values.items())[:3]})
            if run.interrupted():
                save(stage, step + 1)
                print(f"interrupted: checkpoint saved to {run.latest}")
                sys.exit(130)
            if (step + 1) % args.save_every == 0 and step + 1 < total_steps:
                save(stage, step + 1)
            if curve is not None and args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < total_steps:
                curve(step + 1)
        bar.close()
        return (total_steps - start) / max(time.perf_counter() - began, 1e-9)

    # ---------------- evaluation ----------------
    def evaluate_planner(stage: str, use_cascade: bool, step: int = 0) -> dict:
        coherency_scores: list[float] = []
        latencies: list[float] = []

        def policy(obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
            with Timer() as timer:
                actions, chosen = planner.act(to_model(obs), use_cascade)
            latencies.append(timer.seconds * 1000 / len(obs))
            if data.family == "nav1d":
                coherency_scores.extend(plan_coherency_nav1d(chosen, obs))
            return action_from_model(actions)

        planner.denoiser.eval()
        result = evaluate(policy, data.make_env, args.eval_episodes, args.seed, args.eval_max_steps or None)
        stats = stage_stats(result.returns, normalized_score(data, result.returns))
        if coherency_scores:
            stats["coherency"] = float(np.mean(coherency_scores))
        throughput["planning_latency_ms_per_env"] = float(np.median(latencies))
        for name, value_ in stats.items():
            writer.add_scalar(f"eval/{stage}/{name}", value_, step)
        print(f"[{stage}] return {stats['return_mean']:.3f} +- {stats['return_std']:.3f}, "
              f"normalized {stats['normalized_mean']:.1f}" + (f", coherency {stats['coherency']:.3f}" if coherency_scores else ""))
        return stats

    def plan_coherency_nav1d(chosen: torch.Tensor, obs: np.ndarray) -> list[float]:
        """Dynamics consistency of the chosen plans' (s, a, s') inside the episode (later steps are padding)."""
        states, actions = planner.states_actions(chosen)
        positions = state_norm.unnormalize(states.cpu().numpy())[..., 0]
        moves = action_unscale(actions.cpu().numpy())[..., 0]
        scores = []
        for row, start_time in enumerate(np.rint(obs[:, 1] * nav1d.HORIZON).astype(int)):
            valid = min(nav1d.HORIZON - 1 - start_time, positions.shape[1] - 1)
            if valid > 0:
                scores.append(nav1d.plan_coherency(positions[row, :valid], moves[row, :valid], positions[row, 1:valid + 1]))
        return scores

    def finish(stage: str, stats: dict | None = None, result_name: str | None = None) -> None:
        """Mark a stage done (with its evaluation under `result_name`, default the stage name) and checkpoint."""
        if stats is not None:
            results[result_name or stage] = stats
        completed.append(stage)
        save("between stages", 0)

    # ================= stage 1: foundation planner (masked in-painting) =================
    if "foundation" not in completed:
        optimizer = make_optimizer("foundation", foundation.parameters(), args.foundation_lr, capturable=graphs)
        train_model = torch.compile(foundation) if args.compile else foundation

        @functools.partial(cuda_graphed, enabled=graphs)
        def foundation_update(windows: torch.Tensor) -> dict:
            known = random_prefix_masks(len(windows), args.horizon, state_dim, x_dim, device)
            loss = diffusion.loss(train_model, windows, None, mask=~known, known=known).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"diffusion": loss.detach()}

        def foundation_step(step: int) -> dict:
            return foundation_update(window_batch(args.batch_size))

        foundation.train()
        throughput["foundation_steps_per_s"] = train("foundation", args.foundation_steps, foundation_step)
        finish("foundation")

    # ================= stage 2: inverse dynamics (dd only) =================
    if args.planner == "dd" and "inverse_dynamics" not in completed:
        optimizer = make_optimizer("inverse_dynamics", inverse_dynamics.parameters(), args.foundation_lr)
        next_states = state_norm.normalize(data.next_observations).astype(np.float32)

        def inverse_dynamics_step(step: int) -> dict:
            index = torch.as_tensor(rng.integers(0, len(states_np), args.batch_size))
            states, targets = torch.as_tensor(states_np[index], device=device), torch.as_tensor(actions_np[index], device=device)
            loss = F.mse_loss(inverse_dynamics(states, torch.as_tensor(next_states[index], device=device)), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"mse": loss.detach()}

        throughput["inverse_dynamics_steps_per_s"] = train("inverse_dynamics", args.inverse_dynamics_steps, inverse_dynamics_step)
        finish("inverse_dynamics")
    inverse_dynamics.requires_grad_(False)

    # ================= stage 3: IQL critic =================
    def train_critic(stage: str, steps: int) -> float:
        optimizer = make_optimizer(stage, [*q.parameters(), *value.parameters()], args.critic_lr, capturable=graphs)

        @functools.partial(cuda_graphed, enabled=graphs)
        def critic_update(*batch: torch.Tensor) -> dict:
            value_loss, q_loss = iql_losses(q, q_target, value, batch, args.expectile, args.discount)
            optimizer.zero_grad(set_to_none=True)
            (value_loss + q_loss).backward()
            optimizer.step()
            polyak_update(q_target, q, args.polyak)
            return {"value": value_loss.detach(), "q": q_loss.detach()}

        def critic_step(step: int) -> dict:
            return critic_update(*transition_batch(args.critic_batch_size))

        return train(stage, steps, critic_step)

    if "critic" not in completed:
        throughput["critic_steps_per_s"] = train_critic("critic", args.critic_steps)
        finish("critic")

    if "eval/foundation" not in completed:
        finish("eval/foundation", evaluate_planner("foundation", use_cascade=False), "foundation")

    # ================= stage 4: alignment passes =================
    if planner_net is None:
        build_aligned_planner()
    trainable = [p for p in planner_net.parameters() if p.requires_grad]
    print(f"alignment trains {sum(p.numel() for p in trainable):,} parameters "
          f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'})")
    dataset_states = torch.as_tensor(states_np, device=device)

    def conditioning_states() -> torch.Tensor:
        return dataset_states[torch.as_tensor(rng.integers(0, len(dataset_states), args.align_states), device=device)]

    def scored_rewards(plans: torch.Tensor) -> torch.Tensor:
        rewards = planner.rewards(plans)
        if args.entropy_coef > 0:
            rewards = rewards + args.entropy_coef * entropy_bonus(plans, args.align_samples)
        return rewards

    def rl_step(stage, optimizer):
        def step_fn(step: int) -> dict:
            states = conditioning_states()
            with torch.no_grad():
                out = planner.sample(states, args.align_samples, return_chain=True)
                advantages = advantages_per_state(scored_rewards(out.x0), args.align_samples)
                weights = credit_weights(args.rl_credit, out.chain, out.stochastic, args.credit_decay)
            known, _ = inpaint_current_state(states, args.horizon, x_dim, args.align_samples)
            free_mask = (~known).float()
            stochastic_steps = [int(s) for s in torch.nonzero(out.stochastic).flatten()]
            epochs = args.ppo_epochs if args.rl_algo == "ppo" else 1
            per_step = 1.0 / (len(stochastic_steps) * epochs)  # the logged loss and KL are means over steps and epochs
            stats = {"loss": torch.zeros((), device=device), "ratio_first": None, "kl": torch.zeros((), device=device)}
            for _ in range(epochs):
                optimizer.zero_grad(set_to_none=True)
                for denoise_step in stochastic_steps:
                    log_prob, mean, std = step_log_prob(diffusion, planner_net, out.chain, denoise_step, free_mask)
                    loss, ratio = policy_gradient_loss(log_prob, out.log_probs[denoise_step], advantages,
                                                       weights[denoise_step], args.rl_algo, args.ppo_clip)
                    if args.kl_coef > 0:
                        with torch.no_grad(), reference() as reference_model:
                            reference_mean, _ = diffusion.step_distribution(reference_model, out.chain[denoise_step],
                                                                            denoise_step, None)
                        kl = kl_to_reference(mean, reference_mean, std, free_mask)
                        loss = loss + args.kl_coef * kl
                        stats["kl"] += kl.detach() * per_step
                    (loss / len(stochastic_steps)).backward()
                    stats["loss"] += loss.detach() * per_step
                    if stats["ratio_first"] is None:
                        stats["ratio_first"] = ratio.detach().mean()
                nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
            stats["plan_reward"] = planner.rewards(out.x0).mean()
            return stats
        return step_fn

    def qvpg_step(stage, optimizer):
        with torch.no_grad():  # typical |Q| makes the learning rate independent of the reward scale
            q_scale = max(planner.rewards(planner.sample(conditioning_states(), 4).x0).abs().mean().item(), 1e-3)

        def step_fn(step: int) -> dict:
            states = conditioning_states()
            last_k = int(rng.integers(1, args.qvpg_last_k + 1)) if args.qvpg_random_k else args.qvpg_last_k
            out = planner.sample(states, args.align_samples, return_chain=args.kl_coef > 0, grad_last_k=last_k)
            rewards = scored_rewards(out.x0)
            loss = -rewards.mean() / q_scale
            if args.kl_coef > 0:
                known, _ = inpaint_current_state(states, args.horizon, x_dim, args.align_samples)
                for denoise_step in range(args.denoising_steps - last_k, args.denoising_steps):
                    latent = out.chain[denoise_step].detach()
                    mean, std = diffusion.step_distribution(planner_net, latent, denoise_step, None)
                    with torch.no_grad(), reference() as reference_model:
                        reference_mean, _ = diffusion.step_distribution(reference_model, latent, denoise_step, None)
                    loss = loss + args.kl_coef * kl_to_reference(mean, reference_mean, std, (~known).float()) / last_k
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            with torch.no_grad():
                plan_reward = planner.rewards(out.x0).mean()  # without the entropy bonus, as the other methods log it
            return {"loss": loss.detach(), "plan_reward": plan_reward}
        return step_fn

    def dpo_step(stage, optimizer):
        def step_fn(step: int) -> dict:
            states = conditioning_states()
            with torch.no_grad():
                plans = planner.sample(states, args.align_samples).x0
                order = scored_rewards(plans).view(-1, args.align_samples).argsort(1, descending=True)
            grouped = plans.view(-1, args.align_samples, args.horizon, x_dim)
            half = args.align_samples // 2  # best half paired with worst half: rank i against rank n-1-i
            rows = torch.arange(len(states), device=device).unsqueeze(1)
            winners = grouped[rows, order[:, :half]].flatten(0, 1)
            losers = grouped[rows, order[:, args.align_samples - half:].flip(1)].flatten(0, 1)
            known, _ = inpaint_current_state(states, args.horizon, x_dim, half)
            loss, accuracy = dpo_loss(diffusion, planner_net, reference, winners, losers, known, args.dpo_beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            return {"loss": loss.detach(), "implicit_accuracy": accuracy}
        return step_fn

    def elbo_draws():
        generator = torch.Generator(device="cpu").manual_seed(args.seed + 12345)
        times = torch.linspace(0.05, 0.95, args.sft_elbo_draws).tolist()
        if diffusion.sampler in ("ddpm", "ddim"):  # the discrete schedule only knows levels k / T
            times = [max(round(t * args.denoising_steps), 1) / args.denoising_steps for t in times]
        return [(t, torch.randn(1, args.horizon, x_dim, generator=generator).to(device)) for t in times]

    def sft_step(stage, optimizer):
        draws = elbo_draws()
        with torch.no_grad(), reference() as reference_model:
            windows = window_batch(1024)
            window_known, _ = inpaint_current_state(windows[:, 0, :state_dim], args.horizon, x_dim, 1)
            threshold = torch.quantile(elbo_proxy(diffusion, reference_model, windows, window_known, draws),
                                       args.sft_quantile).item()
        keep = max(1, int(round(args.sft_top_fraction * args.align_samples)))

        def step_fn(step: int) -> dict:
            states = conditioning_states()
            with torch.no_grad():
                source = nullcontext(planner_net) if args.sft_source == "current" else reference()
                with source as proposer:
                    plans = planner.sample(states, args.align_samples, model=proposer).x0
                top = scored_rewards(plans).view(-1, args.align_samples).argsort(1, descending=True)[:, :keep]
                rows = torch.arange(len(states), device=device).unsqueeze(1)
                candidates = plans.view(-1, args.align_samples, args.horizon, x_dim)[rows, top].flatten(0, 1)
                known, _ = inpaint_current_state(states, args.horizon, x_dim, keep)
                with reference() as reference_model:
                    accepted = elbo_proxy(diffusion, reference_model, candidates, known, draws) <= threshold
            if not accepted.any():
                return {"loss": 0.0, "accepted_fraction": 0.0}
            targets = candidates[accepted]
            train_known = random_prefix_masks(len(targets), args.horizon, state_dim, x_dim, device)
            loss = diffusion.loss(planner_net, targets, None, mask=~train_known, known=train_known).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            return {"loss": loss.detach(), "accepted_fraction": accepted.float().mean()}
        return step_fn

    def cascade_step(stage, optimizer):
        branches, branch_step = args.cascade_branches, args.cascade_branch_step

        def step_fn(step: int) -> dict:
            states = conditioning_states()
            with torch.no_grad():
                trunk = planner.sample(states, 1, return_chain=True)
                shared_latent = trunk.chain[branch_step].repeat_interleave(branches, 0)
                plans = planner.sample(states, branches, x_start=shared_latent, start_step=branch_step).x0
                order = scored_rewards(plans).view(-1, branches).argsort(1)
                grouped = plans.view(-1, branches, args.horizon, x_dim)
                rows = torch.arange(len(states), device=device)
                conditions, targets = grouped[rows, order[:, 0]], grouped[rows, order[:, -1]]
            known = random_prefix_masks(len(targets), args.horizon, state_dim, x_dim, device)
            loss = diffusion.loss(planner.cascade, targets, conditions, mask=~known, known=known).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(cascade_unet.parameters(), 1.0)
            optimizer.step()
            return {"loss": loss.detach()}
        return step_fn

    method_builders = dict(rl=(rl_step, "rl_steps"), qvpg=(qvpg_step, "qvpg_steps"), dpo=(dpo_step, "dpo_steps"),
                           sft=(sft_step, "sft_steps"), cascade=(cascade_step, "cascade_steps"))
    last_stage = "foundation"
    for p in range(1, args.passes + 1):
        for method in methods:
            stage = f"pass{p}/{method}"
            last_stage = stage
            if stage in completed:
                continue
            if method == "cascade":
                if cascade_unet is None:
                    build_cascade()  # warm start from the foundation; later passes keep training it
                parameters = cascade_unet.parameters()
            else:
                parameters = trainable
            learning_rate = dict(dpo=args.dpo_lr, sft=args.sft_lr, cascade=args.cascade_lr).get(method, args.align_lr)
            optimizer = make_optimizer(stage, parameters, learning_rate)
            builder, steps_field = method_builders[method]
            planner_net.train()
            curve = lambda step, stage=stage: evaluate_planner(stage, cascade_unet is not None, step)
            steps_per_s = train(stage, getattr(args, steps_field), builder(stage, optimizer), log_every=5, curve=curve)
            throughput[f"{method}_steps_per_s"] = steps_per_s
            finish(stage, evaluate_planner(stage, use_cascade=cascade_unet is not None))
        online_stage = f"pass{p}/online"
        if args.online_episodes > 0 and p < args.passes and online_stage not in completed:
            if resume_stage != online_stage:
                new = collect_transitions(planner, data.make_env, args.online_episodes, args.seed * 1000 + p,
                                          to_model, action_from_model, args.eval_max_steps or None)
                new = dict(observations=state_norm.normalize(new["observations"]).astype(np.float32),
                           actions=action_scale(new["actions"]).astype(np.float32),
                           rewards=(reward_scale * new["rewards"] + reward_shift).astype(np.float32),
                           next_observations=state_norm.normalize(new["next_observations"]).astype(np.float32),
                           terminals=new["terminals"].astype(np.float32))
                online_data = {k: np.concatenate([online_data[k], v]) if online_data else v for k, v in new.items()}
                for key in transitions:
                    transitions[key] = np.concatenate([transitions[key], new[key]])
            train_critic(online_stage, args.online_critic_steps)
            finish(online_stage)

    # ================= final evaluation =================
    if "aligned" not in completed:
        # the last pass stage already evaluated exactly this model with the same episode seeds
        finish("aligned", dict(results[last_stage]))
    summary = dict(script="diffuser_align", env=args.env, seed=args.seed, stages=results,
                   throughput=throughput, wall_time_s=time.time() - wall_start, device=str(device),
                   args={k: v for k, v in vars(args).items()})
    if data.family == "nav1d":
        summary["coherency"] = {stage: stats["coherency"] for stage, stats in results.items() if "coherency" in stats}
    run.write_summary(summary)
    print_results_table(results)
    run.close()


if __name__ == "__main__":
    cli(main, Args)
