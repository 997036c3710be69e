"""Diffusion planners (Diffuser, Decision Diffuser) aligned with a Q-function by RL, QV-PG, DPO, SFT and cascading.

Paper: Huh & Mohapatra, "Maximize Your Diffusion: A Study into Reward Maximization and Alignment for Diffusion-based
Control" (planning half: Table 2).

Overview. A foundation planner is trained on fixed-length windows of the offline data: Diffuser diffuses
(state, action) windows with a temporal U-Net, Decision Diffuser (DD) diffuses state windows and reads actions off an
inverse-dynamics model. Both are trained with masked in-painting (a random causal prefix of the window is given, the
loss counts only the rest), which is how the current state is imposed at planning time. An IQL critic, trained on
the same data, scores a plan by Q(s_0, a_0): every environment step draws N plans, executes the first action of the
best one and replans. Alignment then moves the planner towards high-Q plans with one set of LoRA adapters (the frozen
base is the reference model): `rl` treats the denoising chain as an MDP (REINFORCE or PPO-clip with credit weights
over denoising steps and an optional KL to the reference), `qvpg` back-propagates -Q through the last K denoising
steps, `dpo` is Diffusion-DPO on pairs ranked by Q, `sft` fine-tunes on the best plans whose reference likelihood is
high enough, and `cascade` trains a second, warm-started model that turns a plan into a better one and is applied
once at inference. `--align rl,dpo,sft --passes P` runs the methods in sequence, evaluating after each.

The five methods and their helpers are written against `PlanSpace` (how to draw, score and train on plans) and are
the same text in dp_align.py, which implements the same interface for action chunks.

    python diffuser_align.py --env nav1d-partial --planner diffuser --sampler fm --align qvpg,dpo,sft
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common import nav1d
from common.data import (Normalizer, evaluate, load_offline_data, model_transitions, normalized_score,
                         unscale_actions, windows)
from common.diffusion import Diffusion, SampleOutput, gaussian_log_prob
from common.nets import (InverseDynamics, TemporalUNet, TwinQ, ValueNet, count_parameters,
                         load_foundation_into_cascade, policy_with_reference)
from common.runtime import (UserError, apply_presets, cli, cuda_graphed, require, resumed_arguments, seeded,
                            stage_stats, start_run, use_cuda_graphs)
from common.training import (CompiledModules, DivergenceMonitor, Trainer, action_latency_ms, check_loadable,
                             method_sequence, require_same_data, run_alignment)

SCRIPT = "diffuser_align"
METHODS = ("rl", "qvpg", "dpo", "sft", "cascade")
PLANNER_SETTINGS = ("planner", "sampler", "prediction", "sample_steps", "train_steps", "horizon")  # of --load-foundation


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of the experiment (part of the default run directory)"""
    seed: int = 0
    """seed of training and of the evaluation episodes"""
    env: str = "nav1d-full"
    """dataset: nav1d-partial|full|expert, a Minari id (mujoco/hopper/medium-v0) or a D4RL name (hopper-medium-v2)"""
    preset: Literal["", "cpu"] = ""
    """compute preset over the dataset's own: cpu = the whole method at 2-core CPU scale (README, "Compute presets")"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to run"""
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
    eval_max_steps: int = 0
    """cap on evaluation episode length (0: the environment's own limit)"""
    save_every: int = 5000
    """checkpoint every N steps of a stage (and at the end of every stage)"""
    log_every: int = 50
    """steps between loss logs (and finiteness checks)"""
    compile: bool = False
    """torch.compile the denoiser for foundation training and for planning (evaluation)"""
    cuda_graphs: bool = True
    """on a GPU, replay the foundation and critic steps and planning from CUDA graphs (no effect on a CPU)"""
    cpu_threads: int = 0
    """torch CPU threads (0: torch's default); small networks run faster on 1, above all on a busy machine"""

    # ---- foundation planner
    planner: Literal["diffuser", "dd"] = "diffuser"
    """diffuser: (state, action) windows; dd: state windows + inverse dynamics (Decision Diffuser)"""
    sampler: Literal["ddpm", "ddim", "sm", "fm"] = "ddpm"
    """ddim (eta=0) and fm are deterministic: use qvpg (or --eta > 0) for RL alignment"""
    eta: float = 0.0
    """DDIM noise (0 deterministic, > 0 stochastic steps that RL alignment can use)"""
    sde_solver: Literal["exponential", "euler"] = "exponential"
    """reverse-SDE step of --sampler sm: exponential integrator (exact Gaussian steps on a logSNR grid) or
    Euler-Maruyama (needs hundreds of steps)"""
    spacing: Literal["uniform", "quadratic"] = "uniform"
    """sampler steps of ddpm, ddim (over the --train-steps levels) and fm: even, or quadratic (densest near the data,
    where coarse first-order steps lose the data's spread)"""
    prediction: Literal["", "eps", "x0", "velocity"] = ""
    """network output; empty: x0 for ddpm/ddim (as Diffuser: eps-prediction divides by the tiny alpha of the
    noisiest level and blows up), eps for sm, velocity for fm"""
    sample_steps: int = 20
    """denoising steps when sampling"""
    train_steps: int = 20
    """noise levels of the discrete schedule (ddpm, ddim); sampling strides over them"""
    horizon: int = 32
    """planning window length in environment steps (a power of two for the U-Net)"""
    inpaint_planning_share: float = 0.5
    """share of the foundation's training windows with only the current state known (the planning case); the rest
    get a random causal prefix of known steps (masked in-painting)"""
    first_action_weight: float = 1.0
    """loss weight of the first free action of a training window (at planning time the executed one) against 1 for
    every other free entry: joint plans give actions a small share of the loss (Diffuser and CleanDiffuser use 10)"""
    unet_base_dim: int = 32
    """channels of the first U-Net level (a multiple of 8)"""
    unet_dim_mults: tuple[int, ...] = (1, 2, 4)
    """channel multipliers per U-Net level"""
    num_candidates: int = 16
    """plans drawn per environment step; the one with the highest plan reward is executed"""
    plan_reward: Literal["q0", "mean"] = "q0"
    """q0: Q(s_0, a_0); mean: mean of Q over the plan's steps"""
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
    load_foundation: str = ""
    """take the trained foundation planner (and dd's inverse dynamics) from this diffuser_align checkpoint"""

    # ---- IQL critic
    critic_steps: int = 1_000_000
    """IQL gradient steps"""
    critic_batch_size: int = 256
    """transitions per IQL batch"""
    critic_lr: float = 3e-4
    """Adam learning rate of Q and V"""
    critic_hidden: int = 256
    """hidden width of Q and V"""
    gamma: float = 0.99
    """discount"""
    expectile: float = 0.7
    """IQL expectile tau of the V loss"""
    polyak: float = 0.005
    """target-Q averaging rate"""
    load_critic: str = ""
    """take the trained IQL critic from this diffuser_align checkpoint"""

    # ---- alignment, shared by all methods (the same names in dp_align.py)
    align: str = "rl,dpo,sft"
    """comma-separated alignment methods run in this order each pass: rl, qvpg, dpo, sft, cascade"""
    passes: int = 1
    """repetitions of the --align sequence"""
    lora_rank: int = 8
    """LoRA rank on every Linear and Conv1d of the planner (0: full fine-tuning, frozen copy as reference)"""
    lora_alpha: float = 16.0
    """LoRA scale numerator (update scaled by alpha / rank)"""
    align_batch: int = 32
    """conditioning states (dataset states) per alignment batch"""
    group_size: int = 16
    """plans sampled per conditioning state (advantages, pairs and SFT ranking are per state)"""
    kl_coef: float = 0.0
    """divergence control: weight of the per-step KL to the reference (rl, qvpg), and for dpo of the squared
    difference of the policy's and the reference's noise predictions (the KL of the two diffusions, unweighted)"""
    entropy_coef: float = 0.0
    """weight of a nearest-neighbour entropy bonus among a state's plans, added to the plan reward"""
    epochs_per_batch: int = 4
    """gradient steps on each generated batch for dpo and sft (sampling costs far more than an update)"""
    max_grad_norm: float = 1.0
    """gradient clipping during alignment"""
    rl_steps: int = 1000
    """updates of the rl method (each samples a fresh batch of chains)"""
    rl_lr: float = 1e-4
    """Adam learning rate of the rl method"""
    rl_algo: Literal["ppo", "reinforce"] = "ppo"
    """ppo (clipped ratio, several epochs per batch) or reinforce"""
    ppo_clip: float = 0.2
    """PPO ratio clip epsilon"""
    ppo_epochs: int = 2
    """updates per sampled batch for ppo"""
    credit: Literal["uniform", "decay", "similarity"] = "uniform"
    """weights over denoising steps: uniform, decay (geometric, larger near x_0) or similarity"""
    credit_decay: float = 0.9
    """ratio of the decay credit weights between consecutive denoising steps"""
    qvpg_steps: int = 1000
    """updates of the qvpg method"""
    qvpg_lr: float = 1e-4
    """Adam learning rate of the qvpg method"""
    qvpg_k: int = 5
    """denoising steps that gradients of -Q flow through"""
    qvpg_random_k: bool = False
    """draw K uniformly from 1..qvpg_k for every batch"""
    dpo_steps: int = 1000
    """updates of the dpo method"""
    dpo_lr: float = 3e-5
    """Adam learning rate of the dpo method"""
    dpo_beta: float = 200.0
    """Diffusion-DPO inverse temperature (errors are means over dims, so it is large for small windows)"""
    dpo_noise_draws: int = 4
    """(t, noise) draws per pair in every DPO step"""
    dpo_pairs: Literal["halves", "best"] = "best"
    """per state, the i-th best sample against the i-th worst (halves), or the best against every other (best: what
    a best-of-N selection needs, the top of the distribution to improve)"""
    dpo_source: Literal["reference", "current"] = "reference"
    """sample the pairs from the DPO reference (the planner at the start of the DPO stage) or the current planner"""
    sft_steps: int = 1000
    """updates of the sft method"""
    sft_lr: float = 1e-5
    """Adam learning rate of the sft method"""
    sft_top_fraction: float = 0.0625
    """fraction of each state's plans (highest reward first) proposed for fine-tuning; 1/16: the plan a 16-candidate
    planner executes"""
    sft_quantile: float = 0.9
    """likelihood threshold: a plan is accepted if its reference ELBO proxy is below this quantile of dataset windows"""
    sft_elbo_draws: int = 8
    """fixed (t, noise) draws of the ELBO proxy"""
    sft_source: Literal["reference", "current", "both"] = "reference"
    """where SFT's candidates come from: its reference (the model as the SFT stage found it; a fixed target, so
    SFT cannot feed on its own samples), the current model, or half each"""
    sft_data_weight: float = 0.0
    """weight of the ordinary diffusion loss on as many dataset windows, added to every SFT update: an anchor on the
    data. Fitting its own plans alone drifts a planner off the data even unselected and from a 200-step sampler
    (Hopper, hopper_cpu.md); 0 fine-tunes on the accepted plans only"""
    cascade_steps: int = 1000
    """updates of the cascade model"""
    cascade_lr: float = 1e-4
    """Adam learning rate of the cascade model"""
    cascade_branches: int = 4
    """continuations per shared latent; every other continuation becomes a condition for the best one"""
    cascade_branch_fraction: float = 0.5
    """the shared latent is taken after this fraction of the denoising steps"""
    cascade_align: str = "rl"
    """methods (rl, qvpg, dpo, sft) that then align the cascade on its own plans, as the paper does, each for its
    --{method}-steps at --cascade-lr ("" = pairs only)"""
    online_episodes: int = 0
    """episodes collected with the aligned planner between passes and added to the critic's data (0: offline)"""
    online_critic_steps: int = 10_000
    """IQL steps on the grown data after each online collection"""


