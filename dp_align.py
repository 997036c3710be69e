"""Diffusion Policy aligned with a Q-function: RL, QV-PG, DPO, SFT and cascade alignment.

Paper: "Maximize Your Diffusion: A Study into Reward Maximization and Alignment for Diffusion-based Control"
(Huh, Mohapatra), the policy-based half (DESIGN 4).

Overview. A Diffusion Policy (the *foundation*) learns the dataset's action chunks a_{t:t+Tp} conditioned on the last
To observations, with any sampler of `common.diffusion` (ddpm, ddim, sm, fm). An IQL critic is trained on the same
data. The reward of a generated chunk for state s is Q(s, a_first). Alignment then fine-tunes one set of LoRA adapters
(or the whole network) with any sequence of methods, repeated for several passes:
`rl` treats denoising as a multi-step MDP (REINFORCE or PPO-clip over the Gaussian sampler steps), `qvpg`
back-propagates -Q through the last K denoising steps, `dpo` is Diffusion-DPO on Q-ranked pairs against a frozen
reference (the model as the DPO stage found it), `sft` fine-tunes on the best samples that the frozen foundation
still finds likely, and `cascade` trains a second,
zero-initialised conditional model that turns a sample into a better one and is applied once at inference.
Actions are chosen among N candidates by their mean (`expectation`), by an IDQL softmax over Q - V, or greedily.
The foundation, every method of every pass, and the final model are evaluated; Nav1D also reports coherency.

    python dp_align.py --env nav1d-full --align rl,dpo,sft
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common.data import Normalizer, evaluate, iql_rewards, load_offline_data, normalized_score
from common.diffusion import Diffusion, gaussian_log_prob
from common.nets import (
    DiT1d,
    MLPDenoiser,
    TwinQ,
    ValueNet,
    inject_lora,
    load_foundation_into_cascade,
    lora_disabled,
)
from common.runtime import (
    Timer,
    UserError,
    apply_presets,
    capture_rng,
    check_finite,
    cli,
    cuda_graphed,
    load_module_state,
    print_results_table,
    read_checkpoint_file,
    restore_rng,
    stage_stats,
    start_run,
    use_cuda_graphs,
)

SCRIPT = "dp_align"
ALIGN_METHODS = ("rl", "qvpg", "dpo", "sft", "cascade")
DP_SAMPLERS = ("ddpm", "ddim", "sm", "fm")


@dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """name of the experiment (part of the default run directory)"""
    seed: int = 0
    """seed of everything (training, sampling, evaluation episodes)"""
    env: str = "nav1d-full"
    """dataset: nav1d-partial|full|expert, a Minari id, or a D4RL name such as hopper-medium-v2"""
    device: str = "auto"
    """auto, cpu or cuda"""
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
    save_every: int = 5000
    """checkpoint every this many training steps (and at the end of every stage)"""
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
    eval_max_steps: int = 0
    """cap on evaluation episode length (0 = the environment's own limit)"""

    # ---- foundation Diffusion Policy
    backbone: str = "dit"
    """denoiser network: dit (DiT over the chunk) or mlp (flattened chunk)"""
    hidden: int = 256
    """width of the denoiser"""
    depth: int = 4
    """DiT blocks / MLP hidden layers"""
    heads: int = 4
    """DiT attention heads"""
    sampler: str = "ddpm"
    """ddpm | ddim | sm | fm. ddim with eta=0 and fm are deterministic: use qvpg (or ddim --eta > 0) for RL"""
    sample_steps: int = 20
    """denoising steps when sampling"""
    train_steps: int = 100
    """noise levels of the discrete schedule (ddpm, ddim); sampling strides over them"""
    eta: float = 0.0
    """DDIM noise (0 = deterministic; ddpm is ddim with eta=1)"""
    prediction: str = ""
    """network output: eps | x0 | velocity ('' = the sampler's default; fm is always velocity)"""
    clip_sample: bool = True
    """clip the predicted clean chunk to the action box at every sampling step (Diffusion Policy's clip_sample)"""
    foundation_steps: int = 200_000
    """training steps of the foundation model"""
    foundation_lr: float = 3e-4
    """Adam learning rate of the foundation model"""
    batch_size: int = 256
    """batch size of the foundation and critic"""
    ema_decay: float = 0.995
    """EMA of the foundation weights (the EMA model is the foundation used afterwards)"""
    load_foundation: str = ""
    """take the foundation from this dp_align checkpoint instead of training it"""

    # ---- IQL critic
    critic_steps: int = 500_000
    """IQL training steps"""
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
    selection: str = "expectation"
    """expectation (mean of the candidates) | idql (sample softmax(temperature (Q - V))) | greedy (argmax Q)"""
    idql_temperature: float = 1.0
    """inverse temperature of the idql selection"""

    # ---- alignment, shared by all methods
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
    """samples generated per conditioning state (advantages are normalised within the group)"""
    kl_coef: float = 0.0
    """weight of the per-step KL to the reference (rl, qvpg)"""
    entropy_coef: float = 0.0
    """weight of a nearest-neighbour entropy bonus added to each sample's reward (counters narrowing)"""
    epochs_per_batch: int = 4
    """gradient steps on each generated batch for dpo and sft (sampling costs far more than an update)"""
    max_grad_norm: float = 1.0
    """gradient clipping during alignment"""

    # ---- rl: REINFORCE / PPO over the denoising steps
    rl_steps: int = 1000
    """updates of the rl method per pass"""
    rl_lr: float = 1e-4
    """learning rate of the rl method"""
    rl_algo: str = "ppo"
    """ppo (clipped ratio, DDPO) or reinforce"""
    ppo_clip: float = 0.2
    """PPO ratio clip epsilon"""
    ppo_epochs: int = 2
    """PPO optimisation epochs per sampled batch"""
    credit: str = "uniform"
    """credit weights over denoising steps: uniform | decay | similarity"""
    credit_decay: float = 0.9
    """ratio of the geometric decay weights (larger near x_0)"""

    # ---- qvpg: value gradient through the last K denoising steps
    qvpg_steps: int = 1000
    """updates of the qvpg method per pass"""
    qvpg_lr: float = 1e-4
    """learning rate of the qvpg method"""
    qvpg_k: int = 2
    """gradients flow through only the last K denoising steps"""
    qvpg_random_k: bool = False
    """draw K uniformly from 1..qvpg_k for every batch"""

    # ---- dpo: Diffusion-DPO
    dpo_steps: int = 1000
    """updates of the dpo method per pass"""
    dpo_lr: float = 1e-4
    """learning rate of the dpo method"""
    dpo_beta: float = 100.0
    """DPO inverse temperature on the eps-error differences (tune for low-dimensional data)"""
    dpo_noise_draws: int = 4
    """(t, noise) draws per pair in every DPO step"""
    dpo_source: str = "reference"
    """sample the pairs from the DPO reference (the model at the start of the DPO stage) or the current model"""

    # ---- sft: fine-tuning on top samples under a likelihood threshold
    sft_steps: int = 1000
    """updates of the sft method per pass"""
    sft_lr: float = 1e-4
    """learning rate of the sft method"""
    sft_top_fraction: float = 0.25
    """keep this fraction of each state's samples, highest Q first"""
    sft_quantile: float = 0.9
    """accept a kept sample only if its reference ELBO proxy is below this quantile of the dataset's"""
    sft_elbo_draws: int = 8
    """fixed (t, noise) draws averaged in the ELBO proxy"""
    sft_source: str = "both"
    """where the SFT candidates come from: current model, reference, or both (half each)"""

    # ---- cascade
    cascade_steps: int = 1000
    """training steps of the cascade per pass"""
    cascade_lr: float = 1e-4
    """learning rate of the cascade"""
    cascade_branches: int = 4
    """continuations branched from each shared latent"""
    cascade_branch_fraction: float = 0.5
    """the shared latent is taken after this fraction of the denoising steps"""

    # ---- online fine-tuning between passes
    online_episodes: int = 0
    """episodes collected with the current model before every pass after the first (0 = offline only)"""
    online_critic_steps: int = 1000
    """critic steps on the data plus the new episodes after each collection"""

    log_every: int = 50
    """TensorBoard logging interval (steps)"""


# Nav1D: a small network and short stages so the default run takes minutes on a 2-core CPU.
PRESETS: dict[str, dict] = {
    "nav1d": dict(
        obs_horizon=1, pred_horizon=2, action_horizon=1, hidden=32, depth=2, heads=2, sample_steps=10, align_batch=32,
        train_steps=10, foundation_steps=3000, critic_steps=4000, critic_hidden=128, expectile=0.9, eval_episodes=100,
        save_every=1000, rl_steps=150, qvpg_steps=150, dpo_steps=150, sft_steps=150, cascade_steps=300,
        rl_lr=1e-3, qvpg_lr=1e-3, dpo_lr=1e-3, sft_lr=3e-4, cascade_lr=1e-3, online_critic_steps=500, cpu_threads=1,
    ),
    # The expert data covers a narrow band of actions, so Q is unreliable elsewhere: without the KL to the reference,
    # RL alone took the return from 7.27 to 2.28 (coherency 0.19); with kl_coef=10, 7.27 -> 7.35 (coherency 0.94).
    "nav1d-expert": dict(kl_coef=10.0),
}


def validate(args: Args) -> list[str]:
    """Every argument check, before any work; returns the alignment sequence."""
    methods = [name.strip() for name in args.align.split(",") if name.strip()]
    unknown = [name for name in methods if name not in ALIGN_METHODS]
    if unknown:
        raise UserError(f"unknown alignment method(s) {unknown}; choose from {', '.join(ALIGN_METHODS)}")
    if args.sampler not in DP_SAMPLERS:
        raise UserError(f"unknown --sampler '{args.sampler}'; choose one of {', '.join(DP_SAMPLERS)}")
    deterministic = args.sampler == "fm" or (args.sampler == "ddim" and args.eta == 0)
    if "rl" in methods and deterministic:
        raise UserError(f"--align rl needs a stochastic sampler but '{args.sampler}' (eta={args.eta}) is "
                        "deterministic; use --align qvpg, or --sampler ddim --eta 0.5 (or ddpm/sm)")
    choices = dict(backbone=("dit", "mlp"), selection=("expectation", "idql", "greedy"), rl_algo=("ppo", "reinforce"),
                   credit=("uniform", "decay", "similarity"), sft_source=("current", "reference", "both"),
                   dpo_source=("current", "reference"), prediction=("", "eps", "x0", "velocity"))
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {allowed}, got '{getattr(args, name)}'")
    positive = ("obs_horizon", "pred_horizon", "action_horizon", "sample_steps", "train_steps", "batch_size",
                "num_candidates", "passes", "align_batch", "epochs_per_batch", "dpo_noise_draws", "save_every",
                "log_every", "sft_elbo_draws", "hidden", "depth", "heads", "critic_hidden", "eval_episodes")
    for name in positive:
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    non_negative = ("foundation_steps", "critic_steps", "rl_steps", "qvpg_steps", "dpo_steps", "sft_steps",
                    "cascade_steps", "online_episodes", "online_critic_steps", "eval_every", "lora_rank", "kl_coef",
                    "entropy_coef", "eval_max_steps")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.action_horizon > args.pred_horizon:
        raise UserError(f"--action-horizon ({args.action_horizon}) cannot exceed --pred-horizon ({args.pred_horizon})")
    if args.group_size < 2:
        raise UserError(f"--group-size must be >= 2 (advantages and pairs compare samples), got {args.group_size}")
    if args.cascade_branches < 2:
        raise UserError(f"--cascade-branches must be >= 2, got {args.cascade_branches}")
    if not 1 <= args.qvpg_k <= args.sample_steps:
        raise UserError(f"--qvpg-k must be in [1, sample_steps={args.sample_steps}], got {args.qvpg_k}")
    for name in ("sft_top_fraction", "sft_quantile", "ema_decay", "gamma", "polyak"):
        if not 0 < getattr(args, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(args, name)}")
    if not 0 < args.expectile < 1:
        raise UserError(f"--expectile must be in (0, 1), got {args.expectile}")
    if not 0 <= args.cascade_branch_fraction < 1:
        raise UserError(f"--cascade-branch-fraction must be in [0, 1), got {args.cascade_branch_fraction}")
    for name in ("dpo_beta", "ppo_clip", "credit_decay", "idql_temperature", "max_grad_norm", "foundation_lr",
                 "critic_lr", "rl_lr", "qvpg_lr", "dpo_lr", "sft_lr", "cascade_lr", "lora_alpha"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.sampler in ("ddpm", "ddim") and args.train_steps < args.sample_steps:
        raise UserError(f"--train-steps ({args.train_steps}) must be >= --sample-steps ({args.sample_steps})")
    if args.eta != 0 and args.sampler != "ddim":
        raise UserError("--eta applies only to --sampler ddim")
    if args.sampler == "fm" and args.prediction not in ("", "velocity"):
        raise UserError("--sampler fm predicts velocity; drop --prediction")
    return methods


# ======================================================================================================================
# Networks and data in model coordinates
# ======================================================================================================================
def build_denoiser(args: Args, action_dim: int, cond_dim: int, extra_in_dim: int = 0) -> nn.Module:
    """The Diffusion Policy network over an action chunk (Tp, A), conditioned on the flattened observation history."""
    if args.backbone == "dit":
        return DiT1d(action_dim, args.pred_horizon, cond_dim, hidden=args.hidden, depth=args.depth, heads=args.heads,
                     extra_in_dim=extra_in_dim)
    return MLPDenoiser(action_dim, args.pred_horizon, cond_dim, hidden=args.hidden, layers=args.depth,
                       extra_in_dim=extra_in_dim)


class Reference(nn.Module):
    """The frozen reference denoiser: the policy with its LoRA adapters off, or a frozen full copy (lora_rank 0)."""

    def __init__(self, policy: nn.Module, frozen_copy: nn.Module | None):
        super().__init__()
        self.frozen_copy = frozen_copy
        self._policy = [policy]  # a plain list: the reference must not own (or save) the policy's weights

    def forward(self, x, t, cond):
        if self.frozen_copy is not None:
            return self.frozen_copy(x, t, cond)
        with lora_disabled(self._policy[0]):
            return self._policy[0](x, t, cond)


class CascadeDenoiser(nn.Module):
    """The cascade as `model(x, t, cond)` for the sampler: cond = [observation history, flattened conditioning chunk],
    so `samples_per_cond` repeats both together."""

    def __init__(self, net: nn.Module, obs_cond_dim: int):
        super().__init__()
        self.net = net
        self.obs_cond_dim = obs_cond_dim

    def forward(self, x, t, cond):
        return self.net(x, t, cond[:, : self.obs_cond_dim], cond[:, self.obs_cond_dim:].reshape(x.shape))


def make_policy(foundation: nn.Module, lora_rank: int, lora_alpha: float) -> tuple[nn.Module, Reference]:
    """Policy = foundation + LoRA adapters (or a trainable full copy when rank is 0); the reference is the frozen
    foundation (the policy with adapters off, or the foundation itself)."""
    policy = copy.deepcopy(foundation)
    if lora_rank > 0:
        inject_lora(policy, lora_rank, lora_alpha)
        return policy, Reference(policy, None)
    return policy.requires_grad_(True), Reference(policy, foundation)


def make_cascade(args: Args, foundation: nn.Module, action_dim: int, cond_dim: int) -> CascadeDenoiser:
    """Cascade warm-started from the foundation; its conditioning-sample input starts at zero weight, so it equals
    the foundation until trained."""
    device = next(foundation.parameters()).device
    net = build_denoiser(args, action_dim, cond_dim, extra_in_dim=action_dim).to(device)
    load_foundation_into_cascade(net, foundation.state_dict())
    return CascadeDenoiser(net, cond_dim)


class IQLCritic(nn.Module):
    """Twin Q with a Polyak target and V (IQL); the reward of a sample is min of the target heads."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.q = TwinQ(state_dim, action_dim, hidden)
        self.q_target = copy.deepcopy(self.q).requires_grad_(False)
        self.v = ValueNet(state_dim, hidden)

    def q_value(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return torch.minimum(*self.q_target(obs, action))


@dataclass
class Transitions:
    """Dataset transitions in model coordinates (normalised observations, actions scaled to [-1, 1], IQL rewards)
    plus each transition's episode bounds, used to cut observation histories and action chunks with edge padding."""

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
        """(B, To * S): observations index-To+1 .. index, repeating the episode's first one before its start."""
        offsets = torch.arange(length - 1, -1, -1, device=index.device)
        rows = torch.maximum(index[:, None] - offsets, self.episode_first[index][:, None])
        return self.observations[rows].flatten(1)

    def action_chunk(self, index: torch.Tensor, length: int) -> torch.Tensor:
        """(B, Tp, A): actions index .. index+Tp-1, repeating the episode's last one past its end."""
        offsets = torch.arange(length, device=index.device)
        return self.actions[torch.minimum(index[:, None] + offsets, self.episode_last[index][:, None])]


def build_transitions(data, obs_normalizer: Normalizer, device: torch.device) -> Transitions:
    ends = data.episode_ends.astype(bool).copy()
    ends[-1] = True
    last_index = np.flatnonzero(ends)
    first_index = np.concatenate([[0], last_index[:-1] + 1])
    lengths = last_index - first_index + 1

    def tensor(array):
        return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)

    return Transitions(
        observations=tensor(obs_normalizer.normalize(data.observations)),
        actions=tensor(scale_actions(data, data.actions)),
        rewards=tensor(iql_rewards(data)),
        next_observations=tensor(obs_normalizer.normalize(data.next_observations)),
        terminals=tensor(data.terminals),
        episode_first=torch.as_tensor(np.repeat(first_index, lengths), device=device),
        episode_last=torch.as_tensor(np.repeat(last_index, lengths), device=device),
    )


def scale_actions(data, actions: np.ndarray) -> np.ndarray:
    """Environment actions -> [-1, 1] (the box the diffusion model works in)."""
    return 2 * (actions - data.action_low) / (data.action_high - data.action_low) - 1


def unscale_actions(data, actions: np.ndarray) -> np.ndarray:
    return data.action_low + (np.asarray(actions) + 1) * (data.action_high - data.action_low) / 2


# ======================================================================================================================
# Workspace: everything a stage reads or trains, and the checkpoint built from it
# ======================================================================================================================
class Workspace:
    def __init__(self, args: Args, data, run):
        self.args, self.data, self.run = args, data, run
        self.device = run.device
        self.obs_normalizer = Normalizer.from_array(data.observations)
        self.transitions = build_transitions(data, self.obs_normalizer, self.device)
        self.online_data: dict[str, np.ndarray] | None = None  # episodes collected online, kept in the checkpoint
        self.state_dim = data.observations.shape[1]
        self.action_dim = data.actions.shape[1]
        self.chunk_shape = (args.pred_horizon, self.action_dim)
        self.graphs = use_cuda_graphs(args, self.device)  # graph-replayed Adam steps need capturable=True
        self.cond_dim = args.obs_horizon * self.state_dim
        self.diffusion = Diffusion(args.sampler, args.sample_steps, train_steps=args.train_steps, eta=args.eta,
                                   prediction=args.prediction or None, clip_x0=1.0 if args.clip_sample else None)
        self.foundation_net = build_denoiser(args, self.action_dim, self.cond_dim).to(self.device)
        self.foundation = copy.deepcopy(self.foundation_net).requires_grad_(False)  # the EMA: the foundation used
        self.foundation_optimizer = torch.optim.Adam(self.foundation_net.parameters(), lr=args.foundation_lr,
                                                     capturable=self.graphs)
        self.critic = IQLCritic(self.state_dim, self.action_dim, args.critic_hidden).to(self.device)
        self.q_optimizer = torch.optim.Adam(self.critic.q.parameters(), lr=args.critic_lr, capturable=self.graphs)
        self.v_optimizer = torch.optim.Adam(self.critic.v.parameters(), lr=args.critic_lr, capturable=self.graphs)
        self.policy: nn.Module | None = None
        self.reference: Reference | None = None
        self.dpo_reference: nn.Module | None = None  # frozen copy of the policy at the start of the DPO stage
        self.align_optimizer: torch.optim.Optimizer | None = None
        self.pending_align_optimizer: dict | None = None  # optimiser state of the alignment stage being resumed
        self.cascade: CascadeDenoiser | None = None
        self.cascade_optimizer: torch.optim.Optimizer | None = None
        self.compiled: dict[int, nn.Module] = {}
        self.sft_threshold: tuple | None = None  # (threshold, draws_t, draws_noise), made once per run
        self.finished: list[str] = []  # training stages done
        self.results: dict[str, dict] = {}  # evaluated stages, in order
        self.throughput: dict[str, float] = {}
        self.stage, self.step = "foundation", 0  # the stage in progress and its next step (for --resume)

    # ----- models made lazily ---------------------------------------------------------------------------------
    def make_policy(self) -> None:
        self.policy, self.reference = make_policy(self.foundation, self.args.lora_rank, self.args.lora_alpha)

    @property
    def current_model(self) -> nn.Module:
        """The model being aligned: the policy once an alignment method has made it, else the foundation."""
        return self.policy if self.policy is not None else self.foundation

    def trainable_policy_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def make_cascade(self) -> None:
        self.cascade = make_cascade(self.args, self.foundation, self.action_dim, self.cond_dim)
        self.cascade_optimizer = torch.optim.Adam(self.cascade.parameters(), lr=self.args.cascade_lr)

    def denoiser(self, module: nn.Module) -> nn.Module:
        """`module`, or its torch.compile'd version (made once per module) with --compile."""
        if not self.args.compile:
            return module
        if id(module) not in self.compiled:
            self.compiled[id(module)] = torch.compile(module)
        return self.compiled[id(module)]

    # ----- checkpoints ------------------------------------------------------------------------------------------
    def save(self, stage: str, step: int) -> Path:
        models = {"foundation_net": self.foundation_net.state_dict(), "foundation": self.foundation.state_dict(),
                  "critic": self.critic.state_dict()}
        optimizers = {"foundation": self.foundation_optimizer.state_dict(), "q": self.q_optimizer.state_dict(),
                      "v": self.v_optimizer.state_dict()}
        if self.policy is not None:
            models["policy"] = self.policy.state_dict()
        if self.dpo_reference is not None:
            models["dpo_reference"] = self.dpo_reference.state_dict()
        if self.align_optimizer is not None:
            optimizers["align"] = self.align_optimizer.state_dict()
        if self.cascade is not None:
            models["cascade"] = self.cascade.net.state_dict()
            optimizers["cascade"] = self.cascade_optimizer.state_dict()
        return self.run.save_checkpoint({
            "stage": stage, "step": step, "completed": {"finished": self.finished, "results": self.results},
            "models": models, "optimizers": optimizers, "rng": capture_rng(), "throughput": self.throughput,
            "online_data": self.online_data,
        })

    def restore(self, checkpoint: dict) -> None:
        models, optimizers = checkpoint["models"], checkpoint["optimizers"]
        load_module_state(self.foundation_net, models["foundation_net"], "the foundation network")
        load_module_state(self.foundation, models["foundation"], "the foundation EMA")
        load_module_state(self.critic, models["critic"], "the critic")
        self.foundation_optimizer.load_state_dict(optimizers["foundation"])
        self.q_optimizer.load_state_dict(optimizers["q"])
        self.v_optimizer.load_state_dict(optimizers["v"])
        if "policy" in models:
            self.make_policy()
            load_module_state(self.policy, models["policy"], "the aligned policy")
        if "dpo_reference" in models:
            self.dpo_reference = copy.deepcopy(self.policy)
            load_module_state(self.dpo_reference, models["dpo_reference"], "the DPO reference")
        if "cascade" in models:
            self.make_cascade()
            load_module_state(self.cascade.net, models["cascade"], "the cascade")
            self.cascade_optimizer.load_state_dict(optimizers["cascade"])
        self.pending_align_optimizer = optimizers.get("align")
        self.finished = list(checkpoint["completed"]["finished"])
        self.results = dict(checkpoint["completed"]["results"])
        self.throughput = dict(checkpoint["throughput"])
        if checkpoint["online_data"] is not None:
            self.add_online_data(checkpoint["online_data"])
        self.stage, self.step = checkpoint["stage"], checkpoint["step"]
        restore_rng(checkpoint["rng"])

    def add_online_data(self, episodes: dict[str, np.ndarray]) -> None:
        """Append collected transitions (raw env units) to the data; IQL rewards are recomputed on the union."""
        if self.online_data is None:
            self.online_data = episodes
        else:
            self.online_data = {key: np.concatenate([self.online_data[key], episodes[key]]) for key in episodes}
        union = dataclasses.replace(self.data, **{
            key: np.concatenate([getattr(self.data, key), self.online_data[key]]) for key in self.online_data})
        self.transitions = build_transitions(union, self.obs_normalizer, self.device)

    def start_step(self, stage: str) -> int:
        return self.step if stage == self.stage else 0


# ======================================================================================================================
# Shared pieces of the alignment methods
# ======================================================================================================================
def sample_states(ws: Workspace, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random dataset states: (observation-history condition (B, To*S), current normalised observation (B, S))."""
    index = torch.randint(0, len(ws.transitions), (batch,), device=ws.device)
    return ws.transitions.observation_history(index, ws.args.obs_horizon), ws.transitions.observations[index]


def nearest_neighbour_log_distance(chunks: torch.Tensor, group: int) -> torch.Tensor:
    """log distance of each sample to its closest sibling (same state): the per-sample term of the
    Kozachenko-Leonenko entropy estimate, used as an entropy bonus."""
    flat = chunks.flatten(1).view(-1, group, chunks[0].numel())
    distances = torch.cdist(flat, flat) + torch.eye(group, device=chunks.device) * 1e9
    return torch.log(distances.min(-1).values + 1e-6).flatten()


def sample_rewards(ws: Workspace, obs: torch.Tensor, chunks: torch.Tensor, group: int) -> torch.Tensor:
    """r = Q(s, a_first) of each generated chunk plus the entropy bonus; obs already repeated per sample.
    Differentiable in `chunks` (QV-PG)."""
    rewards = ws.critic.q_value(obs, chunks[:, 0].clamp(-1, 1))
    if ws.args.entropy_coef > 0:
        rewards = rewards + ws.args.entropy_coef * nearest_neighbour_log_distance(chunks, group)
    return rewards


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """Advantages per conditioning state (DESIGN 4.2): standardised within each state's group, clipped to +-5."""
    grouped = rewards.view(-1, group)
    advantages = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-8)
    return advantages.clamp(-5, 5).flatten()


def credit_weights(chain: torch.Tensor, stochastic: torch.Tensor, scheme: str, decay: float) -> torch.Tensor:
    """(S, B) weights of the denoising steps, zero on deterministic steps and mean 1 over the stochastic ones."""
    steps = chain.shape[0] - 1
    if scheme == "uniform":
        weights = torch.ones(steps, chain.shape[1], device=chain.device)
    elif scheme == "decay":  # geometric, largest at the last step (closest to x_0)
        exponents = torch.arange(steps - 1, -1, -1, device=chain.device, dtype=torch.float32)
        weights = (decay ** exponents)[:, None].expand(steps, chain.shape[1])
    else:  # similarity of each step's move with the direction to the final sample
        moves = (chain[1:] - chain[:-1]).flatten(2)
        to_final = (chain[-1:] - chain[:-1]).flatten(2)
        weights = F.cosine_similarity(moves, to_final, dim=-1).clamp(min=0)
    weights = weights * stochastic[:, None]
    mean = weights.sum(0, keepdim=True) / stochastic.sum().clamp(min=1)
    return torch.where(mean > 0, weights / mean.clamp(min=1e-8), stochastic[:, None].float())


def step_kl(ws: Workspace, mean: torch.Tensor, x: torch.Tensor, step: int, cond: torch.Tensor) -> torch.Tensor:
    """KL of the policy's step to the reference's, ||mu - mu_ref||^2 / (2 s^2) for equal variances (B,);
    deterministic steps (s = 0) use s = 1, i.e. half the squared distance of the step means."""
    with torch.no_grad():
        reference_mean, std = ws.diffusion.step_distribution(ws.reference, x, step, cond)
    return ((mean - reference_mean) ** 2).flatten(1).sum(1) / (2 * (std**2 if std > 0 else 1.0))


def denoising_log_prob(diffusion: Diffusion, model, chain: torch.Tensor, step: int, cond) -> tuple:
    """log pi(x_{k+1} | x_k, c) of stored chain step `step` under `model`, and the step's mean."""
    mean, std = diffusion.step_distribution(model, chain[step], step, cond)
    return gaussian_log_prob(chain[step + 1], mean, std), mean


def optimizer_step(ws: Workspace, optimizer: torch.optim.Optimizer, parameters) -> None:
    torch.nn.utils.clip_grad_norm_(parameters, ws.args.max_grad_norm)
    optimizer.step()


# ======================================================================================================================
# Alignment method 1: RL over the denoising chain (REINFORCE / PPO-clip, DDPO-style)
# ======================================================================================================================
def ppo_step_loss(log_prob, old_log_prob, advantages, weights, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped surrogate of one denoising step, mean over samples; returns (loss, ratio)."""
    ratio = torch.exp(log_prob - old_log_prob)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return (weights * surrogate).mean(), ratio


def rl_update(ws: Workspace) -> dict[str, torch.Tensor]:
    args, group = ws.args, ws.args.group_size
    cond, obs = sample_states(ws, args.align_batch)
    with torch.no_grad():
        rollout = ws.diffusion.sample(ws.policy, ws.chunk_shape, cond, samples_per_cond=group, return_chain=True)
        rewards = sample_rewards(ws, obs.repeat_interleave(group, 0), rollout.x0, group)
        advantages = group_advantages(rewards, group)
        weights = credit_weights(rollout.chain, rollout.stochastic, args.credit, args.credit_decay)
    steps = rollout.stochastic.nonzero().flatten().tolist()
    parameters = ws.trainable_policy_parameters()
    metrics = {}
    for _ in range(args.ppo_epochs if args.rl_algo == "ppo" else 1):
        ws.align_optimizer.zero_grad(set_to_none=True)
        total, kl_total, ratio_deviation = 0.0, 0.0, 0.0
        for step in steps:  # one backward per step keeps only one step's graph in memory
            log_prob, mean = denoising_log_prob(ws.diffusion, ws.policy, rollout.chain, step, rollout.cond)
            if args.rl_algo == "reinforce":  # - sum_t w_t log p_t A
                loss = -(weights[step] * log_prob * advantages).mean()
            else:  # mean over steps of the clipped surrogate
                loss, ratio = ppo_step_loss(log_prob, rollout.log_probs[step], advantages, weights[step],
                                            args.ppo_clip)
                loss = loss / len(steps)
                ratio_deviation += (ratio - 1).abs().mean().detach() / len(steps)
            if args.kl_coef > 0:
                kl = step_kl(ws, mean, rollout.chain[step], step, rollout.cond).mean() / len(steps)
                loss = loss + args.kl_coef * kl
                kl_total += kl.detach()
            loss.backward()
            total += loss.detach()
        optimizer_step(ws, ws.align_optimizer, parameters)
        metrics = {"loss": total, "kl": torch.as_tensor(kl_total), "ratio_deviation": torch.as_tensor(ratio_deviation)}
    metrics["reward"] = rewards.mean()
    return metrics


# ======================================================================================================================
# Alignment method 2: QV-PG, -Q back-propagated through the last K denoising steps
# ======================================================================================================================
def qvpg_loss(ws: Workspace, cond: torch.Tensor, obs: torch.Tensor, k: int) -> tuple[torch.Tensor, dict]:
    """-r(s, x_0) (sample_rewards) normalised by its mean magnitude, gradients through the last k steps only (+ KL)."""
    args, group = ws.args, ws.args.group_size
    out = ws.diffusion.sample(ws.policy, ws.chunk_shape, cond, samples_per_cond=group, grad_last_k=k,
                              return_chain=args.kl_coef > 0)
    rewards = sample_rewards(ws, obs.repeat_interleave(group, 0), out.x0, group)
    loss = -(rewards / rewards.detach().abs().mean().clamp(min=1e-6)).mean()
    kl_total = torch.zeros((), device=rewards.device)
    if args.kl_coef > 0:
        for step in range(args.sample_steps - k, args.sample_steps):
            x = out.chain[step].detach()
            mean, _ = ws.diffusion.step_distribution(ws.policy, x, step, out.cond)
            kl_total = kl_total + step_kl(ws, mean, x, step, out.cond).mean() / k
        loss = loss + args.kl_coef * kl_total
    return loss, {"reward": rewards.detach().mean(), "kl": kl_total.detach()}


def qvpg_update(ws: Workspace) -> dict[str, torch.Tensor]:
    args = ws.args
    k = int(torch.randint(1, args.qvpg_k + 1, ()).item()) if args.qvpg_random_k else args.qvpg_k
    cond, obs = sample_states(ws, args.align_batch)
    ws.align_optimizer.zero_grad(set_to_none=True)
    loss, metrics = qvpg_loss(ws, cond, obs, k)
    loss.backward()
    optimizer_step(ws, ws.align_optimizer, ws.trainable_policy_parameters())
    return {"loss": loss.detach(), **metrics}


# ======================================================================================================================
# Alignment method 3: Diffusion-DPO on Q-ranked pairs against the frozen reference
# ======================================================================================================================
def dpo_loss(diffusion: Diffusion, policy, reference, winners, losers, cond, beta: float, t=None, noise=None):
    """-log sigmoid(-beta (d_theta - d_ref)), d = eps-error(winner) - eps-error(loser) with the same t and noise
    for both members of a pair; returns (loss, implicit accuracy)."""
    pairs = winners.shape[0]
    t = diffusion.sample_train_time(pairs, winners.device) if t is None else t
    noise = torch.randn_like(winners) if noise is None else noise
    both, both_cond = torch.cat([winners, losers]), torch.cat([cond, cond])
    both_t, both_noise = torch.cat([t, t]), torch.cat([noise, noise])
    errors = diffusion.eps_error(policy, both, both_cond, both_t, both_noise)
    with torch.no_grad():
        reference_errors = diffusion.eps_error(reference, both, both_cond, both_t, both_noise)
    d_theta = errors[:pairs] - errors[pairs:]
    d_reference = reference_errors[:pairs] - reference_errors[pairs:]
    logits = -beta * (d_theta - d_reference)
    return -F.logsigmoid(logits).mean(), (logits > 0).float().mean()


def dpo_update(ws: Workspace) -> dict[str, torch.Tensor]:
    """Pairs per state: the i-th best sample wins against the i-th worst (group_size // 2 pairs).

    The reference is the model as it was when this DPO stage began: the frozen foundation when DPO comes first
    (Diffusion-DPO as published); after other methods, their result (iterative DPO), because DPO against the distant
    foundation pulls an aligned model back to it (measured: RL's 3.9 fell to 1.9 on Nav1D)."""
    args, group = ws.args, ws.args.group_size
    cond, obs = sample_states(ws, args.align_batch)
    with torch.no_grad():
        source = ws.dpo_reference if args.dpo_source == "reference" else ws.policy
        chunks = ws.diffusion.sample(source, ws.chunk_shape, cond, samples_per_cond=group).x0
        rewards = sample_rewards(ws, obs.repeat_interleave(group, 0), chunks, group).view(-1, group)
        order = rewards.argsort(dim=1, descending=True)
        half = group // 2
        grouped = chunks.view(-1, group, *ws.chunk_shape)
        rows = torch.arange(grouped.shape[0], device=ws.device)[:, None]
        winners = grouped[rows, order[:, :half]].flatten(0, 1)
        losers = grouped[rows, order.flip(1)[:, :half]].flatten(0, 1)
    # every pair is scored under dpo_noise_draws (t, noise) draws: the DPO gradient of one draw is very noisy
    winners, losers = winners.repeat(args.dpo_noise_draws, 1, 1), losers.repeat(args.dpo_noise_draws, 1, 1)
    pair_cond = cond.repeat_interleave(half, 0).repeat(args.dpo_noise_draws, 1)
    for _ in range(args.epochs_per_batch):  # fresh (t, noise) every epoch
        ws.align_optimizer.zero_grad(set_to_none=True)
        loss, accuracy = dpo_loss(ws.diffusion, ws.policy, ws.dpo_reference, winners, losers, pair_cond,
                                  args.dpo_beta)
        loss.backward()
        optimizer_step(ws, ws.align_optimizer, ws.trainable_policy_parameters())
    return {"loss": loss.detach(), "implicit_accuracy": accuracy, "reward": rewards.mean()}


# ======================================================================================================================
# Alignment method 4: SFT on top samples accepted under a reference-likelihood threshold
# ======================================================================================================================
def elbo_proxy(diffusion: Diffusion, model, chunks, cond, draws_t, draws_noise) -> torch.Tensor:
    """Reference denoising loss averaged over fixed (t, noise) draws (B,): low means likely under `model`."""
    draws, batch = draws_t.shape[0], chunks.shape[0]
    errors = diffusion.eps_error(model, chunks.repeat(draws, 1, 1), cond.repeat(draws, 1),
                                 draws_t.repeat_interleave(batch), draws_noise.repeat_interleave(batch, 0))
    return errors.view(draws, batch).mean(0)


def sft_likelihood_threshold(ws: Workspace, dataset_samples: int = 1024) -> tuple:
    """Fixed (t, noise) draws and the sft_quantile of the ELBO proxy on dataset chunks, from a dedicated seed."""
    with torch.random.fork_rng(devices=[ws.device] if ws.device.type == "cuda" else []):
        torch.manual_seed(ws.args.seed + 1)
        draws_t = ws.diffusion.sample_train_time(ws.args.sft_elbo_draws, ws.device)
        draws_noise = torch.randn(ws.args.sft_elbo_draws, *ws.chunk_shape, device=ws.device)
        index = torch.randint(0, len(ws.transitions), (dataset_samples,), device=ws.device)
    with torch.no_grad():
        scores = elbo_proxy(ws.diffusion, ws.reference, ws.transitions.action_chunk(index, ws.args.pred_horizon),
                            ws.transitions.observation_history(index, ws.args.obs_horizon), draws_t, draws_noise)
    return torch.quantile(scores, ws.args.sft_quantile), draws_t, draws_noise


def sft_candidates(ws: Workspace, cond: torch.Tensor, group: int) -> torch.Tensor:
    """`group` chunks per state (B * group, ...), grouped by state, from the sft_source model(s). With "both", half
    come from the reference: they keep the target anchored and broad (SFT on its own samples alone narrows to one
    state-independent point), while the current half lets SFT keep what earlier methods gained."""
    sources = {"current": [(ws.policy, group)], "reference": [(ws.reference, group)],
               "both": [(ws.policy, group // 2), (ws.reference, group - group // 2)]}[ws.args.sft_source]
    parts = [ws.diffusion.sample(model, ws.chunk_shape, cond, samples_per_cond=count).x0.view(-1, count,
                                                                                              *ws.chunk_shape)
             for model, count in sources]
    return torch.cat(parts, 1).flatten(0, 1)


def sft_update(ws: Workspace) -> dict[str, torch.Tensor]:
    args, group = ws.args, ws.args.group_size
    if ws.sft_threshold is None:
        ws.sft_threshold = sft_likelihood_threshold(ws)
    threshold, draws_t, draws_noise = ws.sft_threshold
    cond, obs = sample_states(ws, args.align_batch)
    keep = max(1, math.ceil(args.sft_top_fraction * group))
    with torch.no_grad():
        chunks = sft_candidates(ws, cond, group)
        rewards = sample_rewards(ws, obs.repeat_interleave(group, 0), chunks, group).view(-1, group)
        top = rewards.topk(keep, dim=1).indices
        rows = torch.arange(top.shape[0], device=ws.device)[:, None]
        best = chunks.view(-1, group, *ws.chunk_shape)[rows, top].flatten(0, 1)
        best_cond = cond.repeat_interleave(keep, 0)
        accepted = elbo_proxy(ws.diffusion, ws.reference, best, best_cond, draws_t, draws_noise) <= threshold
    loss = torch.zeros((), device=ws.device)
    for _ in range(args.epochs_per_batch if accepted.any() else 0):
        ws.align_optimizer.zero_grad(set_to_none=True)
        loss = ws.diffusion.loss(ws.policy, best[accepted], best_cond[accepted]).mean()
        loss.backward()
        optimizer_step(ws, ws.align_optimizer, ws.trainable_policy_parameters())
    return {"loss": loss.detach(), "acceptance": accepted.float().mean(), "reward": rewards.mean()}


# ======================================================================================================================
# Alignment method 5: cascade, a conditional model turning a sample into a better one
# ======================================================================================================================
def cascade_pairs(ws: Workspace, cond: torch.Tensor, obs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Consistent pairs: branch `cascade_branches` continuations from one shared latent per state (stochastic
    samplers: the chain's latent; deterministic ones: the shared sample re-noised to that step's level with fresh
    noise per branch), rank by Q; every other branch becomes a condition for the best one."""
    args, branches = ws.args, ws.args.cascade_branches
    branch_step = int(args.cascade_branch_fraction * args.sample_steps)
    trunk = ws.diffusion.sample(ws.current_model, ws.chunk_shape, cond, return_chain=True)
    if ws.diffusion.stochastic:
        start = trunk.chain[branch_step].repeat_interleave(branches, 0)
    else:
        shared = trunk.x0.repeat_interleave(branches, 0)
        t = torch.full((shared.shape[0],), ws.diffusion.step_time[branch_step], device=ws.device)
        start = ws.diffusion.add_noise(shared, t, torch.randn_like(shared))
    chunks = ws.diffusion.sample(ws.current_model, ws.chunk_shape, cond, samples_per_cond=branches, x_start=start,
                                 start_step=branch_step).x0
    rewards = sample_rewards(ws, obs.repeat_interleave(branches, 0), chunks, branches).view(-1, branches)
    order = rewards.argsort(dim=1, descending=True)
    grouped = chunks.view(-1, branches, *ws.chunk_shape)
    rows = torch.arange(grouped.shape[0], device=ws.device)[:, None]
    targets = grouped[rows, order[:, :1]].expand(-1, branches - 1, *ws.chunk_shape).flatten(0, 1)
    conditions = grouped[rows, order[:, 1:]].flatten(0, 1)
    gain = (rewards.max(1).values - rewards.mean(1)).mean()
    return targets, conditions, cond.repeat_interleave(branches - 1, 0), gain


def cascade_update(ws: Workspace) -> dict[str, torch.Tensor]:
    cond, obs = sample_states(ws, ws.args.align_batch)
    with torch.no_grad():
        targets, conditions, pair_cond, gain = cascade_pairs(ws, cond, obs)
    ws.cascade_optimizer.zero_grad(set_to_none=True)
    loss = ws.diffusion.loss(ws.cascade, targets, torch.cat([pair_cond, conditions.flatten(1)], 1)).mean()
    loss.backward()
    optimizer_step(ws, ws.cascade_optimizer, list(ws.cascade.parameters()))
    return {"loss": loss.detach(), "pair_gain": gain}


ALIGN_UPDATES = {"rl": rl_update, "qvpg": qvpg_update, "dpo": dpo_update, "sft": sft_update,
                 "cascade": cascade_update}


# ======================================================================================================================
# Action selection and evaluation
# ======================================================================================================================
@torch.no_grad()
def select_chunks(ws: Workspace, model, cond: torch.Tensor, obs: torch.Tensor, use_cascade: bool) -> torch.Tensor:
    """One chunk per state (B, Tp, A) in [-1, 1] coordinates (not clipped) chosen among N candidates."""
    args, n = ws.args, ws.args.num_candidates
    out = ws.diffusion.sample(model, ws.chunk_shape, cond, samples_per_cond=n)
    candidates = out.x0
    if use_cascade:
        cascade_cond = torch.cat([out.cond, candidates.flatten(1)], 1)
        candidates = ws.diffusion.sample(ws.denoiser(ws.cascade), ws.chunk_shape, cascade_cond).x0
    candidates = candidates.view(-1, n, *ws.chunk_shape)
    if args.selection == "expectation":
        return candidates.mean(1)
    q = ws.critic.q_value(obs.repeat_interleave(n, 0), candidates.flatten(0, 1)[:, 0].clamp(-1, 1)).view(-1, n)
    if args.selection == "greedy":
        choice = q.argmax(1)
    else:
        advantage = q - ws.critic.v(obs)[:, None]
        choice = torch.distributions.Categorical(logits=args.idql_temperature * advantage, validate_args=False).sample()
    return candidates[torch.arange(candidates.shape[0], device=ws.device), choice]


class RecedingHorizonPolicy:
    """Adapter for common.data.evaluate: keeps the last To observations per env and generates a chunk when the
    previous one's first Ta actions are used up. Returns unclipped actions (evaluate clips them and records the
    generated ones, which is what coherency scores)."""

    def __init__(self, ws: Workspace, model, use_cascade: bool):
        self.ws = ws
        self.select = cuda_graphed(lambda cond, obs: select_chunks(ws, model, cond, obs, use_cascade), ws.graphs)

    def reset(self, num_envs: int) -> None:
        args = self.ws.args
        self.history = np.zeros((num_envs, args.obs_horizon, self.ws.state_dim), dtype=np.float32)
        self.started = np.zeros(num_envs, dtype=bool)
        self.plan = np.zeros((num_envs, args.action_horizon, self.ws.action_dim), dtype=np.float32)
        self.plan_position = np.full(num_envs, args.action_horizon)

    def __call__(self, obs: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        ws = self.ws
        normalized = ws.obs_normalizer.normalize(obs).astype(np.float32)
        fresh = ~self.started[env_ids]
        self.history[env_ids[fresh]] = normalized[fresh][:, None]  # pad the history with the first observation
        self.history[env_ids[~fresh]] = np.concatenate(
            [self.history[env_ids[~fresh], 1:], normalized[~fresh][:, None]], axis=1)
        self.started[env_ids] = True
        replan = self.plan_position[env_ids] >= ws.args.action_horizon
        if replan.any():
            ids = env_ids[replan]
            cond = torch.as_tensor(self.history[ids].reshape(len(ids), -1), device=ws.device)
            chunks = self.select(cond, torch.as_tensor(normalized[replan], device=ws.device))
            self.plan[ids] = chunks[:, : ws.args.action_horizon].cpu().numpy()
            self.plan_position[ids] = 0
        actions = self.plan[env_ids, self.plan_position[env_ids]]
        self.plan_position[env_ids] += 1
        return unscale_actions(ws.data, actions)


def evaluate_stage(ws: Workspace, model, use_cascade: bool) -> dict:
    args = ws.args
    result = evaluate(RecedingHorizonPolicy(ws, ws.denoiser(model), use_cascade), ws.data.make_env,
                      args.eval_episodes, args.seed, max_steps=args.eval_max_steps or None)
    stats = stage_stats(result.returns, normalized_score(ws.data, result.returns))
    if ws.data.family == "nav1d":
        import nav1d

        states = np.concatenate([observations[:-1] for observations in result.observations])
        kind = re.search(r"nav1d/(\w+)-v0", ws.data.source).group(1)
        stats["coherency"] = nav1d.policy_coherency(kind, states, np.concatenate(result.actions))
    return stats


def record_result(ws: Workspace, name: str, stats: dict) -> None:
    ws.results[name] = stats
    index = len(ws.results) - 1
    for key in ("return_mean", "return_std", "normalized_mean", "coherency"):
        if key in stats:
            ws.run.writer.add_scalar(f"eval/{key}", stats[key], index)
    print(f"[{name}] return {stats['return_mean']:.3f} +- {stats['return_std']:.3f}"
          + (f", coherency {stats['coherency']:.3f}" if "coherency" in stats else ""))


class TransitionRecorder(gym.Wrapper):
    """Records every transition of the wrapped env (online fine-tuning data); one list per episode."""

    def __init__(self, env: gym.Env, episodes: list):
        super().__init__(env)
        self.episodes = episodes

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.last_obs, self.current = obs, []
        self.episodes.append(self.current)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.current.append((self.last_obs, action, reward, obs, terminated))
        self.last_obs = obs
        return obs, reward, terminated, truncated, info


def collect_online_episodes(ws: Workspace, alignment_pass: int) -> dict[str, np.ndarray]:
    """Roll out the current model (with the cascade when there is one) on fresh start states; returns its
    transitions in the dataset's raw layout."""
    episodes: list[list] = []
    evaluate(RecedingHorizonPolicy(ws, ws.denoiser(ws.current_model), ws.cascade is not None),
             lambda: TransitionRecorder(ws.data.make_env(), episodes), ws.args.online_episodes,
             ws.args.seed + 1000 * alignment_pass, max_steps=ws.args.eval_max_steps or None)
    steps = [step for episode in episodes for step in episode]
    ends = np.concatenate([np.arange(len(episode)) == len(episode) - 1 for episode in episodes if episode])
    return {
        "observations": np.array([s[0] for s in steps], dtype=np.float32),
        "actions": np.array([s[1] for s in steps], dtype=np.float32),
        "rewards": np.array([s[2] for s in steps], dtype=np.float32),
        "next_observations": np.array([s[3] for s in steps], dtype=np.float32),
        "terminals": np.array([s[4] for s in steps], dtype=bool),
        "episode_ends": ends,
    }


# ======================================================================================================================
# Training loops
# ======================================================================================================================
def train_loop(ws: Workspace, stage: str, total_steps: int, update, tag: str) -> None:
    """Run `update()` (one optimisation step returning detached metrics) with progress bar, logging, finiteness
    checks, periodic and final checkpoints, and a clean save-and-exit on Ctrl-C."""
    if stage in ws.finished:
        return
    args, run = ws.args, ws.run
    start = ws.start_step(stage)
    progress = tqdm(range(start, total_steps), desc=stage, dynamic_ncols=True, leave=False)
    begin = time.perf_counter()
    for step in progress:
        metrics = update()
        done = step + 1
        if done % args.log_every == 0 or done % args.save_every == 0 or done == total_steps:
            values = {key: float(value) for key, value in metrics.items()}
            check_finite(values["loss"], stage, step)
            for key, value in values.items():
                run.writer.add_scalar(f"losses/{tag}_{key}", value, done)
            progress.set_postfix(loss=f"{values['loss']:.4f}")
        if done % args.save_every == 0 and done < total_steps:
            ws.save(stage, done)
        if args.eval_every and stage.startswith("pass") and done % args.eval_every == 0 and done < total_steps:
            stats = evaluate_stage(ws, ws.current_model, ws.cascade is not None)
            run.writer.add_scalar(f"charts/{tag}_return_during_training", stats["return_mean"], done)
        if run.interrupted():
            path = ws.save(stage, done)
            print(f"interrupted: checkpoint saved to {path}", file=sys.stderr)
            raise SystemExit(130)
    progress.close()
    elapsed = time.perf_counter() - begin
    if total_steps > start:
        ws.throughput[f"{tag}_steps_per_s"] = (total_steps - start) / max(elapsed, 1e-9)
        run.writer.add_scalar(f"charts/{tag}_steps_per_s", ws.throughput[f"{tag}_steps_per_s"], total_steps)
    ws.finished.append(stage)
    ws.save(stage, total_steps)


def foundation_update(ws: Workspace) -> dict[str, torch.Tensor]:
    """Diffusion loss on dataset chunks; the EMA copy becomes the foundation."""
    index = torch.randint(0, len(ws.transitions), (ws.args.batch_size,), device=ws.device)
    chunks = ws.transitions.action_chunk(index, ws.args.pred_horizon)
    cond = ws.transitions.observation_history(index, ws.args.obs_horizon)
    loss = ws.diffusion.loss(ws.denoiser(ws.foundation_net), chunks, cond).mean()
    ws.foundation_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    ws.foundation_optimizer.step()
    with torch.no_grad():
        for ema, live in zip(ws.foundation.parameters(), ws.foundation_net.parameters()):
            ema.lerp_(live, 1 - ws.args.ema_decay)
    return {"loss": loss.detach()}


def critic_update(ws: Workspace) -> dict[str, torch.Tensor]:
    """One IQL step: expectile V, TD Q on V(s'), Polyak target."""
    args, critic, data = ws.args, ws.critic, ws.transitions
    index = torch.randint(0, len(data), (args.batch_size,), device=ws.device)
    obs, actions = data.observations[index], data.actions[index]
    with torch.no_grad():
        target_q = critic.q_value(obs, actions)
    difference = target_q - critic.v(obs)
    v_loss = (torch.abs(args.expectile - (difference < 0).float()) * difference**2).mean()
    ws.v_optimizer.zero_grad(set_to_none=True)
    v_loss.backward()
    ws.v_optimizer.step()
    with torch.no_grad():
        td_target = data.rewards[index] + args.gamma * (1 - data.terminals[index]) * critic.v(
            data.next_observations[index])
    q1, q2 = critic.q(obs, actions)
    q_loss = ((q1 - td_target) ** 2 + (q2 - td_target) ** 2).mean()
    ws.q_optimizer.zero_grad(set_to_none=True)
    q_loss.backward()
    ws.q_optimizer.step()
    with torch.no_grad():
        for target, live in zip(critic.q_target.parameters(), critic.q.parameters()):
            target.lerp_(live, args.polyak)
    return {"loss": q_loss.detach() + v_loss.detach(), "q_loss": q_loss.detach(), "v_loss": v_loss.detach()}


def measure_action_latency(ws: Workspace, model, use_cascade: bool, repeats: int = 20) -> float:
    """Milliseconds to choose one action chunk from N candidates for a single state, as evaluation chooses it (a CUDA
    graph on a GPU), after warm-up."""
    index = torch.zeros(1, dtype=torch.long, device=ws.device)
    cond = ws.transitions.observation_history(index, ws.args.obs_horizon)
    obs = ws.transitions.observations[index]
    select = RecedingHorizonPolicy(ws, model, use_cascade).select
    for _ in range(3):
        select(cond, obs)
    with Timer() as timer:
        for _ in range(repeats):
            select(cond, obs)
    return 1000 * timer.seconds / repeats


# ======================================================================================================================
# Main
# ======================================================================================================================
def begin_alignment_stage(ws: Workspace, method: str, stage: str) -> None:
    """Make what an alignment stage trains (policy or cascade, a fresh optimiser, DPO's reference snapshot); when
    --resume lands inside this stage, their saved states are used instead."""
    resuming = ws.start_step(stage) > 0
    if method == "cascade":
        if ws.cascade is None:
            ws.make_cascade()
        return
    if ws.policy is None:
        ws.make_policy()
    ws.align_optimizer = torch.optim.Adam(ws.trainable_policy_parameters(), lr=getattr(ws.args, f"{method}_lr"))
    if resuming and ws.pending_align_optimizer is not None:
        ws.align_optimizer.load_state_dict(ws.pending_align_optimizer)
    ws.pending_align_optimizer = None
    if method == "dpo" and not resuming:
        ws.dpo_reference = copy.deepcopy(ws.policy).requires_grad_(False)


def load_stage_from(path: str, module: nn.Module, key: str, what: str) -> None:
    checkpoint = read_checkpoint_file(path, script=SCRIPT)
    if key not in checkpoint["models"]:
        raise UserError(f"checkpoint '{path}' holds no {what}")
    load_module_state(module, checkpoint["models"][key], what)


def main(args: Args) -> None:
    wall_start = time.perf_counter()
    from_presets = apply_presets(args, PRESETS)
    methods = validate(args)
    data = load_offline_data(args.env)
    run = start_run(args, SCRIPT)
    try:
        if from_presets:
            print("preset values: " + ", ".join(f"{key}={value}" for key, value in from_presets.items()))
        ws = Workspace(args, data, run)
        checkpoint = run.load_checkpoint() if args.resume else None
        if checkpoint is not None:
            ws.restore(checkpoint)
            print(f"resuming stage '{ws.stage}' at step {ws.step} from {run.run_dir}")
        print(f"data: {data.source}, {len(ws.transitions)} transitions; device {run.device}")

        # ---- Stage 1: foundation Diffusion Policy -----------------------------------------------------------
        if args.load_foundation and "foundation" not in ws.finished:
            load_stage_from(args.load_foundation, ws.foundation, "foundation", "the foundation")
            ws.foundation_net.load_state_dict(ws.foundation.state_dict())
            ws.finished.append("foundation")
            print(f"foundation loaded from {args.load_foundation}")
        train_loop(ws, "foundation", args.foundation_steps, cuda_graphed(lambda: foundation_update(ws), ws.graphs),
                   "foundation")

        # ---- Stage 2: IQL critic ----------------------------------------------------------------------------
        if args.load_critic and "critic" not in ws.finished:
            load_stage_from(args.load_critic, ws.critic, "critic", "the critic")
            ws.finished.append("critic")
            print(f"critic loaded from {args.load_critic}")
        train_loop(ws, "critic", args.critic_steps, cuda_graphed(lambda: critic_update(ws), ws.graphs), "critic")

        if "foundation" not in ws.results:
            record_result(ws, "foundation", evaluate_stage(ws, ws.foundation, False))
            ws.throughput["action_latency_ms"] = measure_action_latency(ws, ws.foundation, False)
            ws.save("alignment", 0)

        # ---- Stage 3: alignment passes ----------------------------------------------------------------------
        for alignment_pass in range(1, args.passes + 1):
            if alignment_pass > 1 and args.online_episodes > 0:
                stage = f"pass{alignment_pass}/online"
                if stage not in ws.finished and ws.start_step(stage) == 0:
                    ws.add_online_data(collect_online_episodes(ws, alignment_pass))
                    print(f"[{stage}] +{len(ws.online_data['rewards'])} online transitions in total")
                train_loop(ws, stage, args.online_critic_steps, cuda_graphed(lambda: critic_update(ws), ws.graphs),
                           "critic_online")
            for method in methods:
                stage = f"pass{alignment_pass}/{method}"
                if stage in ws.results:
                    continue
                begin_alignment_stage(ws, method, stage)
                train_loop(ws, stage, getattr(args, f"{method}_steps"), lambda: ALIGN_UPDATES[method](ws), method)
                stats = evaluate_stage(ws, ws.current_model, ws.cascade is not None)
                record_result(ws, stage, stats)
                ws.save(stage, getattr(args, f"{method}_steps"))

        # ---- Stage 4: final evaluation -------------------------------------------------------------------------
        # The last method's evaluation is already the final model (policy + cascade when trained).
        ws.results.pop("aligned", None)  # a resumed run with more passes: the final entry goes last again
        ws.results["aligned"] = dict(ws.results[f"pass{args.passes}/{methods[-1]}"]) if methods else \
            dict(ws.results["foundation"])
        ws.save("done", 0)
        summary = {
            "script": SCRIPT, "env": args.env, "seed": args.seed, "stages": ws.results,
            "throughput": ws.throughput, "wall_time_s": time.perf_counter() - wall_start,
            "device": str(run.device), "args": dataclasses.asdict(args),
        }
        if data.family == "nav1d":
            summary["coherency"] = {name: stats["coherency"] for name, stats in ws.results.items()}
        run.write_summary(summary)
        print_results_table(ws.results)
        print(f"summary: {run.run_dir / 'summary.json'}")
    finally:
        run.close()


if __name__ == "__main__":
    cli(main, Args)
