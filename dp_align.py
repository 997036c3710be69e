"""Diffusion Policy aligned with a Q-function: RL, QV-PG, DPO, SFT and cascade alignment.

Paper: "Maximize Your Diffusion: A Study into Reward Maximization and Alignment for Diffusion-based Control"
(Huh, Mohapatra), the policy half.

Overview. A Diffusion Policy (the *foundation*) learns the dataset's action chunks a_{t:t+Tp} conditioned on the last
To observations, with any sampler of `common.diffusion` (ddpm, ddim, sm, fm). An IQL critic is trained on the same
data. The reward of a generated chunk for state s is Q(s, a_first). Alignment then fine-tunes one set of LoRA adapters
(or the whole network) with any sequence of methods, repeated for several passes: `rl` treats denoising as a
multi-step MDP (REINFORCE or PPO-clip over the Gaussian sampler steps), `qvpg` back-propagates -Q through the last K
denoising steps, `dpo` is Diffusion-DPO on Q-ranked pairs against the model as the DPO stage found it, `sft`
fine-tunes on the best samples that the frozen foundation still finds likely, and `cascade` trains a second,
zero-initialised conditional model that turns a sample into a better one and is applied once at inference. Actions
are chosen among N candidates by their mean (`expectation`), by the highest Q (`idql`, the paper's rule), or by
sampling a softmax over Q - V (`softmax`, IDQL's stochastic rule). The foundation, every method of every pass and
the final model are evaluated.

The five methods and their helpers are written against `ChunkSpace` (how to draw, score and train on action chunks)
and are the same text in diffuser_align.py, which implements the same interface for plans.

    python dp_align.py --env nav1d-full --align rl,dpo,sft
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import nav1d
from common.data import (Normalizer, evaluate, load_offline_data, model_transitions, normalized_score,
                         unscale_actions, windows)
from common.diffusion import Diffusion, SampleOutput, gaussian_log_prob
from common.nets import (DiT1d, MLPDenoiser, TwinQ, ValueNet, count_parameters, load_foundation_into_cascade,
                         policy_with_reference)
from common.runtime import (UserError, apply_presets, cli, cuda_graphed, require, resumed_arguments, seeded,
                            stage_stats, start_run, use_cuda_graphs)
from common.training import (CompiledModules, DivergenceMonitor, Trainer, action_latency_ms, check_loadable,
                             method_sequence, require_same_data, run_alignment)

SCRIPT = "dp_align"
METHODS = ("rl", "qvpg", "dpo", "sft", "cascade")


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of the experiment (part of the default run directory)"""
    seed: int = 0
    """seed of everything (training, sampling, evaluation episodes)"""
    env: str = "nav1d-full"
    """dataset: nav1d-partial|full|expert, a Minari id, or a D4RL name such as hopper-medium-v2"""
    preset: Literal["", "cpu"] = ""
    """compute preset over the dataset's own: cpu = the whole method at 2-core CPU scale (README, "Compute presets")"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to run"""
    torch_deterministic: bool = True
    """deterministic torch algorithms (same seed + device -> same numbers)"""
    run_dir: str = ""
    """output folder (default runs/{env}__{exp_name}__{seed}__{unix_time})"""
    resume: bool = False
    """continue the run in --run-dir from its latest checkpoint; finished stages are skipped"""
    eval_episodes: int = 20
    """evaluation episodes per evaluated stage"""
    eval_every: int = 0
    """also evaluate every this many steps inside an alignment method (TensorBoard only; 0 = off)"""
    eval_max_steps: int = 0
    """cap on evaluation episode length (0 = the environment's own limit)"""
    save_every: int = 5000
    """checkpoint every this many training steps (and at the end of every stage)"""
    log_every: int = 50
    """steps between loss logs (and finiteness checks)"""
    compile: bool = False
    """torch.compile the denoisers"""
    cuda_graphs: bool = True
    """on a GPU, replay the foundation and critic steps and action selection from CUDA graphs (no effect on a CPU)"""
    cpu_threads: int = 0
    """torch CPU threads (0: torch's default); small networks run faster on 1, above all on a busy machine"""

    # ---- data and chunking
    obs_horizon: int = 2
    """To: number of past observations the policy is conditioned on"""
    pred_horizon: int = 8
    """Tp: length of the generated action chunk"""
    action_horizon: int = 4
    """Ta: actions of a chunk executed before replanning"""

    # ---- foundation Diffusion Policy
    backbone: Literal["dit", "mlp"] = "dit"
    """denoiser network: a DiT over the chunk, or an MLP over the flattened chunk"""
    hidden: int = 256
    """width of the denoiser"""
    depth: int = 4
    """DiT blocks / MLP hidden layers"""
    heads: int = 4
    """DiT attention heads"""
    sampler: Literal["ddpm", "ddim", "sm", "fm"] = "ddpm"
    """ddim with eta=0 and fm are deterministic: use qvpg (or ddim --eta > 0) for RL"""
    sample_steps: int = 20
    """denoising steps when sampling"""
    train_steps: int = 100
    """noise levels of the discrete schedule (ddpm, ddim); sampling strides over them"""
    eta: float = 0.0
    """DDIM noise (0 = deterministic; ddpm is ddim with eta=1)"""
    sde_solver: Literal["exponential", "euler"] = "exponential"
    """reverse-SDE step of --sampler sm: exponential integrator (exact Gaussian steps on a logSNR grid) or
    Euler-Maruyama (needs hundreds of steps)"""
    spacing: Literal["uniform", "quadratic"] = "uniform"
    """sampler steps of ddpm, ddim (over the --train-steps levels) and fm: even, or quadratic (densest near the data,
    where coarse first-order steps lose the data's spread)"""
    prediction: Literal["", "eps", "x0", "velocity"] = ""
    """network output ('' = the sampler's default; fm is always velocity)"""
    clip_sample: bool = True
    """clip the predicted clean chunk to the action box at every sampling step (Diffusion Policy's clip_sample)"""
    foundation_steps: int = 200_000
    """training steps of the foundation model"""
    foundation_lr: float = 3e-4
    """Adam learning rate of the foundation model"""
    batch_size: int = 256
    """chunks per foundation batch"""
    ema_decay: float = 0.995
    """EMA of the foundation weights (the EMA model is the foundation used afterwards)"""
    load_foundation: str = ""
    """take the foundation from this dp_align checkpoint instead of training it"""

    # ---- IQL critic
    critic_steps: int = 500_000
    """IQL training steps"""
    critic_batch_size: int = 256
    """transitions per IQL batch"""
    critic_lr: float = 3e-4
    """Adam learning rate of Q and V"""
    critic_hidden: int = 256
    """width of the Q and V networks"""
    gamma: float = 0.99
    """discount"""
    expectile: float = 0.7
    """IQL expectile tau of the V loss"""
    polyak: float = 0.005
    """target-Q update rate"""
    load_critic: str = ""
    """take the critic from this dp_align checkpoint instead of training it"""

    # ---- action selection
    num_candidates: int = 8
    """N: candidate chunks generated per decision"""
    selection: Literal["expectation", "idql", "softmax"] = "expectation"
    """expectation: mean of the candidates; idql: the highest Q (the paper's rule, "greedily ... similar to IDQL");
    softmax: sample softmax(T (Q - V)), IDQL's own stochastic rule"""
    softmax_temperature: float = 1.0
    """inverse temperature T of the softmax selection"""

    # ---- alignment, shared by all methods (the same names in diffuser_align.py)
    align: str = "rl,dpo,sft"
    """comma-separated alignment methods run in order: rl, qvpg, dpo, sft, cascade"""
    passes: int = 1
    """repeat the --align sequence this many times"""
    lora_rank: int = 8
    """LoRA rank (0 = full fine-tuning with a frozen copy as the reference)"""
    lora_alpha: float = 16.0
    """LoRA alpha (the update is scaled by alpha / rank)"""
    align_batch: int = 64
    """conditioning states per alignment update"""
    group_size: int = 8
    """samples generated per conditioning state (advantages, pairs and rankings are within the group)"""
    kl_coef: float = 0.0
    """divergence control: weight of the per-step KL to the reference (rl, qvpg), and for dpo of the squared
    difference of the policy's and the reference's noise predictions (the KL of the two diffusions, unweighted)"""
    entropy_coef: float = 0.0
    """weight of a nearest-neighbour entropy bonus added to each sample's reward (counters narrowing)"""
    epochs_per_batch: int = 4
    """gradient steps on each generated batch for dpo and sft (sampling costs far more than an update)"""
    max_grad_norm: float = 1.0
    """gradient clipping during alignment"""
    rl_steps: int = 1000
    """updates of the rl method per pass"""
    rl_lr: float = 1e-4
    """learning rate of the rl method"""
    rl_algo: Literal["ppo", "reinforce"] = "ppo"
    """ppo (clipped ratio, DDPO) or reinforce"""
    ppo_clip: float = 0.2
    """PPO ratio clip epsilon"""
    ppo_epochs: int = 2
    """PPO optimisation epochs per sampled batch"""
    credit: Literal["uniform", "decay", "similarity"] = "uniform"
    """credit weights over the denoising steps"""
    credit_decay: float = 0.9
    """ratio of the geometric decay weights (larger near x_0)"""
    qvpg_steps: int = 1000
    """updates of the qvpg method per pass"""
    qvpg_lr: float = 1e-4
    """learning rate of the qvpg method"""
    qvpg_k: int = 2
    """gradients flow through only the last K denoising steps"""
    qvpg_random_k: bool = False
    """draw K uniformly from 1..qvpg_k for every batch"""
    dpo_steps: int = 1000
    """updates of the dpo method per pass"""
    dpo_lr: float = 1e-4
    """learning rate of the dpo method"""
    dpo_beta: float = 100.0
    """DPO inverse temperature on the eps-error differences (tune for low-dimensional data)"""
    dpo_noise_draws: int = 4
    """(t, noise) draws per pair in every DPO step"""
    dpo_pairs: Literal["halves", "best"] = "halves"
    """per state, the i-th best sample against the i-th worst (halves), or the best against every other (best: what
    a best-of-N selection needs, the top of the distribution to improve)"""
    dpo_source: Literal["reference", "current"] = "reference"
    """sample the pairs from the DPO reference (the model at the start of the DPO stage) or the current model"""
    sft_steps: int = 1000
    """updates of the sft method per pass"""
    sft_lr: float = 1e-4
    """learning rate of the sft method"""
    sft_top_fraction: float = 0.25
    """keep this fraction of each state's samples, highest reward first"""
    sft_quantile: float = 0.9
    """accept a kept sample only if its reference ELBO proxy is below this quantile of the dataset's"""
    sft_elbo_draws: int = 8
    """fixed (t, noise) draws averaged in the ELBO proxy"""
    sft_source: Literal["reference", "current", "both"] = "reference"
    """where SFT's candidates come from: its reference (the model as the SFT stage found it; a fixed target, so
    SFT cannot feed on its own samples), the current model, or half each"""
    sft_data_weight: float = 0.0
    """weight of the ordinary diffusion loss on as many dataset chunks, added to every SFT update: an anchor on the
    data (what the Diffuser needs on Hopper, where fitting its own plans alone drifts off the data); 0 fine-tunes on
    the accepted samples only"""
    cascade_steps: int = 1000
    """training steps of the cascade per pass"""
    cascade_lr: float = 1e-4
    """learning rate of the cascade"""
    cascade_branches: int = 4
    """continuations branched from each shared latent"""
    cascade_branch_fraction: float = 0.5
    """the shared latent is taken after this fraction of the denoising steps"""
    cascade_align: str = "rl"
    """methods (rl, qvpg, dpo, sft) that then align the cascade on its own samples, as the paper does, each for its
    --{method}-steps at --cascade-lr ("" = pairs only)"""
    online_episodes: int = 0
    """episodes collected with the current model before every pass after the first (0 = offline only)"""
    online_critic_steps: int = 1000
    """critic steps on the data plus the new episodes after each collection"""