PRESETS = {
    "nav1d": dict(horizon=8, unet_base_dim=16, unet_dim_mults=(1, 2), foundation_steps=3000, batch_size=256,
                  foundation_lr=1e-3, inverse_dynamics_steps=2000, inverse_dynamics_hidden=64, critic_steps=6000,
                  critic_hidden=64, expectile=0.9, eval_episodes=32, save_every=1000, align_batch=32,
                  rl_steps=60, qvpg_steps=60, dpo_steps=60, sft_steps=60, cascade_steps=150, rl_lr=1e-3,
                  qvpg_lr=1e-3, dpo_lr=3e-4, sft_lr=3e-4, lora_rank=8, online_critic_steps=1000, cpu_threads=1,
                  # quadratic-spaced steps over 200 levels: 20 even steps of 20 levels shrink a narrow spread by a
                  # third even with an exact denoiser (tests/test_preset_sampler_accuracy.py)
                  train_steps=200, spacing="quadratic"),
    # The expert data covers a narrow band of actions, so Q is unreliable off it: without a KL to the reference, rl
    # took Diffuser-DDPM from 7.50 to 5.14 (coherency 0.92 -> 0.50, seed 0); with kl_coef 10, 7.50 -> 7.51 (0.93).
    "nav1d-expert": dict(kl_coef=10.0),
    "hopper": dict(horizon=32, unet_base_dim=32, unet_dim_mults=(1, 2, 4)),
}

COMPUTE_PRESETS = {  # --preset: sizes for a machine, over the dataset's preset (README)
    # a 2-core CPU: a horizon-8 U-Net of base width 32, 15k foundation and 150k critic steps, 100 steps per alignment
    # method. On Hopper medium-replay (hopper_cpu.md) a horizon-16, width-16 U-Net with 20k steps and a 100k-step
    # critic fell at once (1.6); the shorter, wider U-Net learns the first steps of a plan faster, and the longer-trained
    # critic is what makes the pick among 16 plans work (3k foundation and 30k critic steps: 7.0; this preset: 21.8).
    # kl_coef 0.1 (as in dp_align's preset): RL without it lost on two of three seeds (-6.1, -2.0), RL alone with it
    # gained on both seeds tried (32.7 -> 37.2, 34.0 -> 36.3 at 20 episodes; hopper_cpu.md).
    # sft_data_weight 1.0: SFT alone on its own plans sank seeds 0-2 (25.6 -> 11.4, 31.3 -> 20.6, 39.9 -> 6.0, the
    # denoising error up 0.5-0.7); with the data anchor they held (-> 23.1, 39.1, 37.9; error within 0.06)
    "cpu": dict(horizon=8, unet_base_dim=32, unet_dim_mults=(1, 2, 4), foundation_steps=15_000, critic_steps=150_000,
                inverse_dynamics_steps=15_000, train_steps=200, spacing="quadratic", rl_steps=100, qvpg_steps=100,
                dpo_steps=100, sft_steps=100, cascade_steps=100, align_batch=16, eval_episodes=10, save_every=2_000,
                kl_coef=0.1, sft_data_weight=1.0),
}


