"""EDA: Efficient Diffusion Alignment, single-file reference implementation.

Paper: Huayu Chen, Kaiwen Zheng, Hang Su, Jun Zhu. "Aligning Diffusion Behaviors with Q-functions for Efficient
Continuous Control", NeurIPS 2024. Authors' code: https://github.com/thu-ml/Efficient-Diffusion-Alignment

Overview. The behavior policy mu(a|s) is a diffusion model whose noise prediction is the action-gradient of a scalar
network: eps(a_t|s,t) = -sigma_t * grad_a f(a_t|s,t). At the optimum f = log mu_t(a_t|s) + C(s,t), so the log density
ratio of two such models is a difference of two forward passes. After pretraining f_phi on the dataset (stage 1) and
an IQL critic (stage 2), we draw K candidate actions per dataset state from the frozen behavior model and label them
with Q (stage 3). Alignment (stage 4) starts the policy f_theta as a copy of f_phi and trains it as a K-way classifier:
the logit of candidate k is beta * (f_theta - f_phi)(a_t^k|s,t) at a noise level t shared by the K candidates, the
target is softmax(q_scale * Q). Its optimum is pi(a|s) proportional to mu(a|s) exp(q_scale * Q(s,a) / beta). Both
models are evaluated (stage 5) with DPM-Solver++ and best-of-`num_candidates` selection by Q. Candidates and
evaluation sample with DPM-Solver++(2M) on a logSNR-uniform grid by default, or with the authors' singlestep 2S on a
time-uniform grid (`--solver dpm_solver++_2s`).

    python eda_d4rl.py --env nav1d-full            # minutes on a CPU
    python eda_d4rl.py --env hopper-medium-v2      # paper scale, one GPU
"""
from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import nav1d
from common.data import evaluate, iql_rewards, load_offline_data, normalized_score, Normalizer
from common.diffusion import Diffusion, VPSDE
from common.nets import IDQLResidualMLP, TwinQ, ValueNet, count_parameters
from common.runtime import (apply_presets, check_finite, cli, cuda_graphed, explicit_fields, require,
                            resumed_arguments, stage_stats, start_run, use_cuda_graphs)
from common.training import DivergenceMonitor, Trainer, action_latency_ms, check_loadable, require_same_data

SCRIPT = "eda_d4rl"
STAGES = ("behavior", "critic", "candidates", "alignment", "evaluation", "done")
T_MIN = 1e-3  # smallest diffusion time used in training, as in the authors' code