# Nav1D: a small network and short stages so the default run takes minutes on a 2-core CPU.
PRESETS: dict[str, dict] = {
    "nav1d": dict(
        obs_horizon=1, pred_horizon=2, action_horizon=1, hidden=32, depth=2, heads=2, align_batch=32,
        # 20 quadratic-spaced steps of 200 levels: 10 even steps of 10 levels halved the spread of narrow data even
        # with an exact denoiser, and SFT after RL then fell back (nav1d-full seed 0, rl,dpo,sft: rl 4.24 / sft 3.13
        # with 10 even steps, 5.42 / 4.37 with 30, 5.58 / 6.02 with these)
        sample_steps=20, train_steps=200, spacing="quadratic", dpo_beta=10.0, foundation_steps=3000,
        critic_steps=4000, critic_hidden=128, expectile=0.9, eval_episodes=100,
        save_every=1000, rl_steps=150, qvpg_steps=150, dpo_steps=150, sft_steps=150, cascade_steps=300,
        rl_lr=1e-3, qvpg_lr=1e-3, dpo_lr=1e-3, sft_lr=3e-4, cascade_lr=1e-3, online_critic_steps=500, cpu_threads=1,
    ),
    # The expert data covers a narrow band of actions, so Q is unreliable elsewhere: without the KL to the reference,
    # RL alone took the return from 7.27 to 2.28 (coherency 0.19); with kl_coef=10, 7.27 -> 7.35 (coherency 0.94).
    "nav1d-expert": dict(kl_coef=10.0),
    # MetaWorld's 500-step episodes: Diffusion Policy's own horizons for state-based manipulation (observe 2 steps,
    # predict 16, execute 8), so an evaluation calls the policy every 8 steps
    "metaworld": dict(obs_horizon=2, pred_horizon=16, action_horizon=8),
    "robomimic": dict(obs_horizon=2, pred_horizon=16, action_horizon=8),  # the same for robomimic's low-dim tasks
    "pusht": dict(obs_horizon=2, pred_horizon=16, action_horizon=8),  # and for PushT
}