def validate_args(args: Args) -> tuple[list[str], list[str]]:
    """Every argument mistake becomes a one-line UserError here, before data loading or training; returns the
    alignment sequence and the cascade's."""
    methods = method_sequence(args.align, "--align", METHODS)
    cascade_methods = method_sequence(args.cascade_align, "--cascade-align", METHODS[:-1], required=False)
    positive = ("sample_steps", "train_steps", "num_candidates", "batch_size", "critic_batch_size", "passes",
                "align_batch", "eval_episodes", "save_every", "log_every", "sft_elbo_draws", "ppo_epochs", "qvpg_k",
                "epochs_per_batch", "dpo_noise_draws", "inverse_dynamics_hidden", "critic_hidden")
    non_negative = ("foundation_steps", "inverse_dynamics_steps", "critic_steps", "rl_steps", "qvpg_steps",
                    "dpo_steps", "sft_steps", "cascade_steps", "online_episodes", "online_critic_steps", "eval_every",
                    "eval_max_steps", "lora_rank", "kl_coef", "entropy_coef", "eta", "sft_data_weight")
    checks = [(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1") for name in positive]
    checks += [(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0") for name in non_negative]
    checks += [(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0")
               for name in ("dpo_beta", "foundation_lr", "critic_lr", "rl_lr", "qvpg_lr", "dpo_lr", "sft_lr",
                            "cascade_lr", "lora_alpha", "max_grad_norm")]
    checks += [(0 < getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in (0, 1]")
               for name in ("sft_quantile", "sft_top_fraction", "credit_decay", "gamma", "polyak")]
    checks += [
        (args.horizon >= 2 and not args.horizon & (args.horizon - 1),
         f"--horizon must be a power of two >= 2 for the temporal U-Net, got {args.horizon}"),
        (args.horizon % 2 ** (len(args.unet_dim_mults) - 1) == 0,
         f"--horizon {args.horizon} is too short for {len(args.unet_dim_mults)} U-Net levels"),
        (args.unet_base_dim >= 8 and args.unet_base_dim % 8 == 0,
         f"--unet-base-dim must be a positive multiple of 8 (GroupNorm), got {args.unet_base_dim}"),
        (args.group_size >= 2, "--group-size must be >= 2 (rankings and advantages need several plans)"),
        (args.cascade_branches >= 2, "--cascade-branches must be >= 2"),
        (0 <= args.cascade_branch_fraction < 1, "--cascade-branch-fraction must be in [0, 1)"),
        (0 <= args.inpaint_planning_share <= 1, "--inpaint-planning-share must be in [0, 1]"),
        (args.first_action_weight > 0, "--first-action-weight must be > 0"),
        (args.qvpg_k <= args.sample_steps, f"--qvpg-k ({args.qvpg_k}) exceeds --sample-steps ({args.sample_steps})"),
        (0 < args.expectile < 1, "--expectile must be in (0, 1)"),
        (args.ppo_clip < 1, "--ppo-clip must be in (0, 1)"),
        (args.eta == 0 or args.sampler == "ddim", "--eta applies only to --sampler ddim"),
        (args.sampler not in ("ddpm", "ddim") or args.train_steps >= args.sample_steps,
         "--train-steps must be >= --sample-steps"),
    ]
    require(checks)
    if "rl" in methods + (cascade_methods if "cascade" in methods else []) and not make_diffusion(args).stochastic:
        raise UserError(f"--align/--cascade-align rl needs a stochastic sampler (step likelihoods); --sampler "
                        f"{args.sampler} with these settings is deterministic: use qvpg instead, or --sampler ddim --eta 1.0")
    return methods, cascade_methods


# ----------------------------------------------------------------------------------------------------------------
# Planning: in-painting, plan rewards, plan selection
# ----------------------------------------------------------------------------------------------------------------
def make_diffusion(args: Args) -> Diffusion:
    prediction = args.prediction or {"ddpm": "x0", "ddim": "x0", "sm": "eps", "fm": "velocity"}[args.sampler]
    return Diffusion(args.sampler, args.sample_steps, train_steps=args.train_steps, eta=args.eta,
                     prediction=prediction, sde_solver=args.sde_solver, spacing=args.spacing)


def inpaint_current_state(states: torch.Tensor, horizon: int, x_dim: int, repeats: int):
    """Known-entry mask and values imposing each (normalised) state on step 0 of its `repeats` plans."""
    state_dim = states.shape[1]
    known = torch.zeros(states.shape[0] * repeats, horizon, x_dim, dtype=torch.bool, device=states.device)
    known[:, 0, :state_dim] = True
    values = torch.zeros(known.shape, device=states.device)
    values[:, 0, :state_dim] = states.repeat_interleave(repeats, 0)
    return known, values


def random_prefix_masks(batch: int, horizon: int, state_dim: int, x_dim: int, device,
                        planning_share: float) -> torch.Tensor:
    """Masked in-painting for training: steps before L are fully known, and the state of step L.

    L = 0 is the planning-time case (only the current state given) and is drawn for `planning_share` of the windows;
    the others get L uniform in [1, H), which teaches in-painting in general. A plan's first action and second state
    are trained only when L = 0, so L uniform in [0, H) (planning_share = 1/H) left them to 1/H of the batch: on
    Hopper (H = 16) the planned first action was further from the data's than the mean action is.
    """
    prefix = torch.randint(1, horizon, (batch, 1), device=device)
    prefix = prefix.masked_fill(torch.rand(batch, 1, device=device) < planning_share, 0)
    steps = torch.arange(horizon, device=device).unsqueeze(0)
    known = (steps < prefix).unsqueeze(-1).expand(batch, horizon, x_dim).clone()
    known[..., :state_dim] |= (steps == prefix).unsqueeze(-1)
    return known


class CascadeDenoiser(nn.Module):
    """The cascade U-Net called as model(x, t, cond): `cond` is the plan being improved (extra input channels).
    Warm-started from the foundation with those channels at zero weight, so it equals the foundation until trained."""

    def __init__(self, args: Args, foundation: TemporalUNet, x_dim: int):
        super().__init__()
        self.unet = TemporalUNet(x_dim, args.horizon, 0, args.unet_base_dim, args.unet_dim_mults, extra_in_dim=x_dim)
        load_foundation_into_cascade(self.unet, foundation.state_dict())

    def forward(self, x, t, cond):
        return self.unet(x, t, None, x_cond=cond)


class Planner:
    """Everything needed to plan: the diffusion sampler, the denoiser, the critic and (dd) the inverse dynamics.

    Plans live in normalised space: states by the dataset normaliser, actions scaled from their bounds to [-1, 1].
    """

    def __init__(self, args: Args, diffusion: Diffusion, denoiser: nn.Module, q_target: TwinQ, state_dim: int,
                 action_dim: int, inverse_dynamics: nn.Module | None = None, cuda_graphs: bool = False):
        self.kind, self.horizon, self.num_plans, self.reward_kind = args.planner, args.horizon, args.num_candidates, args.plan_reward
        self.diffusion, self.denoiser, self.q_target, self.inverse_dynamics = diffusion, denoiser, q_target, inverse_dynamics
        self.state_dim, self.action_dim = state_dim, action_dim
        self.x_dim = state_dim + (action_dim if self.kind == "diffuser" else 0)
        self.compiled = CompiledModules(args.compile)
        self.cuda_graphs = cuda_graphs
        self._graphed_act: dict[tuple, object] = {}  # (denoiser, cascade) -> act replayed from CUDA graphs

    def sample(self, states, repeats, model=None, **sample_kwargs) -> SampleOutput:
        """`repeats` plans per state with the state in-painted; SampleOutput over (len(states) * repeats) plans."""
        known, values = inpaint_current_state(states, self.horizon, self.x_dim, repeats)
        batch_shape = (known.shape[0], self.horizon, self.x_dim)
        return self.diffusion.sample(model if model is not None else self.denoiser, batch_shape, None, inpaint_mask=known,
                                     inpaint_values=values, **sample_kwargs)

    def refine(self, plans, cascade, n: int = 1, **sample_kwargs) -> SampleOutput:
        """`n` new plans per given plan from the cascade model, conditioned on it (same current state)."""
        known, values = inpaint_current_state(plans[:, 0, : self.state_dim], self.horizon, self.x_dim, 1)
        return self.diffusion.sample(cascade, (self.horizon, self.x_dim), plans, samples_per_cond=n,
                                     inpaint_mask=known, inpaint_values=values, **sample_kwargs)

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

    def act(self, states, cascade=None):
        """Draw num_plans per state in one sampler call (refined once by `cascade` when given), keep the best by plan
        reward; (actions, chosen plans). With CUDA graphs the returned tensors are overwritten by the next call."""
        denoiser = self.compiled(self.denoiser)
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
            plans = self.refine(plans, cascade).x0
        best = select_best_plans(self.rewards(plans), self.num_plans)
        chosen = plans.view(states.shape[0], self.num_plans, self.horizon, self.x_dim)[
            torch.arange(len(states), device=plans.device), best]
        _, actions = self.states_actions(chosen)
        return actions[:, 0].clamp(-1, 1), chosen


def select_best_plans(rewards: torch.Tensor, plans_per_state: int) -> torch.Tensor:
    """Index (within its state's group) of the highest-reward plan for every state."""
    return rewards.view(-1, plans_per_state).argmax(1)


class PlanSpace:
    """What the alignment methods need to know about the planner's samples. A condition is the current (normalised)
    state (B, S); a sample is a plan window (H, x_dim) with that state in-painted at step 0, so only the other entries
    are generated, scored and trained on; its reward is the planner's plan reward."""

    def __init__(self, args: Args, planner: Planner, offline: dict[str, torch.Tensor]):
        self.args, self.planner = args, planner
        self.states, self.episode_last = offline["observations"], offline["episode_last"]
        self.window_values = offline["observations"] if planner.kind == "dd" else torch.cat(
            [offline["observations"], offline["actions"]], 1)  # the planner's x: states (dd) or states and actions
        self.diffusion, self.device = planner.diffusion, self.states.device
        self.shape = (args.horizon, planner.x_dim)
        self.likelihood_threshold: tuple | None = None  # sft's (reference, threshold, draws), once per reference

    def conditions(self, batch: int) -> torch.Tensor:
        return self.states[torch.randint(0, len(self.states), (batch,), device=self.device)]

    def dataset_samples(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.states), (batch,), device=self.device)
        plans = windows(self.window_values, starts, self.args.horizon, self.episode_last)
        return plans, plans[:, 0, : self.planner.state_dim]

    def sample(self, model, cond: torch.Tensor, n: int = 1, **kwargs) -> SampleOutput:
        return self.planner.sample(cond, n, model=model, **kwargs)

    def reward(self, cond: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        return self.planner.rewards(samples)  # the in-painted step-0 state is the condition

    def known(self, samples: torch.Tensor) -> torch.Tensor:
        known = torch.zeros(samples.shape, dtype=torch.bool, device=samples.device)
        known[:, 0, : self.planner.state_dim] = True
        return known

    def free_mask(self, samples: torch.Tensor) -> torch.Tensor:
        return (~self.known(samples)).float()

    def actions(self, samples: torch.Tensor) -> torch.Tensor:
        return self.planner.states_actions(samples)[1]

    def model_condition(self, cond):
        """What the denoiser is called with: nothing (the state is in-painted into the plan)."""
        return None

    def step_distribution(self, model, x: torch.Tensor, step: int, cond):
        return self.diffusion.step_distribution(model, x, step, self.model_condition(cond))

    def training_masks(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(known entries, loss weights) of a batch of training windows: a random causal prefix is known, every free
        entry weighs 1 and the first free action --first-action-weight."""
        known = random_prefix_masks(batch, self.shape[0], self.planner.state_dim, self.shape[1], self.device,
                                    self.args.inpaint_planning_share)
        weights = (~known).float()
        if self.shape[1] > self.planner.state_dim:  # plans hold actions (not the Decision Diffuser's states only)
            first_free_action = known[..., 0] & ~known[..., self.planner.state_dim]
            weights[..., self.planner.state_dim:] += (self.args.first_action_weight - 1) * first_free_action[..., None]
        return known, weights

    def loss(self, model, samples: torch.Tensor, cond) -> torch.Tensor:
        known, weights = self.training_masks(len(samples))
        return self.diffusion.loss(model, samples, self.model_condition(cond), mask=weights, known=known)

    def eps_error(self, model, samples, cond, t, noise) -> torch.Tensor:
        known = self.known(samples)
        return self.diffusion.eps_error(model, samples, self.model_condition(cond), t, noise, mask=~known, known=known)

    def predicted_noise(self, model, samples, cond, t, noise) -> torch.Tensor:
        return self.diffusion.predicted_noise(model, samples, self.model_condition(cond), t, noise,
                                              known=self.known(samples))

    def cascade_loss(self, cascade, targets, conditions, cond) -> torch.Tensor:
        known, weights = self.training_masks(len(targets))
        return self.diffusion.loss(cascade, targets, conditions, mask=weights, known=known).mean()


class CascadePlanSpace(PlanSpace):
    """The cascade's sample space for its own alignment: a condition is a plan the policy `upstream`
    drew (its step-0 state is the current state), which the cascade model takes as extra input channels."""

    def __init__(self, args: Args, planner: Planner, offline: dict[str, torch.Tensor], upstream):
        super().__init__(args, planner, offline)
        self.upstream = upstream

    @torch.no_grad()
    def upstream_plans(self, states: torch.Tensor) -> torch.Tensor:
        return self.planner.sample(states, 1, model=self.upstream).x0

    def conditions(self, batch: int) -> torch.Tensor:
        return self.upstream_plans(super().conditions(batch))

    def dataset_samples(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        plans, states = super().dataset_samples(batch)
        return plans, self.upstream_plans(states)

    def sample(self, model, cond: torch.Tensor, n: int = 1, **kwargs) -> SampleOutput:
        return self.planner.refine(cond, model, n, **kwargs)

    def model_condition(self, cond):
        return cond


# ======================================================================================================================
# Alignment methods. From here to the next banner the text is the same in dp_align.py and diffuser_align.py
# (tests/test_alignment_copies.py): a method takes the sample space, the model it trains, its reference, the
# optimiser and the arguments, draws one batch and returns detached metrics.
# ======================================================================================================================
def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Advantages per conditioning state: standardised within each state's group, clipped to +-5."""
    grouped = rewards.view(-1, group)
    advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-8)
    return advantages.clamp(-5, 5).flatten()


def nearest_neighbour_log_distance(samples: torch.Tensor, group: int) -> torch.Tensor:
    """log distance of each sample to its closest sibling (same state): the per-sample term of the
    Kozachenko-Leonenko entropy estimate, used as an entropy bonus."""
    flat = samples.flatten(1).view(-1, group, samples[0].numel())
    distances = torch.cdist(flat, flat) + torch.eye(group, device=samples.device) * 1e9
    return torch.log(distances.min(-1).values + 1e-6).flatten()


def sample_rewards(space, cond: torch.Tensor, samples: torch.Tensor, group: int, args) -> torch.Tensor:
    """Reward of each of the `group` samples per condition, plus the entropy bonus; differentiable in `samples`."""
    rewards = space.reward(cond.repeat_interleave(group, 0), samples)
    if args.entropy_coef > 0:
        rewards = rewards + args.entropy_coef * nearest_neighbour_log_distance(samples, group)
    return rewards


def credit_weights(chain: torch.Tensor, stochastic: torch.Tensor, scheme: str, decay: float) -> torch.Tensor:
    """(S, B) weights of the denoising steps, zero on deterministic steps and mean 1 over the stochastic ones."""
    steps = chain.shape[0] - 1
    if scheme == "uniform":
        weights = torch.ones(steps, chain.shape[1], device=chain.device)
    elif scheme == "decay":  # geometric, largest at the last step (closest to x_0)
        exponents = torch.arange(steps - 1, -1, -1, device=chain.device, dtype=torch.float32)
        weights = (decay**exponents)[:, None].expand(steps, chain.shape[1])
    else:  # similarity of each step's move with the direction to the final sample
        moves = (chain[1:] - chain[:-1]).flatten(2)
        to_final = (chain[-1:] - chain[:-1]).flatten(2)
        weights = F.cosine_similarity(moves, to_final, dim=-1).clamp(min=0)
    weights = weights * stochastic[:, None]
    mean = weights.sum(0, keepdim=True) / stochastic.sum().clamp(min=1)
    return torch.where(mean > 0, weights / mean.clamp(min=1e-8), stochastic[:, None].float())


def step_kl(mean, reference_mean, std: float, free_mask) -> torch.Tensor:
    """KL of the policy's step to the reference's, ||mu - mu_ref||^2 / (2 s^2) for equal variances (B,), over the
    generated entries; deterministic steps (s = 0) use s = 1, half the squared distance of the step means."""
    squared = (mean - reference_mean) ** 2
    if free_mask is not None:
        squared = squared * free_mask
    return squared.flatten(1).sum(1) / (2 * (std**2 if std > 0 else 1.0))


def ppo_step_loss(log_prob, old_log_prob, advantages, weights, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate of one denoising step, mean over samples; returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (weights * surrogate).mean(), ratio


def clipped_step(optimizer: torch.optim.Optimizer, max_grad_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], max_grad_norm)
    optimizer.step()


def rl(space, policy, reference, optimizer, args) -> dict:
    """RL over the denoising chain: REINFORCE (- sum_t w_t log p_t A) or PPO-clip (mean over steps of
    the clipped surrogate, ppo_epochs per batch), with an optional per-step KL to the reference."""
    group = args.group_size
    cond = space.conditions(args.align_batch)
    with torch.no_grad():
        rollout = space.sample(policy, cond, group, return_chain=True)
        rewards = sample_rewards(space, cond, rollout.x0, group, args)
        advantages = group_advantages(rewards, group)
        weights = credit_weights(rollout.chain, rollout.stochastic, args.credit, args.credit_decay)
    steps = rollout.stochastic.nonzero().flatten().tolist()
    free_mask = space.free_mask(rollout.x0)
    metrics = {}
    for _ in range(args.ppo_epochs if args.rl_algo == "ppo" else 1):
        optimizer.zero_grad(set_to_none=True)
        total, kl_total, ratio_deviation = (torch.zeros((), device=cond.device) for _ in range(3))
        for step in steps:  # one backward per step keeps only one step's graph in memory
            mean, std = space.step_distribution(policy, rollout.chain[step], step, rollout.cond)
            log_prob = gaussian_log_prob(rollout.chain[step + 1], mean, std, free_mask)
            if args.rl_algo == "reinforce":
                loss = -(weights[step] * log_prob * advantages).mean()
            else:
                loss, ratio = ppo_step_loss(log_prob, rollout.log_probs[step], advantages, weights[step], args.ppo_clip)
                loss = loss / len(steps)
                ratio_deviation = ratio_deviation + (ratio - 1).abs().mean().detach() / len(steps)
            if args.kl_coef > 0:
                with torch.no_grad():
                    reference_mean, _ = space.step_distribution(reference, rollout.chain[step], step, rollout.cond)
                kl = step_kl(mean, reference_mean, std, free_mask).mean() / len(steps)
                loss = loss + args.kl_coef * kl
                kl_total = kl_total + kl.detach()
            loss.backward()
            total = total + loss.detach()
        clipped_step(optimizer, args.max_grad_norm)
        metrics = {"loss": total, "kl": kl_total, "ratio_deviation": ratio_deviation}
    return {**metrics, "reward": rewards.mean()}


def qvpg(space, policy, reference, optimizer, args) -> dict:
    """QV-PG: -reward back-propagated through the last K denoising steps only, normalised by the batch's
    mean reward magnitude (the learning rate does not depend on Q's scale), with an optional KL to the reference."""
    k = int(torch.randint(1, args.qvpg_k + 1, ()).item()) if args.qvpg_random_k else args.qvpg_k
    cond = space.conditions(args.align_batch)
    out = space.sample(policy, cond, args.group_size, grad_last_k=k, return_chain=args.kl_coef > 0)
    rewards = sample_rewards(space, cond, out.x0, args.group_size, args)
    loss = -(rewards / rewards.detach().abs().mean().clamp(min=1e-6)).mean()
    kl_total = torch.zeros((), device=rewards.device)
    if args.kl_coef > 0:
        free_mask = space.free_mask(out.x0)
        for step in range(len(out.chain) - 1 - k, len(out.chain) - 1):
            latent = out.chain[step].detach()
            mean, std = space.step_distribution(policy, latent, step, out.cond)
            with torch.no_grad():
                reference_mean, _ = space.step_distribution(reference, latent, step, out.cond)
            kl_total = kl_total + step_kl(mean, reference_mean, std, free_mask).mean() / k
        loss = loss + args.kl_coef * kl_total
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clipped_step(optimizer, args.max_grad_norm)
    return {"loss": loss.detach(), "reward": rewards.detach().mean(), "kl": kl_total.detach()}


def masked_mean(values: torch.Tensor, mask) -> torch.Tensor:
    """Per-sample mean over the generated entries (all of them when `mask` is None) (B,)."""
    if mask is None:
        return values.flatten(1).mean(1)
    return (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp(min=1)


def dpo_loss(space, policy, reference, winners, losers, cond, beta: float, kl_coef: float = 0.0, t=None, noise=None):
    """Diffusion-DPO: -log sigmoid(-beta (d_theta - d_ref)), d = eps-error(winner) - eps-error(loser)
    with the same t and noise for both members of a pair, plus kl_coef times the mean squared difference of the two
    models' noise predictions (divergence control); returns (loss, implicit accuracy)."""
    pairs = winners.shape[0]
    t = space.diffusion.sample_train_time(pairs, winners.device) if t is None else t
    noise = torch.randn_like(winners) if noise is None else noise
    both, both_cond = torch.cat([winners, losers]), torch.cat([cond, cond])
    both_t, both_noise = torch.cat([t, t]), torch.cat([noise, noise])
    predicted = space.predicted_noise(policy, both, both_cond, both_t, both_noise)
    with torch.no_grad():
        reference_predicted = space.predicted_noise(reference, both, both_cond, both_t, both_noise)
    mask = space.free_mask(both)
    errors = masked_mean((predicted - both_noise) ** 2, mask)
    reference_errors = masked_mean((reference_predicted - both_noise) ** 2, mask)
    logits = -beta * ((errors[:pairs] - errors[pairs:]) - (reference_errors[:pairs] - reference_errors[pairs:]))
    loss = -F.logsigmoid(logits).mean()
    if kl_coef > 0:
        loss = loss + kl_coef * masked_mean((predicted - reference_predicted) ** 2, mask).mean()
    return loss, (logits > 0).float().mean()


def dpo(space, policy, reference, optimizer, args) -> dict:
    """DPO on pairs ranked by reward: per state, the i-th best sample wins against the i-th worst (dpo_pairs halves)
    or the best against every other one (best). The reference is the model as the DPO stage found it (the foundation
    when DPO comes first, as Diffusion-DPO is published); every pair is scored under dpo_noise_draws (t, noise)
    draws, for epochs_per_batch steps."""
    group, half = args.group_size, args.group_size // 2
    cond = space.conditions(args.align_batch)
    with torch.no_grad():
        samples = space.sample(reference if args.dpo_source == "reference" else policy, cond, group).x0
        rewards = sample_rewards(space, cond, samples, group, args).view(-1, group)
        order = rewards.argsort(dim=1, descending=True)
        grouped = samples.view(-1, group, *samples.shape[1:])
        rows = torch.arange(grouped.shape[0], device=samples.device)[:, None]
        if args.dpo_pairs == "best":  # the best sample against every other one
            winner_index, loser_index = order[:, :1].expand(-1, group - 1), order[:, 1:]
        else:  # the i-th best against the i-th worst
            winner_index, loser_index = order[:, :half], order.flip(1)[:, :half]
        draws, sample_dims = args.dpo_noise_draws, [1] * len(space.shape)
        winners = grouped[rows, winner_index].flatten(0, 1).repeat(draws, *sample_dims)
        losers = grouped[rows, loser_index].flatten(0, 1).repeat(draws, *sample_dims)
        pair_cond = cond.repeat_interleave(loser_index.shape[1], 0).repeat(draws, *[1] * (cond.dim() - 1))
    for _ in range(args.epochs_per_batch):  # fresh (t, noise) every epoch
        optimizer.zero_grad(set_to_none=True)
        loss, accuracy = dpo_loss(space, policy, reference, winners, losers, pair_cond, args.dpo_beta, args.kl_coef)
        loss.backward()
        clipped_step(optimizer, args.max_grad_norm)
    return {"loss": loss.detach(), "implicit_accuracy": accuracy, "reward": rewards.mean()}


def elbo_proxy(space, model, samples, cond, draws_t, draws_noise) -> torch.Tensor:
    """Denoising error averaged over fixed (t, noise) draws (B,): low means likely under `model`."""
    draws, batch = draws_t.shape[0], samples.shape[0]
    errors = space.eps_error(model, samples.repeat(draws, *[1] * (samples.dim() - 1)),
                             cond.repeat(draws, *[1] * (cond.dim() - 1)), draws_t.repeat_interleave(batch),
                             draws_noise.repeat_interleave(batch, 0))
    return errors.view(draws, batch).mean(0)


def likelihood_threshold(space, reference, args, dataset_samples: int = 1024) -> tuple:
    """SFT's acceptance rule: fixed (t, noise) draws, from a seed of their own, and the sft_quantile of
    the reference's ELBO proxy on dataset samples."""
    device = space.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(args.seed + 1)
        draws_t = space.diffusion.sample_train_time(args.sft_elbo_draws, device)
        draws_noise = torch.randn(args.sft_elbo_draws, *space.shape, device=device)
        samples, cond = space.dataset_samples(dataset_samples)
    with torch.no_grad():
        scores = elbo_proxy(space, reference, samples, cond, draws_t, draws_noise)
    return torch.quantile(scores, args.sft_quantile), draws_t, draws_noise


def sft(space, policy, reference, optimizer, args) -> dict:
    """SFT with a likelihood threshold: per state the top sft_top_fraction of the samples by reward,
    those the reference (the model as the SFT stage found it) still finds likely (ELBO proxy under the dataset's
    sft_quantile, made once per reference), fine-tuned on with the ordinary diffusion loss for epochs_per_batch
    steps, plus sft_data_weight times that loss on as many dataset samples."""
    group = args.group_size
    if space.likelihood_threshold is None or space.likelihood_threshold[0] is not reference:
        space.likelihood_threshold = (reference, *likelihood_threshold(space, reference, args))
    _, threshold, draws_t, draws_noise = space.likelihood_threshold
    cond = space.conditions(args.align_batch)
    keep = max(1, math.ceil(args.sft_top_fraction * group))
    sources = {"current": [(policy, group)], "reference": [(reference, group)],
               "both": [(policy, group // 2), (reference, group - group // 2)]}[args.sft_source]
    with torch.no_grad():
        samples = torch.cat([space.sample(model, cond, count).x0.view(-1, count, *space.shape)
                             for model, count in sources], 1).flatten(0, 1)
        rewards = sample_rewards(space, cond, samples, group, args).view(-1, group)
        top = rewards.topk(keep, dim=1).indices
        rows = torch.arange(top.shape[0], device=samples.device)[:, None]
        best = samples.view(-1, group, *space.shape)[rows, top].flatten(0, 1)
        best_cond = cond.repeat_interleave(keep, 0)
        accepted = elbo_proxy(space, reference, best, best_cond, draws_t, draws_noise) <= threshold
    loss = torch.zeros((), device=samples.device)
    anchor = space.dataset_samples(int(accepted.sum())) if args.sft_data_weight > 0 else None
    for _ in range(args.epochs_per_batch if accepted.any() else 0):
        optimizer.zero_grad(set_to_none=True)
        loss = space.loss(policy, best[accepted], best_cond[accepted]).mean()
        if anchor is not None:
            loss = loss + args.sft_data_weight * space.loss(policy, *anchor).mean()
        loss.backward()
        clipped_step(optimizer, args.max_grad_norm)
    return {"loss": loss.detach(), "acceptance": accepted.float().mean(), "reward": rewards.mean()}


def cascade(space, policy, reference, optimizer, args) -> dict:
    """Cascade training: `policy` is the cascade, `reference` the model whose samples it refines.
    Consistent pairs branch cascade_branches continuations from one shared latent per state (stochastic samplers:
    the chain's latent; deterministic ones: the shared sample re-noised to that step's level with fresh noise per
    branch), ranked by reward; every other branch becomes a condition for the best one."""
    branches = args.cascade_branches
    cond = space.conditions(args.align_batch)
    with torch.no_grad():
        trunk = space.sample(reference, cond, return_chain=True)
        branch_step = int(args.cascade_branch_fraction * (len(trunk.chain) - 1))
        if space.diffusion.stochastic:
            start = trunk.chain[branch_step].repeat_interleave(branches, 0)
        else:
            shared = trunk.x0.repeat_interleave(branches, 0)
            t = torch.full((shared.shape[0],), space.diffusion.step_time[branch_step], device=shared.device)
            start = space.diffusion.add_noise(shared, t, torch.randn_like(shared))
        samples = space.sample(reference, cond, branches, x_start=start, start_step=branch_step).x0
        rewards = sample_rewards(space, cond, samples, branches, args).view(-1, branches)
        order = rewards.argsort(dim=1, descending=True)
        grouped = samples.view(-1, branches, *space.shape)
        rows = torch.arange(grouped.shape[0], device=samples.device)[:, None]
        targets = grouped[rows, order[:, :1]].expand(-1, branches - 1, *space.shape).flatten(0, 1)
        conditions = grouped[rows, order[:, 1:]].flatten(0, 1)
        pair_cond = cond.repeat_interleave(branches - 1, 0)
    optimizer.zero_grad(set_to_none=True)
    loss = space.cascade_loss(policy, targets, conditions, pair_cond)
    loss.backward()
    clipped_step(optimizer, args.max_grad_norm)
    return {"loss": loss.detach(), "pair_gain": (rewards.max(1).values - rewards.mean(1)).mean()}


def iql_losses(critic, critic_target, value, batch, args) -> tuple[torch.Tensor, torch.Tensor]:
    """IQL (the same text in all three scripts): expectile regression of V on min target-Q, and TD
    regression of both Q heads on r + gamma (1 - terminal) V(s')."""
    states, actions, rewards, next_states, terminals = batch
    with torch.no_grad():
        q_target = torch.min(*critic_target(states, actions))
        next_value = value(next_states)
    difference = q_target - value(states)
    value_loss = (torch.abs(args.expectile - (difference < 0).float()) * difference.pow(2)).mean()
    td_target = rewards + args.gamma * (1.0 - terminals) * next_value
    q1, q2 = critic(states, actions)
    return value_loss, (q1 - td_target).pow(2).mean() + (q2 - td_target).pow(2).mean()


def iql_update(critic, critic_target, value, batch, optimizers, args, losses=iql_losses) -> dict:
    """One IQL step (the same text in all three scripts): both losses with one backward (Q's and V's parameters are
    disjoint; V(s') is taken before V moves), then the Polyak target. `losses` may be iql_losses torch.compile'd."""
    value_loss, q_loss = losses(critic, critic_target, value, batch, args)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    (value_loss + q_loss).backward()
    for optimizer in optimizers:
        optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(critic_target.parameters()), list(critic.parameters()), args.polyak)
    return {"value": value_loss.detach(), "q": q_loss.detach()}


# ======================================================================================================================
# Foundation training and evaluation
# ======================================================================================================================
def foundation_step(space: PlanSpace, model, optimizer, args: Args) -> dict:
    """Masked in-painting on dataset windows. `model` is the U-Net or its torch.compile'd wrapper."""
    windows, cond = space.dataset_samples(args.batch_size)
    loss = space.loss(model, windows, cond).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


def inverse_dynamics_step(inverse_dynamics, transitions: dict, optimizer, args: Args) -> dict:
    """Decision Diffuser's action model a = g(s, s'), regressed on dataset transitions."""
    index = torch.randint(0, len(transitions["observations"]), (args.batch_size,), device=transitions["actions"].device)
    predicted = inverse_dynamics(transitions["observations"][index], transitions["next_observations"][index])
    loss = F.mse_loss(predicted, transitions["actions"][index])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach()}


def critic_batch(transitions: dict, batch: int) -> tuple:
    index = torch.randint(0, len(transitions["observations"]), (batch,), device=transitions["actions"].device)
    return tuple(transitions[key][index] for key in
                 ("observations", "actions", "rewards", "next_observations", "terminals"))


class PlanningPolicy:
    """evaluate()'s policy: plans from every observation and executes the best plan's first action; on Nav1D it
    also scores the dynamics coherency of the chosen plans."""

    def __init__(self, planner: Planner, data, normalizer: Normalizer, cascade: nn.Module | None):
        self.planner, self.data, self.normalizer, self.cascade = planner, data, normalizer, cascade
        self.device = next(planner.q_target.parameters()).device
        self.coherency: list[float] = []

    def __call__(self, observations: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        states = torch.as_tensor(self.normalizer.normalize(observations.astype(np.float32)), device=self.device)
        actions, chosen = self.planner.act(states, self.cascade)
        if self.data.family == "nav1d":  # dynamics consistency of the chosen plans
            plan_states, plan_actions = self.planner.states_actions(chosen)
            self.coherency += nav1d.plans_coherency(observations,
                                                    self.normalizer.unnormalize(plan_states.cpu().numpy())[..., 0],
                                                    unscale_actions(self.data, plan_actions.cpu().numpy())[..., 0])
        return unscale_actions(self.data, actions.cpu().numpy())


def evaluate_planner(planner: Planner, data, normalizer: Normalizer, cascade: nn.Module | None, args: Args) -> dict:
    """Return statistics over eval_episodes (and plan coherency on Nav1D)."""
    policy = PlanningPolicy(planner, data, normalizer, cascade)
    result = evaluate(policy, data.make_env, args.eval_episodes, args.seed, args.eval_max_steps or None)
    stats = stage_stats(result.returns, normalized_score(data, result.returns), result.actions_per_s,
                        result.success)
    if policy.coherency:
        stats["coherency"] = float(np.mean(policy.coherency))
    return stats


# ======================================================================================================================
# Main
# ======================================================================================================================
def main(args: Args) -> None:
    args = resumed_arguments(args, SCRIPT)  # --resume: the run's own arguments
    from_presets = apply_presets(args, PRESETS, compute_presets=COMPUTE_PRESETS)
    methods, cascade_methods = validate_args(args)
    loaded = {stage: check_loadable(path, SCRIPT, stage)
              for stage, path in (("foundation", args.load_foundation), ("critic", args.load_critic)) if path}
    data = load_offline_data(args.env)
    normalizer = Normalizer.from_array(data.observations)
    for stage, checkpoint in loaded.items():
        require_same_data(checkpoint, normalizer, f"--load-{stage}", args, PLANNER_SETTINGS if stage == "foundation" else ())
    run = start_run(args, SCRIPT)
    device, graphs = run.device, use_cuda_graphs(args, run.device)
    if from_presets:
        print(f"preset values for {args.env}: {from_presets}")

    # ---- models, optimisers, data (everything a checkpoint may hold is built before resuming) ---------------------
    state_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    x_dim = state_dim + (action_dim if args.planner == "diffuser" else 0)
    diffusion = make_diffusion(args)
    foundation = TemporalUNet(x_dim, args.horizon, 0, args.unet_base_dim, args.unet_dim_mults).to(device)
    inverse_dynamics = InverseDynamics(state_dim, action_dim, args.inverse_dynamics_hidden).to(device)
    critic, value = TwinQ(state_dim, action_dim, args.critic_hidden).to(device), ValueNet(state_dim, args.critic_hidden).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    trainer = Trainer(run, args.log_every, args.save_every)
    trainer.models = {"foundation": foundation, "inverse_dynamics": inverse_dynamics, "critic": critic,
                      "critic_target": critic_target, "value": value}
    optimizers = trainer.optimizers = {
        "foundation": torch.optim.Adam(foundation.parameters(), lr=args.foundation_lr, capturable=graphs),
        "inverse_dynamics": torch.optim.Adam(inverse_dynamics.parameters(), lr=args.foundation_lr),
        "q": torch.optim.Adam(critic.parameters(), lr=args.critic_lr, capturable=graphs),
        "v": torch.optim.Adam(value.parameters(), lr=args.critic_lr, capturable=graphs)}
    trainer.state.update(normalizer=normalizer.state_dict(), online=None)
    if args.resume:
        trainer.resume(run.load_checkpoint())
    offline = transitions = model_transitions(data, normalizer, device=device)  # + online episodes after a collection
    if trainer.state["online"] is not None:
        transitions = model_transitions(data, normalizer, trainer.state["online"], device)
    planner = Planner(args, diffusion, foundation, critic_target, state_dim, action_dim,
                      inverse_dynamics if args.planner == "dd" else None, cuda_graphs=graphs)
    space = PlanSpace(args, planner, offline)
    print(f"data: {data.source}, {len(data)} transitions; foundation U-Net {count_parameters(foundation):,} "
          f"parameters, x_dim {x_dim}, horizon {args.horizon}; device {device}")

    def critic_stage(stage: str, steps: int) -> None:
        """IQL on the current transitions (the offline data, plus online episodes after a collection)."""
        step = cuda_graphed(lambda: iql_update(critic, critic_target, value, critic_batch(transitions, args.critic_batch_size),
                                               (optimizers["v"], optimizers["q"]), args), graphs)
        trainer.run_stage(stage, steps, step, tag="critic", optimizer=optimizers["q"])
        trainer.finish(stage)

    # ==================================================================================================================
    # Stage 1: foundation planner (masked in-painting), and dd's inverse dynamics
    # ==================================================================================================================
    if "foundation" in loaded and "foundation" not in trainer.done:
        trainer.load_stage("foundation", loaded["foundation"], args.load_foundation, ("foundation", "inverse_dynamics"))
        trainer.done["inverse_dynamics"] = {"loaded_from": args.load_foundation}
    if "foundation" not in trainer.done:
        foundation.train()
        model = planner.compiled(foundation)
        trainer.run_stage("foundation", args.foundation_steps, cuda_graphed(
            lambda: foundation_step(space, model, optimizers["foundation"], args), graphs),
            optimizer=optimizers["foundation"])
        trainer.finish("foundation")
    if args.planner == "dd" and "inverse_dynamics" not in trainer.done:
        trainer.run_stage("inverse_dynamics", args.inverse_dynamics_steps, lambda: inverse_dynamics_step(
            inverse_dynamics, transitions, optimizers["inverse_dynamics"], args), optimizer=optimizers["inverse_dynamics"])
        trainer.finish("inverse_dynamics")
    inverse_dynamics.requires_grad_(False)

    # ==================================================================================================================
    # Stage 2: IQL critic
    # ==================================================================================================================
    if "critic" in loaded and "critic" not in trainer.done:
        trainer.load_stage("critic", loaded["critic"], args.load_critic, ("critic", "critic_target", "value"))
    if "critic" not in trainer.done:
        critic_stage("critic", args.critic_steps)
    foundation.eval()
    monitor = DivergenceMonitor(space, seed=args.seed)
    if "foundation" not in trainer.results:
        trainer.record("foundation", evaluate_planner(planner, data, normalizer, None, args) | monitor(foundation))
        trainer.throughput["action_latency_ms"] = action_latency_ms(lambda: planner.act(space.states[:1])[0].cpu())
        trainer.at("foundation evaluation", 0, save=True)

    # ==================================================================================================================
    # Stage 3: alignment passes (LoRA adapters on every Linear and Conv1d; the cascade is a model of its own)
    # ==================================================================================================================
    with seeded(args.seed + 1, device):  # the same adapters and cascade whether or not the run was resumed
        policy, reference = policy_with_reference(foundation, args.lora_rank, args.lora_alpha)
        cascade_model = CascadeDenoiser(args, foundation, x_dim).to(device) if "cascade" in methods else None
    trainer.adopt_module("policy", policy)
    if cascade_model is not None:
        trainer.adopt_module("cascade", cascade_model)
    planner.denoiser = policy
    print(f"alignment trains {count_parameters(policy, trainable_only=True):,} parameters "
          f"({'LoRA rank ' + str(args.lora_rank) if args.lora_rank else 'full fine-tuning'})")

    def retrain_critic(stage: str) -> None:
        """The critic on the offline data plus the online episodes (trainer.state["online"])."""
        nonlocal transitions
        transitions = model_transitions(data, normalizer, trainer.state["online"], device)
        critic_stage(stage, args.online_critic_steps)

    run_alignment(trainer, args, methods, cascade_methods,
                  {"rl": rl, "qvpg": qvpg, "dpo": dpo, "sft": sft, "cascade": cascade}, space,
                  lambda: CascadePlanSpace(args, planner, offline, policy), policy, reference, cascade_model,
                  lambda cascade: evaluate_planner(planner, data, normalizer, cascade, args),
                  lambda cascade: PlanningPolicy(planner, data, normalizer, cascade), data.make_env, retrain_critic,
                  monitor)
    trainer.write_summary(SCRIPT, args, data.family)
    run.close()


if __name__ == "__main__":
    cli(main, Args)