@dataclass
class Args:
    exp_name: str = SCRIPT
    """name of this experiment (used in the default run_dir)"""
    seed: int = 0
    """seed of the run (training, candidate sampling and evaluation seeds all follow from it)"""
    env: str = "hopper-medium-v2"
    """dataset: nav1d-{partial,full,expert}, a Minari id, or a D4RL name such as hopper-medium-v2"""
    preset: Literal["", "cpu"] = ""
    """compute preset over the dataset's own: cpu = the whole method at 2-core CPU scale (README, "Compute presets")"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to run"""
    torch_deterministic: bool = True
    """deterministic torch kernels (same seed and device -> same summary.json)"""
    run_dir: str | None = None
    """output folder; default runs/{env}__{exp_name}__{seed}__{unix_time}"""
    resume: bool = False
    """continue the run in run_dir from its latest checkpoint"""
    eval_episodes: int = 20
    """evaluation episodes per evaluated model"""
    eval_max_steps: int = 0
    """cap on evaluation episode length (0: the environment's own limit)"""
    eval_every: int = 50_000
    """alignment steps between evaluations of the policy during training (0: only the final evaluation)"""
    save_every: int = 10_000
    """steps between checkpoints (in the candidate stage one step is one batch of states)"""
    compile: bool = False
    """torch.compile the training losses (faster steps after a compile of a minute or two; other random streams)"""
    cuda_graphs: bool = True
    """on a GPU, replay every training step and sampler call from a CUDA graph (5-20x faster; no effect on a CPU)"""
    cpu_threads: int = 0
    """torch CPU threads (0: torch's default); small networks run faster on 1, above all on a busy machine"""

    # behavior model (section 3.1)
    behavior_steps: int = 1_000_000
    """gradient steps of behavior pretraining"""
    behavior_batch_size: int = 2048
    """batch size of behavior pretraining"""
    behavior_lr: float = 3e-4
    """Adam learning rate of behavior pretraining"""
    hidden: int = 256
    """width of the residual MLP behind f"""
    blocks: int = 3
    """residual blocks of the MLP behind f"""
    expansion: int = 4
    """inner width factor of each residual block"""
    dropout: float = 0.1
    """dropout in the residual blocks during behavior pretraining (0 during alignment)"""
    # IQL critic (section 3.2)
    critic_steps: int = 1_500_000
    """gradient steps of the IQL critic"""
    critic_batch_size: int = 256
    """batch size of the IQL critic"""
    critic_lr: float = 3e-4
    """Adam learning rate of Q and V"""
    critic_hidden: int = 256
    """width of the two hidden layers of Q and V"""
    gamma: float = 0.99
    """discount"""
    expectile: float = 0.7
    """IQL expectile tau of the V loss"""
    polyak: float = 0.005
    """Polyak rate of the target Q networks"""
    # candidates and Q labels (section 3.3)
    K: int = 16
    """candidate actions per state (the classes of the contrastive loss, >= 2)"""
    data_ratio: float = 1.0
    """fraction of dataset states that get candidates and Q labels (the paper's 1%-data experiment: 0.01)"""
    solver: Literal["dpm_solver++", "dpm_solver++_2s"] = "dpm_solver++"
    """sampler of candidates and evaluation: dpm_solver++ (multistep 2M on a logSNR-uniform grid) or dpm_solver++_2s
    (singlestep 2S on a time-uniform grid, the authors' code)"""
    sampler_steps: int = 15
    """network evaluations per sample"""
    candidate_batch_size: int = 1024
    """states per batch of candidate sampling (K samples each)"""
    # alignment (section 3.4)
    align_steps: int = 200_000
    """gradient steps of the alignment"""
    align_batch_size: int = 256
    """states per alignment batch (each with its K candidates)"""
    align_lr: float = 5e-5
    """Adam learning rate of the policy"""
    beta: float = 0.2
    """inverse temperature of the logits beta * (f_policy - f_behavior); per-dataset values come from PRESETS"""
    q_scale: float = 3.0
    """labels are softmax(q_scale * Q) over the K candidates"""
    labels: Literal["soft", "hard"] = "soft"
    """soft: softmax(q_scale * Q); hard: one-hot argmax Q (the preference-based ablation; K=2 is DPO-like)"""
    normalize_observations: bool = True
    """standardise observations with the dataset's mean and std (the authors' code feeds raw observations)"""
    # evaluation (section 3.5)
    num_candidates: int = 4
    """the action is the best of this many policy samples by Q (every model is also reported with 1)"""
    # stages from other runs
    load_behavior: str | None = None
    """checkpoint of another eda_d4rl run whose behavior model to use instead of pretraining"""
    load_critic: str | None = None
    """checkpoint of another eda_d4rl run whose critic to use instead of training one"""
    log_every: int = 1000
    """steps between loss logs (and finiteness checks)"""