COMPUTE_PRESETS: dict[str, dict] = {  # --preset: sizes for a machine, over the dataset's preset (README)
    # a 2-core CPU: an MLP denoiser, 20k foundation and 100k critic steps, 300 steps per alignment method (sizes from
    # the per-step timings of cpu_speed.md); kl_coef 0.1 because on Hopper seed 1 RL alone without it fell from 23.7
    # to 3.3 (14% of actions at a bound) and with it rose to 45.5 (benchmark_results/hopper_cpu.md)
    "cpu": dict(backbone="mlp", hidden=256, depth=3, foundation_steps=20_000, critic_steps=100_000, train_steps=200,
                spacing="quadratic", rl_steps=300, qvpg_steps=300, dpo_steps=300, sft_steps=300, cascade_steps=300,
                align_batch=32, kl_coef=0.1, eval_episodes=20, save_every=2_000),
}


def validate(args: Args) -> tuple[list[str], list[str]]:
    """Every argument check, before any work; returns the alignment sequence and the cascade's."""
    methods = method_sequence(args.align, "--align", METHODS)
    cascade_methods = method_sequence(args.cascade_align, "--cascade-align", METHODS[:-1], required=False)
    deterministic = args.sampler == "fm" or (args.sampler == "ddim" and args.eta == 0)
    if "rl" in methods + (cascade_methods if "cascade" in methods else []) and deterministic:
        raise UserError(f"--align/--cascade-align rl needs a stochastic sampler but '{args.sampler}' (eta={args.eta}) is "
                        "deterministic; use --align qvpg, or --sampler ddim --eta 0.5 (or ddpm/sm)")
    positive = ("obs_horizon", "pred_horizon", "action_horizon", "sample_steps", "train_steps", "batch_size",
                "critic_batch_size", "num_candidates", "passes", "align_batch", "epochs_per_batch", "dpo_noise_draws",
                "save_every", "log_every", "sft_elbo_draws", "hidden", "depth", "heads", "critic_hidden",
                "eval_episodes", "ppo_epochs")
    non_negative = ("foundation_steps", "critic_steps", "rl_steps", "qvpg_steps", "dpo_steps", "sft_steps",
                    "cascade_steps", "online_episodes", "online_critic_steps", "eval_every", "lora_rank", "kl_coef",
                    "entropy_coef", "eval_max_steps", "sft_data_weight")
    checks = [(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1") for name in positive]
    checks += [(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0") for name in non_negative]
    checks += [(0 < getattr(args, name) <= 1, f"--{name.replace('_', '-')} must be in (0, 1]")
               for name in ("sft_top_fraction", "sft_quantile", "gamma", "polyak")]
    checks += [(0 <= args.ema_decay < 1, "--ema-decay must be in [0, 1) (1 would keep the random initial weights)")]
    checks += [(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0")
               for name in ("dpo_beta", "ppo_clip", "credit_decay", "softmax_temperature", "max_grad_norm",
                            "foundation_lr", "critic_lr", "rl_lr", "qvpg_lr", "dpo_lr", "sft_lr", "cascade_lr",
                            "lora_alpha")]
    checks += [
        (args.action_horizon <= args.pred_horizon, "--action-horizon cannot exceed --pred-horizon"),
        (args.group_size >= 2, "--group-size must be >= 2 (advantages and pairs compare samples)"),
        (args.cascade_branches >= 2, "--cascade-branches must be >= 2"),
        (1 <= args.qvpg_k <= args.sample_steps, f"--qvpg-k must be in [1, sample_steps={args.sample_steps}]"),
        (0 < args.expectile < 1, "--expectile must be in (0, 1)"),
        (0 <= args.cascade_branch_fraction < 1, "--cascade-branch-fraction must be in [0, 1)"),
        (args.sampler not in ("ddpm", "ddim") or args.train_steps >= args.sample_steps,
         "--train-steps must be >= --sample-steps"),
        (args.eta == 0 or args.sampler == "ddim", "--eta applies only to --sampler ddim"),
        (args.sampler != "fm" or args.prediction in ("", "velocity"), "--sampler fm predicts velocity; drop --prediction"),
    ]
    require(checks)
    return methods, cascade_methods


# ======================================================================================================================
# Networks and data in model coordinates
# ======================================================================================================================
def make_diffusion(args: Args) -> Diffusion:
    return Diffusion(args.sampler, args.sample_steps, train_steps=args.train_steps, eta=args.eta,
                     prediction=args.prediction or None, clip_x0=1.0 if args.clip_sample else None,
                     sde_solver=args.sde_solver, spacing=args.spacing)


def build_denoiser(args: Args, action_dim: int, cond_dim: int, extra_in_dim: int = 0) -> nn.Module:
    """The Diffusion Policy network over an action chunk (Tp, A), conditioned on the flattened observation history."""
    if args.backbone == "dit":
        return DiT1d(action_dim, args.pred_horizon, cond_dim, hidden=args.hidden, depth=args.depth, heads=args.heads,
                     extra_in_dim=extra_in_dim)
    return MLPDenoiser(action_dim, args.pred_horizon, cond_dim, hidden=args.hidden, layers=args.depth,
                       extra_in_dim=extra_in_dim)


class CascadeDenoiser(nn.Module):
    """The cascade as `model(x, t, cond)` for the sampler: cond = [observation history, flattened conditioning chunk],
    so `samples_per_cond` repeats both together. Warm-started from the foundation with its conditioning-chunk input
    at zero weight, so it equals the foundation until trained."""

    def __init__(self, args: Args, foundation: nn.Module, action_dim: int, obs_cond_dim: int):
        super().__init__()
        self.net = build_denoiser(args, action_dim, obs_cond_dim, extra_in_dim=action_dim)
        load_foundation_into_cascade(self.net, foundation.state_dict())
        self.obs_cond_dim = obs_cond_dim

    def forward(self, x, t, cond):
        return self.net(x, t, cond[:, : self.obs_cond_dim], cond[:, self.obs_cond_dim:].reshape(x.shape))


@dataclass
class Transitions:
    """The data in model coordinates (common.data.model_transitions): observation histories and action chunks are
    cut at episode bounds, repeating the episode's first observation before its start and last action past its end."""

    observations: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    next_observations: torch.Tensor
    terminals: torch.Tensor
    episode_first: torch.Tensor
    episode_last: torch.Tensor

    def __len__(self) -> int:
        return self.observations.shape[0]

    def observation_history(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """(B, To * S): observations index-To+1 .. index."""
        offsets = torch.arange(length - 1, -1, -1, device=index.device)
        rows = torch.maximum(index[:, None] - offsets, self.episode_first[index][:, None])
        return self.observations[rows].flatten(1)

    def action_chunk(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """(B, Tp, A): actions index .. index+Tp-1."""
        return windows(self.actions, index, length, self.episode_last)


class ChunkSpace:
    """What the alignment methods need to know about Diffusion Policy's samples. A condition is an observation
    history (B, To*S) whose last S entries are the current observation; a sample is an action chunk (Tp, A) in
    [-1, 1]; its reward is min target-Q of the current observation and the chunk's first action."""

    def __init__(self, args: Args, diffusion: Diffusion, transitions: Transitions, critic_target: nn.Module,
                 action_dim: int):
        self.args, self.diffusion, self.transitions, self.critic_target = args, diffusion, transitions, critic_target
        self.shape = (args.pred_horizon, action_dim)
        self.device = transitions.observations.device
        self.likelihood_threshold: tuple | None = None  # sft's (reference, threshold, draws), once per reference

    def conditions(self, batch: int) -> torch.Tensor:
        index = torch.randint(0, len(self.transitions), (batch,), device=self.device)
        return self.transitions.observation_history(index, self.args.obs_horizon)

    def dataset_samples(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(self.transitions), (batch,), device=self.device)
        return (self.transitions.action_chunk(index, self.args.pred_horizon),
                self.transitions.observation_history(index, self.args.obs_horizon))

    def sample(self, model, cond: torch.Tensor, n: int = 1, **kwargs) -> SampleOutput:
        return self.diffusion.sample(model, self.shape, cond, samples_per_cond=n, **kwargs)

    def reward(self, cond: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        observation = cond[:, -self.transitions.observations.shape[1]:]
        return torch.minimum(*self.critic_target(observation, samples[:, 0].clamp(-1, 1)))

    def free_mask(self, samples: torch.Tensor) -> None:
        return None  # every entry of a chunk is generated

    def actions(self, samples: torch.Tensor) -> torch.Tensor:
        return samples

    def step_distribution(self, model, x: torch.Tensor, step: int, cond: torch.Tensor):
        return self.diffusion.step_distribution(model, x, step, cond)

    def loss(self, model, samples: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.diffusion.loss(model, samples, cond)

    def eps_error(self, model, samples, cond, t, noise) -> torch.Tensor:
        return self.diffusion.eps_error(model, samples, cond, t, noise)

    def predicted_noise(self, model, samples, cond, t, noise) -> torch.Tensor:
        return self.diffusion.predicted_noise(model, samples, cond, t, noise)

    def cascade_loss(self, cascade, targets, conditions, cond) -> torch.Tensor:
        return self.diffusion.loss(cascade, targets, torch.cat([cond, conditions.flatten(1)], 1)).mean()


class CascadeChunkSpace(ChunkSpace):
    """The cascade's sample space for its own alignment: a condition is [observation history, a chunk
    the policy `upstream` drew for it], which is how CascadeDenoiser takes it; samples and rewards are ChunkSpace's."""

    def __init__(self, space: ChunkSpace, upstream):
        super().__init__(space.args, space.diffusion, space.transitions, space.critic_target, space.shape[1])
        self.upstream = upstream
        self.history_dim = space.args.obs_horizon * space.transitions.observations.shape[1]

    @torch.no_grad()
    def with_upstream_chunk(self, history: torch.Tensor) -> torch.Tensor:
        return torch.cat([history, super().sample(self.upstream, history).x0.flatten(1)], 1)

    def conditions(self, batch: int) -> torch.Tensor:
        return self.with_upstream_chunk(super().conditions(batch))

    def dataset_samples(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunks, history = super().dataset_samples(batch)
        return chunks, self.with_upstream_chunk(history)

    def reward(self, cond: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        return super().reward(cond[:, : self.history_dim], samples)


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
# Foundation training, action selection and evaluation
# ======================================================================================================================
def foundation_step(space: ChunkSpace, model, network: nn.Module, ema: nn.Module, optimizer, args: Args) -> dict:
    """The diffusion loss on dataset chunks; the EMA copy becomes the foundation. `model` is `network` or its
    torch.compile'd wrapper."""
    chunks, cond = space.dataset_samples(args.batch_size)
    loss = space.loss(model, chunks, cond).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(network.parameters()), 1 - args.ema_decay)
    return {"loss": loss.detach()}


def critic_batch(transitions: Transitions, batch: int) -> tuple:
    index = torch.randint(0, len(transitions), (batch,), device=transitions.observations.device)
    return (transitions.observations[index], transitions.actions[index], transitions.rewards[index],
            transitions.next_observations[index], transitions.terminals[index])


@torch.no_grad()
def select_chunks(space: ChunkSpace, model, cascade_model, value, cond: torch.Tensor) -> torch.Tensor:
    """One chunk per state (B, Tp, A) in [-1, 1] coordinates (not clipped) chosen among N candidates."""
    args, n = space.args, space.args.num_candidates
    candidates = space.sample(model, cond, n).x0
    if cascade_model is not None:  # one refining pass, conditioned on each candidate
        candidates = space.sample(cascade_model, torch.cat([cond.repeat_interleave(n, 0), candidates.flatten(1)], 1)).x0
    candidates = candidates.view(-1, n, *space.shape)
    if args.selection == "expectation":
        return candidates.mean(1)
    q = space.reward(cond.repeat_interleave(n, 0), candidates.flatten(0, 1)).view(-1, n)
    if args.selection == "idql":
        choice = q.argmax(1)
    else:
        advantage = q - value(cond[:, -space.transitions.observations.shape[1]:])[:, None]
        choice = torch.distributions.Categorical(logits=args.softmax_temperature * advantage,
                                                 validate_args=False).sample()
    return candidates[torch.arange(candidates.shape[0], device=cond.device), choice]


class RecedingHorizonPolicy:
    """evaluate()'s policy: keeps the last To observations per env and generates a chunk when the previous one's
    first Ta actions are used up. Returns unclipped actions (evaluate clips them and records the generated ones,
    which is what coherency scores)."""

    def __init__(self, space: ChunkSpace, model, cascade_model, value, data, normalizer: Normalizer, graphs: bool):
        self.space, self.data, self.normalizer = space, data, normalizer
        self.select = cuda_graphed(lambda cond: select_chunks(space, model, cascade_model, value, cond), graphs)

    def reset(self, num_envs: int) -> None:
        args, state_dim = self.space.args, self.space.transitions.observations.shape[1]
        self.history = np.zeros((num_envs, args.obs_horizon, state_dim), dtype=np.float32)
        self.started = np.zeros(num_envs, dtype=bool)
        self.plan = np.zeros((num_envs, args.action_horizon, self.space.shape[1]), dtype=np.float32)
        self.plan_position = np.full(num_envs, args.action_horizon)

    def __call__(self, obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        args = self.space.args
        normalized = self.normalizer.normalize(obs).astype(np.float32)
        fresh = ~self.started[env_ids]
        self.history[env_ids[fresh]] = normalized[fresh][:, None]  # pad the history with the first observation
        self.history[env_ids[~fresh]] = np.concatenate(
            [self.history[env_ids[~fresh], 1:], normalized[~fresh][:, None]], axis=1)
        self.started[env_ids] = True
        replan = self.plan_position[env_ids] >= args.action_horizon
        if replan.any():
            ids = env_ids[replan]
            device = self.space.transitions.observations.device
            chunks = self.select(torch.as_tensor(self.history[ids].reshape(len(ids), -1), device=device))
            self.plan[ids] = chunks[:, : args.action_horizon].cpu().numpy()
            self.plan_position[ids] = 0
        actions = self.plan[env_ids, self.plan_position[env_ids]]
        self.plan_position[env_ids] += 1
        return unscale_actions(self.data, actions)


def evaluate_policy(policy: RecedingHorizonPolicy, data, args: Args) -> dict:
    """Return statistics of `policy` over eval_episodes (and policy coherency on Nav1D)."""
    result = evaluate(policy, data.make_env, args.eval_episodes, args.seed, max_steps=args.eval_max_steps or None)
    stats = stage_stats(result.returns, normalized_score(data, result.returns), result.actions_per_s,
                        result.success)
    if data.family == "nav1d":
        states = np.concatenate([observations[:-1] for observations in result.observations])
        stats["coherency"] = nav1d.policy_coherency(nav1d.dataset_kind(data.name), states,
                                                    np.concatenate(result.actions))
    return stats


# ======================================================================================================================
# Main
# ======================================================================================================================
def main(args: Args) -> None:
    args = resumed_arguments(args, SCRIPT)  # --resume: the run's own arguments
    from_presets = apply_presets(args, PRESETS, compute_presets=COMPUTE_PRESETS)
    methods, cascade_methods = validate(args)
    loaded = {stage: check_loadable(path, SCRIPT, stage)
              for stage, path in (("foundation", args.load_foundation), ("critic", args.load_critic)) if path}
    data = load_offline_data(args.env)
    normalizer = Normalizer.from_array(data.observations)
    for stage, checkpoint in loaded.items():
        require_same_data(checkpoint, normalizer, f"--load-{stage}")
    run = start_run(args, SCRIPT)
    device, graphs = run.device, use_cuda_graphs(args, run.device)
    if from_presets:
        print("preset values: " + ", ".join(f"{key}={value}" for key, value in from_presets.items()))

    # ---- models, optimisers, data (everything a checkpoint may hold is built before resuming) ---------------------
    state_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    cond_dim = args.obs_horizon * state_dim
    diffusion = make_diffusion(args)
    foundation_net = build_denoiser(args, action_dim, cond_dim).to(device)
    foundation = copy.deepcopy(foundation_net).requires_grad_(False)  # the EMA: the foundation used afterwards
    critic, value = TwinQ(state_dim, action_dim, args.critic_hidden).to(device), ValueNet(state_dim, args.critic_hidden).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    trainer = Trainer(run, args.log_every, args.save_every)
    trainer.models = {"foundation_net": foundation_net, "foundation": foundation, "critic": critic,
                      "critic_target": critic_target, "value": value}
    optimizers = trainer.optimizers = {
        "foundation": torch.optim.Adam(foundation_net.parameters(), lr=args.foundation_lr, capturable=graphs),
        "q": torch.optim.Adam(critic.parameters(), lr=args.critic_lr, capturable=graphs),
        "v": torch.optim.Adam(value.parameters(), lr=args.critic_lr, capturable=graphs)}
    trainer.state.update(normalizer=normalizer.state_dict(), online=None)
    if args.resume:
        trainer.resume(run.load_checkpoint())
    transitions = Transitions(**model_transitions(data, normalizer, device=device))
    space = ChunkSpace(args, diffusion, transitions, critic_target, action_dim)
    monitor = DivergenceMonitor(space, seed=args.seed)  # its fixed batch from the offline data, resumed or not
    if trainer.state["online"] is not None:  # resumed after an online collection: the data as it was then
        transitions = space.transitions = Transitions(**model_transitions(data, normalizer, trainer.state["online"],
                                                                          device))
    compiled = CompiledModules(args.compile)
    print(f"data: {data.source}, {len(transitions)} transitions; denoiser {count_parameters(foundation_net):,} "
          f"parameters; device {device}")

    def critic_stage(stage: str, steps: int) -> None:
        """IQL on the current transitions (the offline data, plus online episodes after a collection)."""
        step = cuda_graphed(lambda: iql_update(critic, critic_target, value, critic_batch(transitions, args.critic_batch_size),
                                               (optimizers["v"], optimizers["q"]), args), graphs)
        trainer.run_stage(stage, steps, step, tag="critic", optimizer=optimizers["q"])
        trainer.finish(stage)

    # ==================================================================================================================
    # Stage 1: foundation Diffusion Policy (EMA of the trained network)
    # ==================================================================================================================
    if "foundation" in loaded and "foundation" not in trainer.done:
        trainer.load_stage("foundation", loaded["foundation"], args.load_foundation, ("foundation",))
        foundation_net.load_state_dict(foundation.state_dict())
    if "foundation" not in trainer.done:
        trainer.run_stage("foundation", args.foundation_steps, cuda_graphed(lambda: foundation_step(
            space, compiled(foundation_net), foundation_net, foundation, optimizers["foundation"], args), graphs),
            optimizer=optimizers["foundation"])
        trainer.finish("foundation")

    # ==================================================================================================================
    # Stage 2: IQL critic
    # ==================================================================================================================
    if "critic" in loaded and "critic" not in trainer.done:
        trainer.load_stage("critic", loaded["critic"], args.load_critic, ("critic", "critic_target", "value"))
    if "critic" not in trainer.done:
        critic_stage("critic", args.critic_steps)

    def evaluation_policy(model, cascade_model) -> RecedingHorizonPolicy:
        return RecedingHorizonPolicy(space, compiled(model), cascade_model, value, data, normalizer, graphs)

    if "foundation" not in trainer.results:
        policy_fn = evaluation_policy(foundation, None)
        trainer.record("foundation", evaluate_policy(policy_fn, data, args) | monitor(foundation))
        single = transitions.observation_history(torch.zeros(1, dtype=torch.long, device=device), args.obs_horizon)
        trainer.throughput["action_latency_ms"] = action_latency_ms(lambda: policy_fn.select(single).cpu())
        trainer.at("foundation evaluation", 0, save=True)

    # ==================================================================================================================
    # Stage 3: alignment passes (LoRA adapters shared by every method; the cascade is a model of its own)
    # ==================================================================================================================
    with seeded(args.seed + 1, device):  # the same adapters and cascade whether or not the run was resumed
        policy, reference = policy_with_reference(foundation, args.lora_rank, args.lora_alpha)
        cascade_model = CascadeDenoiser(args, foundation, action_dim, cond_dim).to(device) if "cascade" in methods else None
    trainer.adopt_module("policy", policy)
    if cascade_model is not None:
        trainer.adopt_module("cascade", cascade_model)
    print(f"alignment trains {count_parameters(policy, trainable_only=True):,} parameters")

    def retrain_critic(stage: str) -> None:
        """The critic on the offline data plus the online episodes (trainer.state["online"])."""
        nonlocal transitions
        transitions = space.transitions = Transitions(**model_transitions(data, normalizer, trainer.state["online"],
                                                                          device))
        critic_stage(stage, args.online_critic_steps)

    run_alignment(trainer, args, methods, cascade_methods,
                  {"rl": rl, "qvpg": qvpg, "dpo": dpo, "sft": sft, "cascade": cascade}, space,
                  lambda: CascadeChunkSpace(space, policy), policy, reference, cascade_model,
                  lambda cascade_model: evaluate_policy(evaluation_policy(policy, cascade_model), data, args),
                  lambda cascade_model: evaluation_policy(policy, cascade_model), data.make_env, retrain_critic,
                  monitor)
    trainer.write_summary(SCRIPT, args, data.family)
    run.close()


if __name__ == "__main__":
    cli(main, Args)