# beta per D4RL dataset (paper appendix); the same keys with "/" match Minari ids (mujoco/hopper/medium-v0, ...).
BETA_TABLE = {
    "halfcheetah-medium-expert": 2.0, "halfcheetah-medium": 0.1, "halfcheetah-medium-replay": 0.2,
    "hopper-medium-expert": 2.0, "hopper-medium": 0.2, "hopper-medium-replay": 0.2,
    "walker2d-medium-expert": 0.3, "walker2d-medium": 0.5, "walker2d-medium-replay": 0.1,
    "antmaze-umaze": 0.5, "antmaze-umaze-diverse": 5.0, "antmaze-medium-play": 1.0, "antmaze-medium-diverse": 1.0,
    "kitchen-complete": 2.0, "kitchen-mixed": 3.0, "kitchen-partial": 3.0,
}
PRESETS: dict[str, dict] = {
    **{name: {"beta": beta} for name, beta in BETA_TABLE.items()},
    **{name.replace("-", "/", 1): {"beta": beta} for name, beta in BETA_TABLE.items()},
    "antmaze": {"expectile": 0.9},
    # Nav1D: 8000 transitions, 2-d state, 1-d action; sized to finish in a few minutes on 2 CPU cores.
    "nav1d": {
        "behavior_steps": 3000, "behavior_batch_size": 256, "hidden": 64, "blocks": 2, "expansion": 4,
        "critic_steps": 6000, "critic_hidden": 128,
        "align_steps": 3000, "align_batch_size": 64, "align_lr": 1e-3, "beta": 0.5,
        "candidate_batch_size": 2000, "eval_every": 1000, "save_every": 500, "log_every": 100, "cpu_threads": 1,
    },
    # near-optimal, narrow data: beta 0.5 over-exploits the critic's errors there while 1.0 holds it (seeds 0-2, each
    # reusing its seed's behavior model and critic via --load-behavior/--load-critic and varying --beta: best-of-4
    # 7.10 -> 6.61 with 0.5, 7.05 with 1.0, 6.96 with 2.0; fresh runs, seeds 0-4: 6.77 -> 6.68, nav1d_methods.md);
    # the paper also uses larger beta on its medium-expert datasets
    "nav1d-expert": {"beta": 1.0},
}

COMPUTE_PRESETS: dict[str, dict] = {  # --preset: sizes for a machine, over the dataset's preset (README)
    # a 2-core CPU: a smaller f (hidden 128, 2 blocks), 20k behavior and 300k critic steps, 16 candidates for 5% of
    # the states, 20k alignment steps of 64 states, beta 3.0 (hopper_cpu.md). The critic gets most of the time: on
    # hopper-mr (seed 0, same behavior model, beta 1) a 100k-step critic left the aligned best-of-4 at 27.7 (behavior
    # 38.9), a 300k-step one lifted it to 69.6 (behavior 48.7). beta over the paper's table: the critic spreads Q by ~9
    # over one state's candidates, so the targets are near one-hot and a small beta asks f for differences of ~100
    # between nearby candidates; its action-gradient then carries the samples to the action bounds (beta 0.2: 40% of
    # the actions at the bounds). Seeds 0-2, alignment from the same behavior models and critics: beta 1.0 for 5k
    # steps gained with one sample (8.6 -> 37.4) but lost best of 4 by Q (54.5 -> 46.2); beta 3.0 for 20k steps keeps
    # the samples on the data (denoising error and bound share as the behavior model's) and gains both (best of 4
    # 54.5 -> 61.4, one sample 8.6 -> 31.4). End to end, seed 0, alone: 52 min; one sample 10.3 -> 30.2 but best of 4
    # 57.1 -> 48.2 (the same seed's alignment-only run: 59.8), so the best-of-4 gain is within alignment's spread
    "cpu": {"hidden": 128, "blocks": 2, "behavior_steps": 20_000, "behavior_batch_size": 256, "critic_steps": 300_000,
            "data_ratio": 0.05, "candidate_batch_size": 512, "align_steps": 20_000, "align_batch_size": 64,
            "beta": 3.0, "eval_episodes": 20, "eval_every": 0, "save_every": 2_000, "log_every": 100},
}


def validate_args(args: Args) -> None:
    """Reject bad hyper-parameters with a one-line message before any work is done."""
    checks = [
        (args.K >= 2, f"--K must be >= 2 (the alignment contrasts K candidates), got {args.K}"),
        (args.beta > 0, f"--beta must be > 0, got {args.beta}"),
        (0 < args.data_ratio <= 1, f"--data-ratio must be in (0, 1], got {args.data_ratio}"),
        (args.q_scale > 0, f"--q-scale must be > 0, got {args.q_scale}"),
        (args.labels in ("soft", "hard"), f"--labels must be soft or hard, got {args.labels!r}"),
        (0 < args.expectile < 1, f"--expectile must be in (0, 1), got {args.expectile}"),
        (0 <= args.gamma < 1, f"--gamma must be in [0, 1), got {args.gamma}"),
        (0 < args.polyak <= 1, f"--polyak must be in (0, 1], got {args.polyak}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.num_candidates >= 1, f"--num-candidates must be >= 1, got {args.num_candidates}"),
        (args.eval_episodes >= 1, f"--eval-episodes must be >= 1, got {args.eval_episodes}"),
        (args.sampler_steps >= 1, f"--sampler-steps must be >= 1, got {args.sampler_steps}"),
    ]
    for name in ("behavior_steps", "critic_steps", "align_steps", "eval_every", "eval_max_steps"):
        checks.append((getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0"))
    for name in ("behavior_batch_size", "critic_batch_size", "candidate_batch_size", "align_batch_size",
                 "save_every", "log_every", "hidden", "blocks", "expansion", "critic_hidden"):
        checks.append((getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1"))
    for name in ("behavior_lr", "critic_lr", "align_lr"):
        checks.append((getattr(args, name) > 0, f"--{name.replace('_', '-')} must be > 0"))
    require(checks)


# ----------------------------------------------------------------------------------------------------------------
# Networks and losses
# ----------------------------------------------------------------------------------------------------------------
class EnergyModel(nn.Module):
    """Scalar "bottleneck" diffusion model f(a_t|s,t): the sum of a residual MLP's |A| outputs.

    Its noise prediction is eps(a_t|s,t) = -sigma_t * grad_a f(a_t|s,t)."""

    def __init__(self, state_dim: int, action_dim: int, args: Args, sde: VPSDE):
        super().__init__()
        self.net = IDQLResidualMLP(action_dim, state_dim, hidden=args.hidden, blocks=args.blocks,
                                   expansion=args.expansion, dropout=args.dropout)
        self.sde = sde

    def forward(self, actions_t: torch.Tensor, t: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return self.net(actions_t, t, states).sum(-1)

    def noise_prediction(self, actions_t, t, states) -> torch.Tensor:
        """-sigma_t * grad_a f. torch.func.grad differentiates in its own autograd level, so it works under no_grad
        (sampling), keeps the graph to the weights when a loss is taken of it (training), and torch.compile can
        trace it (autograd.grad with create_graph=True cannot be compiled)."""
        grad = torch.func.grad(lambda actions: self(actions, t, states).sum())(actions_t)
        return -self.sde.sigma(t)[:, None] * grad


def behavior_loss(model: EnergyModel, actions, states, sde: VPSDE) -> torch.Tensor:
    """Denoising score matching through the gradient of f: mean_B || sigma_t grad_a f(a_t|s,t) + z ||^2."""
    t = torch.rand(actions.shape[0], device=actions.device) * (1 - T_MIN) + T_MIN
    noise = torch.randn_like(actions)
    actions_t = sde.alpha(t)[:, None] * actions + sde.sigma(t)[:, None] * noise
    eps = model.noise_prediction(actions_t, t, states)
    return (eps - noise).pow(2).sum(-1).mean()


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


def alignment_loss(policy: EnergyModel, behavior: EnergyModel, states, candidates, q_labels, args: Args,
                   sde: VPSDE):
    """Contrastive alignment. states (B,S), candidates (B,K,A), q_labels (B,K) -> (loss, accuracy).

    One diffusion time per state shared by its K candidates, independent noise per candidate; the logits are
    beta * (f_policy - f_behavior), the targets softmax(q_scale * Q) or one-hot argmax Q."""
    batch, k, action_dim = candidates.shape
    t = (torch.rand(batch, device=states.device) * (1 - T_MIN) + T_MIN).repeat_interleave(k)
    noise = torch.randn_like(candidates).reshape(batch * k, action_dim)
    actions_t = sde.alpha(t)[:, None] * candidates.reshape(batch * k, action_dim) + sde.sigma(t)[:, None] * noise
    states_k = states.repeat_interleave(k, 0)
    with torch.no_grad():
        behavior_energy = behavior(actions_t, t, states_k)
    logits = args.beta * (policy(actions_t, t, states_k) - behavior_energy).view(batch, k)
    if args.labels == "soft":
        targets = torch.softmax(args.q_scale * q_labels, dim=-1)
    else:
        targets = F.one_hot(q_labels.argmax(-1), k).to(logits.dtype)
    loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
    accuracy = (logits.argmax(-1) == q_labels.argmax(-1)).float().mean()
    return loss, accuracy


@torch.no_grad()
def sample_actions(model: EnergyModel, diffusion: Diffusion, states, samples_per_state: int, action_low,
                   action_high, generator=None) -> torch.Tensor:
    """(B,S) states -> (B * samples_per_state, A) actions from the diffusion model, clipped to the action box."""
    out = diffusion.sample(model.noise_prediction, (action_low.shape[0],), cond=states,
                           samples_per_cond=samples_per_state, generator=generator)
    return torch.maximum(torch.minimum(out.x0, action_high), action_low)


@torch.no_grad()
def min_q(critic, states, actions) -> torch.Tensor:
    return torch.min(*critic(states, actions))


def select_states(num_transitions: int, data_ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sorted indices of the dataset states that get candidates: all of them, or a random data_ratio fraction."""
    num_selected = max(1, round(data_ratio * num_transitions))
    return torch.randperm(num_transitions, generator=generator)[:num_selected].sort().values


@torch.no_grad()
def generate_candidates(behavior: EnergyModel, critic_target, diffusion: Diffusion, states, K: int, action_low,
                        action_high, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """K actions per state from the frozen behavior model (B,K,A) and their labels min(Q1_targ, Q2_targ) (B,K)."""
    actions = sample_actions(behavior, diffusion, states, K, action_low, action_high, generator)
    q_labels = min_q(critic_target, states.repeat_interleave(K, 0), actions)
    return actions.view(len(states), K, -1), q_labels.view(len(states), K)


class ActionSamples:
    """Dataset actions and a model's samples as DivergenceMonitor reads them: the denoising error of the noise
    prediction -sigma grad_a f, and samples mapped to [-1, 1] for its action-bounds test."""

    def __init__(self, states, actions, sde: VPSDE, diffusion: Diffusion, action_low, action_high):
        self.states, self.data_actions, self.sde, self.diffusion = states, actions, sde, diffusion
        self.action_low, self.action_high, self.device = action_low, action_high, states.device

    def dataset_samples(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(len(self.states), (batch,), device=self.device)
        return self.data_actions[index], self.states[index]

    def eps_error(self, model: EnergyModel, actions, states, t, noise) -> torch.Tensor:
        actions_t = self.sde.alpha(t)[:, None] * actions + self.sde.sigma(t)[:, None] * noise
        return (model.noise_prediction(actions_t, t, states) - noise).pow(2).mean(-1)

    def sample(self, model: EnergyModel, states):
        return self.diffusion.sample(model.noise_prediction, (self.action_low.shape[0],), cond=states)

    def actions(self, samples: torch.Tensor) -> torch.Tensor:
        return 2 * (samples - self.action_low) / (self.action_high - self.action_low) - 1


class BestOfNPolicy:
    """evaluate()'s policy: n diffusion samples per state, the one with the highest min target Q is executed."""

    def __init__(self, model, critic, diffusion, normalizer, n, action_low, action_high, seed, device,
                 cuda_graphs: bool = False):
        self.model, self.critic, self.diffusion, self.normalizer, self.n = model, critic, diffusion, normalizer, n
        self.action_low, self.action_high, self.device = action_low, action_high, device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.choose = cuda_graphed(self._choose, cuda_graphs, generators=(self.generator,))
        self.calls, self.seconds = 0, 0.0

    def _choose(self, states: torch.Tensor) -> torch.Tensor:
        actions = sample_actions(self.model, self.diffusion, states, self.n, self.action_low, self.action_high,
                                 self.generator).view(len(states), self.n, -1)
        if self.n == 1:
            return actions[:, 0]
        q = min_q(self.critic, states.repeat_interleave(self.n, 0), actions.flatten(0, 1)).view(-1, self.n)
        return actions[torch.arange(len(states), device=self.device), q.argmax(-1)]

    def __call__(self, observations: np.ndarray, env_ids: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        states = torch.as_tensor(self.normalizer.normalize(observations), dtype=torch.float32, device=self.device)
        result = self.choose(states).cpu().numpy()
        self.calls, self.seconds = self.calls + 1, self.seconds + time.perf_counter() - start
        return result


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def main(args: Args) -> None:
    args = resumed_arguments(args, SCRIPT)  # --resume: the run's own arguments
    from_presets = apply_presets(args, PRESETS, compute_presets=COMPUTE_PRESETS)
    validate_args(args)
    loaded = {stage: check_loadable(path, SCRIPT, stage)
              for stage, path in (("behavior", args.load_behavior), ("critic", args.load_critic)) if path}
    data = load_offline_data(args.env)
    normalizer = Normalizer.from_array(data.observations) if args.normalize_observations else Normalizer(
        np.zeros(data.observations.shape[1], np.float32), np.ones(data.observations.shape[1], np.float32))
    for stage, checkpoint in loaded.items():
        require_same_data(checkpoint, normalizer, f"--load-{stage}")
    run = start_run(args, script=SCRIPT)
    device = run.device
    print("arguments from the run's args.json" if args.resume else f"values from presets: {from_presets}" if from_presets
          else "no preset matched; using the defaults")
    if "beta" not in from_presets and "beta" not in explicit_fields(sys.argv[1:]) and not args.resume:
        print(f"note: {args.env} has no entry in the beta table; using --beta {args.beta} (sweep it: the paper's grid "
              "is 0.1-2 for locomotion, 0.3-5 for antmaze and kitchen)")

    # ---- data: tensors on the device, states normalised (the same normaliser is used at evaluation) ----
    def as_tensor(array):
        return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)
    observations = as_tensor(normalizer.normalize(data.observations))
    next_observations = as_tensor(normalizer.normalize(data.next_observations))
    actions = as_tensor(data.actions)
    rewards = as_tensor(iql_rewards(data))
    terminals = as_tensor(data.terminals)
    action_low, action_high = as_tensor(data.action_low), as_tensor(data.action_high)
    num_transitions, state_dim = observations.shape
    action_dim = actions.shape[1]
    print(f"dataset {data.name} ({data.source}): {num_transitions} transitions, state {state_dim}, action {action_dim}")

    # ---- models and optimisers (all built up front so that any checkpoint can be restored) ----
    graphs = use_cuda_graphs(args, device)  # Adam steps inside a CUDA graph keep their step count on the device
    sde = VPSDE()
    diffusion = Diffusion(args.solver, steps=args.sampler_steps, sde=sde)
    behavior = EnergyModel(state_dim, action_dim, args, sde).to(device)
    policy = copy.deepcopy(behavior)
    critic = TwinQ(state_dim, action_dim, hidden=args.critic_hidden).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    value = ValueNet(state_dim, hidden=args.critic_hidden).to(device)
    trainer = Trainer(run, args.log_every, args.save_every)
    trainer.models = {"behavior": behavior, "policy": policy, "critic": critic, "critic_target": critic_target,
                      "value": value}
    optimizers = trainer.optimizers = {
        "behavior": torch.optim.Adam(behavior.parameters(), lr=args.behavior_lr, capturable=graphs),
        "q": torch.optim.Adam(critic.parameters(), lr=args.critic_lr, capturable=graphs),
        "v": torch.optim.Adam(value.parameters(), lr=args.critic_lr, capturable=graphs),
        "policy": torch.optim.Adam(policy.parameters(), lr=args.align_lr, capturable=graphs)}
    trainer.state["normalizer"] = normalizer.state_dict()
    print(f"behavior model f: {count_parameters(behavior):,} parameters; critic {count_parameters(critic):,}")
    if args.resume:
        trainer.resume(run.load_checkpoint())

    # --compile fuses the elementwise work of each training loss (forward, input gradient and backward) into a few
    # kernels; sampling stays eager (its batch size changes as evaluation episodes end)
    compiled = torch.compile if args.compile else (lambda function: function)
    behavior_loss_fn, iql_losses_fn, alignment_loss_fn = map(compiled, (behavior_loss, iql_losses, alignment_loss))

    # ============================================================================================================
    # Stage 1: behavior pretraining (denoising score matching through grad_a f; dropout on)
    # ============================================================================================================
    if "behavior" in loaded and "behavior" not in trainer.done:
        trainer.load_stage("behavior", loaded["behavior"], args.load_behavior, ("behavior",))
    if "behavior" not in trainer.done:
        behavior.train()

        def behavior_step():
            index = torch.randint(num_transitions, (args.behavior_batch_size,), device=device)
            loss = behavior_loss_fn(behavior, actions[index], observations[index], sde)
            optimizers["behavior"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["behavior"].step()
            return {"loss": loss.detach()}

        trainer.run_stage("behavior", args.behavior_steps, cuda_graphed(behavior_step, graphs),
                          optimizer=optimizers["behavior"])
        trainer.finish("behavior", {"steps": args.behavior_steps})
    behavior.eval().requires_grad_(False)

    # ============================================================================================================
    # Stage 2: IQL critic (twin Q with Polyak targets, expectile V)
    # ============================================================================================================
    if "critic" in loaded and "critic" not in trainer.done:
        trainer.load_stage("critic", loaded["critic"], args.load_critic, ("critic", "critic_target", "value"))
    if "critic" not in trainer.done:
        def critic_step():
            index = torch.randint(num_transitions, (args.critic_batch_size,), device=device)
            batch = (observations[index], actions[index], rewards[index], next_observations[index], terminals[index])
            return iql_update(critic, critic_target, value, batch, (optimizers["v"], optimizers["q"]), args,
                              iql_losses_fn)

        trainer.run_stage("critic", args.critic_steps, cuda_graphed(critic_step, graphs), optimizer=optimizers["q"])
        trainer.finish("critic", {"steps": args.critic_steps})
    critic_target.eval()

    # ============================================================================================================
    # Stage 3: K candidates per selected dataset state from the frozen behavior model, labelled by min target Q
    # ============================================================================================================
    if "candidates" not in trainer.done:
        candidates = trainer.state.setdefault("candidates", {})
        if not candidates:
            selection = select_states(num_transitions, args.data_ratio)
            candidates.update(indices=selection, actions=torch.zeros(len(selection), args.K, action_dim),
                              q_labels=torch.zeros(len(selection), args.K), done=0)
        num_selected = len(candidates["indices"])
        sample_candidates = cuda_graphed(lambda batch_states: generate_candidates(
            behavior, critic_target, diffusion, batch_states, args.K, action_low, action_high), graphs)
        timer_start, sampled = time.perf_counter(), 0
        batches = range(candidates["done"], num_selected, args.candidate_batch_size)
        for batch_number, first in enumerate(tqdm(batches, desc="candidates", dynamic_ncols=True), start=1):
            index = candidates["indices"][first:first + args.candidate_batch_size].to(device)
            sampled_actions, q_labels = sample_candidates(observations[index])
            rows = slice(first, first + len(index))
            candidates["actions"][rows], candidates["q_labels"][rows] = sampled_actions.cpu(), q_labels.cpu()
            candidates["done"], sampled = rows.stop, sampled + len(index)
            trainer.at("candidates", rows.stop, save=batch_number % args.save_every == 0 and rows.stop < num_selected)
        if sampled:
            trainer.throughput["candidates_states_per_s"] = sampled / max(time.perf_counter() - timer_start, 1e-9)
        check_finite(float(candidates["q_labels"].sum()), "candidates (Q labels)", candidates["done"])
        # how sharp the targets are: with beta, this sets how far f must move between one state's candidates
        q_labels = candidates["q_labels"]
        q_range = float((q_labels.max(1).values - q_labels.min(1).values).mean())
        best_weight = float(torch.softmax(args.q_scale * q_labels, -1).max(-1).values.mean())
        print(f"candidates: {num_selected} states x K={args.K}, Q labels mean {q_labels.mean():.3f}, within-state Q "
              f"range {q_range:.3f}, soft target of the best candidate {best_weight:.2f} (uniform: {1 / args.K:.2f})")
        trainer.finish("candidates", {"states": num_selected, "K": args.K, "q_range_within_state": q_range,
                                      "best_candidate_target": best_weight})
    candidates = trainer.state["candidates"]

    # ============================================================================================================
    # Stage 4: alignment of the policy (a copy of the behavior model, dropout 0) by the contrastive Q loss
    # ============================================================================================================
    def evaluate_model(model, n):
        """(stats, BestOfNPolicy) of best-of-n sampling from `model`, with coherency on Nav1D."""
        policy_fn = BestOfNPolicy(model, critic_target, diffusion, normalizer, n, action_low, action_high,
                                  seed=args.seed + 1, device=device, cuda_graphs=graphs)
        result = evaluate(policy_fn, data.make_env, args.eval_episodes, seed=args.seed,
                          max_steps=args.eval_max_steps or None)
        stats = stage_stats(result.returns, normalized_score(data, result.returns), result.actions_per_s,
                            result.success)
        if data.family == "nav1d":
            kind = next(kind for kind in nav1d.DATASET_KINDS if kind in data.name)
            states = np.concatenate([episode[:-1] for episode in result.observations])  # drop the final observations
            stats["coherency"] = nav1d.policy_coherency(kind, states, np.concatenate(result.actions))
        return stats, policy_fn

    monitor = DivergenceMonitor(ActionSamples(observations, actions, sde, diffusion, action_low, action_high),
                                seed=args.seed)
    if "alignment" not in trainer.done:
        if trainer.start_step("alignment") == 0:
            policy.load_state_dict(behavior.state_dict())
        policy.eval()  # dropout 0; gradients still flow
        candidate_actions, candidate_q = candidates["actions"].to(device), candidates["q_labels"].to(device)
        candidate_states = observations[candidates["indices"].to(device)]

        def alignment_step():
            index = torch.randint(len(candidate_states), (args.align_batch_size,), device=device)
            loss, accuracy = alignment_loss_fn(policy, behavior, candidate_states[index], candidate_actions[index],
                                               candidate_q[index], args, sde)
            optimizers["policy"].zero_grad(set_to_none=True)
            loss.backward()
            optimizers["policy"].step()
            return {"loss": loss.detach(), "accuracy": accuracy.detach()}

        for done in trainer.train("alignment", args.align_steps, cuda_graphed(alignment_step, graphs),
                                  optimizer=optimizers["policy"]):
            if args.eval_every and done % args.eval_every == 0 and done < args.align_steps:
                trainer.log_eval(evaluate_model(policy, args.num_candidates)[0])
            if done % args.log_every == 0:
                trainer.log_divergence(monitor(policy))
        trainer.finish("alignment", {"steps": args.align_steps})

    # ============================================================================================================
    # Stage 5: evaluation of the behavior model and the aligned policy (best of num_candidates by Q, and 1)
    # ============================================================================================================
    policy.eval()
    plan = [("behavior", behavior, args.num_candidates, "behavior"), ("aligned", policy, args.num_candidates, "")]
    if args.num_candidates > 1:  # also the plain diffusion policies, one sample per state
        plan += [("behavior_1cand", behavior, 1, "behavior_1cand"), ("aligned_1cand", policy, 1, "aligned_1cand")]
    for index, (name, model, n, label) in enumerate(plan):
        if name in trainer.results:
            continue
        stats, policy_fn = evaluate_model(model, n)
        trainer.record(name, stats | (monitor(model) if name in ("behavior", "aligned") else {}), label)
        if name == "aligned":
            first_observation = np.asarray(data.make_env().reset(seed=args.seed)[0], dtype=np.float32)[None]
            trainer.throughput["action_latency_ms"] = action_latency_ms(
                lambda: policy_fn(first_observation, np.zeros(1, dtype=np.int64)))
        trainer.at("evaluation", index + 1, save=True)
    trainer.write_summary(SCRIPT, args, data.family)
    run.close()


if __name__ == "__main__":
    cli(main, Args)
