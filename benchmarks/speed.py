"""Speed of the three scripts' hot loops in one process, on a GPU (or the CPU), next to the authors' EDA code and
CleanDiffuser run on the same device with the same tensor shapes.

Every loop runs on random hopper-shaped tensors (11-d states, 3-d actions) that stay on the device:

  EDA (eda_d4rl.py)        behavior step (batch 2048 and 256), IQL critic step (256), alignment step (256 states x
                           K 16), candidate generation (K 16, 15 DPM-Solver++ steps), evaluation action (best of 4)
  DP (dp_align.py)         foundation step (batch 256), action latency (8 candidates, 20 DDPM steps, greedy by Q)
  Diffuser (diffuser_align.py)  training step (batch 256), planning latency (16 plans x 20 DDPM steps)

Our loops are timed in several variants: eager with torch's default precision, TF32 matmuls, fused Adam, a CUDA
graph of the whole step, bf16 autocast inside that graph, torch.compile, and torch.compile inside a CUDA graph. The
other projects run as shipped. Rows are written (JSON and markdown) as they are measured, so a run cut short keeps
what it measured; variants without torch.compile run first, since compilation takes most of the time.

    python -m benchmarks.speed --device cuda \\
        --official-eda PATH/Efficient-Diffusion-Alignment --cleandiffuser PATH/CleanDiffuser

(`git clone https://github.com/thu-ml/Efficient-Diffusion-Alignment` and
`git clone https://github.com/CleanDiffuserTeam/CleanDiffuser` give the two paths; their code is loaded from there
unchanged, never copied here). On the CPU only the eager rows of our loops run. The report also gives the device's
fp32 matmul rate, measured before and after the loops: on a shared machine a drop means other jobs took it meanwhile.

With --scripts-on DATASET it times the three scripts themselves instead, end to end for a few thousand steps (data
sampling, logging, checkpoints and evaluation included), with and without CUDA graphs or --compile:

    python -m benchmarks.speed --scripts-on local/hopper/medium-replay-v0 --device cuda --out scripts.md
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib
import importlib.util
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import diffuser_align
import dp_align
import eda_d4rl
from common.diffusion import Diffusion, VPSDE
from common.nets import TemporalUNet, TwinQ, ValueNet, count_parameters
from common.training import CompiledModules

STATE_DIM, ACTION_DIM = 11, 3  # hopper
DATASET_SIZE = 100_000  # random transitions kept on the device; batches are drawn from them inside the step
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------------
# Variants, cases and timing
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """How a loop runs. TF32 means torch.set_float32_matmul_precision("high"); cuDNN convolutions use TF32 in every
    variant (torch's default)."""

    name: str
    tf32: bool = False
    graph: bool = False
    compile: bool = False
    bf16: bool = False
    fused_adam: bool = False


DEFAULTS = Variant("eager, torch defaults")
TF32 = Variant("eager, TF32", tf32=True)
GRAPH = Variant("CUDA graph, TF32", tf32=True, graph=True)
COMPILED = Variant("compile, TF32", tf32=True, compile=True)
COMPILED_GRAPH = Variant("compile + CUDA graph, TF32", tf32=True, compile=True, graph=True)
TRAIN_VARIANTS = [DEFAULTS, TF32, Variant("eager, TF32, fused Adam", tf32=True, fused_adam=True), GRAPH,
                  Variant("CUDA graph, TF32, bf16 autocast", tf32=True, graph=True, bf16=True), COMPILED,
                  COMPILED_GRAPH]
SAMPLE_VARIANTS = [DEFAULTS, TF32, GRAPH, COMPILED, COMPILED_GRAPH]
SHIPPED_VARIANTS = [Variant("as shipped, torch defaults"), Variant("as shipped, TF32", tf32=True)]


@dataclass
class Timed:
    """What one variant of a case times: `call()` (captured in a CUDA graph for graph variants), wrapped by
    `outer(call)` for the host work around it (copies to and from the device), when given."""

    call: Callable[[], Any]
    outer: Callable[[Callable[[], Any]], Callable[[], Any]] | None = None


@dataclass
class Case:
    group: str  # "EDA", "DP", "Diffuser"
    loop: str  # what is timed
    implementation: str  # "ours", "authors' EDA code", "CleanDiffuser"
    unit: str  # "steps/s", "states/s" or "ms" (latency)
    per_call: float  # steps or states per call (rates); 1 for latencies
    variants: list[Variant]
    build: Callable[[Variant], Timed]
    note: str = ""


@dataclass
class Row:
    group: str
    loop: str
    implementation: str
    variant: str
    unit: str
    value: float = math.nan  # steps/s, states/s or ms
    ms_per_call: float = math.nan
    ms_range: tuple[float, float] = (math.nan, math.nan)
    first_call_s: float = math.nan  # includes compilation for compiled variants
    peak_memory_mib: float = math.nan
    note: str = ""
    extra: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def precision(variant: Variant):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if variant.tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def autocast(variant: Variant, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16)


def adam(parameters, lr: float, variant: Variant) -> torch.optim.Optimizer:
    """Adam as each variant needs it: capturable for CUDA graphs (its step count stays on the device)."""
    if variant.graph:
        return torch.optim.Adam(parameters, lr=lr, capturable=True, foreach=True)
    if variant.fused_adam:
        return torch.optim.Adam(parameters, lr=lr, fused=True)
    return torch.optim.Adam(parameters, lr=lr)


def cuda_graph(call: Callable[[], Any], warmup: int = 3) -> Callable[[], Any]:
    """Capture `call` (a whole training step or sampler call on static tensors) into one CUDA graph; the returned
    function replays it and returns the captured outputs. Warm-up runs on a side stream, as capture requires."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = call()

    def replay():
        graph.replay()
        return outputs

    replay.graph = graph  # keep the graph (and its memory pool) alive as long as the function
    return replay


def seconds_per_call(call: Callable[[], Any], device: torch.device, window_s: float, windows: int,
                     warmup: int) -> tuple[float, float, float, float]:
    """(first call s, median, min, max of seconds per call over `windows` windows of back-to-back calls)."""
    start = time.perf_counter()
    call()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        call()
    synchronize(device)
    start = time.perf_counter()
    call()
    synchronize(device)
    probe = time.perf_counter() - start
    calls = max(1, min(5000, round(window_s / max(probe, 1e-7))))
    per_call = []
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / calls)
    return first, statistics.median(per_call), min(per_call), max(per_call)


def matmul_gflops(device: torch.device, size: int, seconds: float = 1.0) -> float:
    """fp32 GFLOP/s of back-to-back size^3 matmuls (the TF32 switch off): the ceiling the loops are set against."""
    left, right = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    with precision(DEFAULTS):
        _, median, _, _ = seconds_per_call(lambda: left @ right, device, seconds / 5, 5, warmup=2)
    return 2 * size**3 / median / 1e9


def outputs_finite(outputs) -> bool:
    tensors = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs) if isinstance(outputs, (tuple, list)) else []
    return all(bool(torch.isfinite(t.float()).all()) for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


# ---------------------------------------------------------------------------------------------------------------------
# Our loops
# ---------------------------------------------------------------------------------------------------------------------
def random_transitions(device: torch.device, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Hopper-shaped random data on the device: normalised states, actions in [-1, 1], rewards, terminals."""
    def normal(*shape):
        return torch.randn(*shape, generator=generator).to(device)
    return {"states": normal(DATASET_SIZE, STATE_DIM), "next_states": normal(DATASET_SIZE, STATE_DIM),
            "actions": (torch.rand(DATASET_SIZE, ACTION_DIM, generator=generator) * 2 - 1).to(device),
            "rewards": normal(DATASET_SIZE), "terminals": (torch.rand(DATASET_SIZE, generator=generator) < 0.01).float().to(device)}


class CompiledOnce:
    """torch.compile'd versions of functions, made once per key so that the compile and compile + CUDA graph variants
    share one compilation (dynamic=False: each batch size gets its own static kernels)."""

    def __init__(self):
        self.compiled: dict[str, Callable] = {}

    def __call__(self, key: str, function: Callable) -> Callable:
        if key not in self.compiled:
            self.compiled[key] = torch.compile(function, dynamic=False)
        return self.compiled[key]


def eda_cases(device: torch.device, data: dict[str, torch.Tensor], train_variants, sample_variants) -> list[Case]:
    args = eda_d4rl.Args()  # paper network and settings
    sde = VPSDE()
    diffusion = Diffusion("dpm_solver++", steps=args.sampler_steps, sde=sde)
    compiled = CompiledOnce()
    states, actions = data["states"], data["actions"]
    low, high = -torch.ones(ACTION_DIM, device=device), torch.ones(ACTION_DIM, device=device)
    behavior = eda_d4rl.EnergyModel(STATE_DIM, ACTION_DIM, args, sde).to(device)
    frozen = eda_d4rl.EnergyModel(STATE_DIM, ACTION_DIM, args, sde).to(device).eval().requires_grad_(False)
    policy = copy.deepcopy(frozen).requires_grad_(True)  # eval(): dropout 0 during alignment, as in the script
    critic = TwinQ(STATE_DIM, ACTION_DIM, hidden=args.critic_hidden).to(device)
    critic_target = copy.deepcopy(critic).requires_grad_(False)
    value = ValueNet(STATE_DIM, hidden=args.critic_hidden).to(device)
    num_selected = 20_000
    candidate_actions = torch.rand(num_selected, args.K, ACTION_DIM, device=device) * 2 - 1
    candidate_q = torch.randn(num_selected, args.K, device=device)

    def behavior_case(batch: int) -> Case:
        def build(variant: Variant) -> Timed:
            behavior.train()
            optimizer = adam(behavior.parameters(), args.behavior_lr, variant)
            loss_fn = compiled(f"behavior{batch}", eda_d4rl.behavior_loss) if variant.compile else eda_d4rl.behavior_loss

            def step():
                index = torch.randint(DATASET_SIZE, (batch,), device=device)
                with autocast(variant, device):
                    loss = loss_fn(behavior, actions[index], states[index], sde)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                return loss.detach()
            return Timed(step)
        return Case("EDA", f"behavior step, batch {batch}", "ours", "steps/s", 1, train_variants, build,
                    f"f: {count_parameters(behavior):,} parameters")

    def critic_build(variant: Variant) -> Timed:
        optimizers = (adam(value.parameters(), args.critic_lr, variant), adam(critic.parameters(), args.critic_lr, variant))
        losses = compiled("critic", eda_d4rl.iql_losses) if variant.compile else eda_d4rl.iql_losses

        def step():  # the scripts' own IQL step (the same in all three)
            index = torch.randint(DATASET_SIZE, (args.critic_batch_size,), device=device)
            batch = (states[index], actions[index], data["rewards"][index], data["next_states"][index],
                     data["terminals"][index])
            with autocast(variant, device):
                return eda_d4rl.iql_update(critic, critic_target, value, batch, optimizers, args, losses)["q"]
        return Timed(step)

    def alignment_build(variant: Variant) -> Timed:
        optimizer = adam(policy.parameters(), args.align_lr, variant)
        loss_fn = compiled("alignment", eda_d4rl.alignment_loss) if variant.compile else eda_d4rl.alignment_loss

        def step():
            index = torch.randint(num_selected, (args.align_batch_size,), device=device)
            with autocast(variant, device):
                loss, _ = loss_fn(policy, frozen, states[index], candidate_actions[index], candidate_q[index], args, sde)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return loss.detach()
        return Timed(step)

    def sampling_model(model: eda_d4rl.EnergyModel, variant: Variant, key: str):
        """The model as sample_actions calls it (its noise_prediction), compiled for compiled variants."""
        if not variant.compile:
            return model
        return types.SimpleNamespace(noise_prediction=compiled(key, model.noise_prediction))

    def candidates_case(batch: int) -> Case:
        def build(variant: Variant) -> Timed:
            model = sampling_model(frozen, variant, f"candidates{batch}")
            batch_states = states[:batch]
            return Timed(lambda: eda_d4rl.generate_candidates(model, critic_target, diffusion, batch_states, args.K,
                                                              low, high))
        return Case("EDA", f"candidates, {batch} states x K {args.K} per call", "ours", "states/s", batch,
                    sample_variants, build)

    def action_case(envs: int) -> Case:
        def build(variant: Variant) -> Timed:
            model = sampling_model(policy, variant, f"act{envs}")
            observations = torch.randn(envs, STATE_DIM)  # what the environments return, on the host
            on_device = observations.to(device)
            n = args.num_candidates

            @torch.no_grad()
            def act():
                sampled = eda_d4rl.sample_actions(model, diffusion, on_device, n, low, high)
                q = eda_d4rl.min_q(critic_target, on_device.repeat_interleave(n, 0), sampled).view(envs, n)
                return sampled.view(envs, n, -1)[torch.arange(envs, device=device), q.argmax(-1)]

            def outer(call):
                return lambda: (on_device.copy_(observations), call().cpu())[1]
            return Timed(act, outer)
        return Case("EDA", f"evaluation action, {envs} envs, best of {args.num_candidates} by Q", "ours", "ms", 1,
                    sample_variants, build)

    return [behavior_case(256), Case("EDA", "IQL critic step, batch 256", "ours", "steps/s", 1, train_variants,
                                     critic_build),
            Case("EDA", f"alignment step, {args.align_batch_size} states x K {args.K}", "ours", "steps/s", 1,
                 train_variants, alignment_build),
            behavior_case(2048), candidates_case(256), candidates_case(1024), action_case(1), action_case(20)]


def dp_cases(device: torch.device, train_variants, sample_variants) -> list[Case]:
    """Diffusion Policy with the script's default (paper-scale) network, the paper's selection (highest Q) among 8 candidates,
    through the script's own foundation step and action selection."""
    args = dp_align.Args(selection="idql")
    diffusion = Diffusion(args.sampler, args.sample_steps, train_steps=args.train_steps, eta=args.eta,
                          prediction=args.prediction or None, clip_x0=1.0 if args.clip_sample else None)
    network = dp_align.build_denoiser(args, ACTION_DIM, args.obs_horizon * STATE_DIM).to(device)
    ema = copy.deepcopy(network).requires_grad_(False)
    critic_target, value = TwinQ(STATE_DIM, ACTION_DIM, args.critic_hidden).to(device), ValueNet(STATE_DIM).to(device)
    size = DATASET_SIZE // 10  # one long episode of random transitions
    transitions = dp_align.Transitions(
        observations=torch.randn(size, STATE_DIM, device=device), actions=torch.rand(size, ACTION_DIM, device=device) * 2 - 1,
        rewards=torch.randn(size, device=device), next_observations=torch.randn(size, STATE_DIM, device=device),
        terminals=torch.zeros(size, device=device), episode_first=torch.zeros(size, dtype=torch.long, device=device),
        episode_last=torch.full((size,), size - 1, device=device))
    space = dp_align.ChunkSpace(args, diffusion, transitions, critic_target, ACTION_DIM)
    compiled = CompiledOnce()

    def train_build(variant: Variant) -> Timed:
        optimizer = adam(network.parameters(), args.foundation_lr, variant)
        model = compiled("train", network) if variant.compile else network

        def step():
            with autocast(variant, device):
                return dp_align.foundation_step(space, model, network, ema, optimizer, args)["loss"]
        return Timed(step)

    def action_build(variant: Variant) -> Timed:
        model = compiled("act", ema) if variant.compile else ema
        history = torch.randn(1, args.obs_horizon * STATE_DIM)
        cond = history.to(device)

        def outer(call):
            return lambda: (cond.copy_(history), call().cpu())[1]
        return Timed(lambda: dp_align.select_chunks(space, model, None, value, cond), outer)

    parameters = f"{args.backbone} hidden {args.hidden}, depth {args.depth}: {count_parameters(network):,} parameters"
    return [Case("DP", f"foundation step, batch {args.batch_size}", "ours", "steps/s", 1, train_variants, train_build,
                 parameters),
            Case("DP", f"action, {args.num_candidates} candidates x {args.sample_steps} {args.sampler} steps, 1 env",
                 "ours", "ms", 1, sample_variants, action_build, parameters)]


DIFFUSER_SHAPE = dict(horizon=32, sample_steps=20, train_steps=20, num_candidates=16, unet_base_dim=32,
                      unet_dim_mults=(1, 2, 4))


def diffuser_cases(device: torch.device, train_variants, sample_variants) -> list[Case]:
    """The hopper-sized planner through the script's own foundation step and Planner.act."""
    args = diffuser_align.Args(env="hopper-medium-v2", planner="diffuser", sampler="ddpm", **DIFFUSER_SHAPE)
    unet = TemporalUNet(STATE_DIM + ACTION_DIM, args.horizon, 0, args.unet_base_dim, args.unet_dim_mults).to(device)
    critic = TwinQ(STATE_DIM, ACTION_DIM, 256).to(device).requires_grad_(False)
    planner = diffuser_align.Planner(args, diffuser_align.make_diffusion(args), unet, critic, STATE_DIM, ACTION_DIM)
    size = DATASET_SIZE // 10
    offline = {"observations": torch.randn(size, STATE_DIM, device=device),
               "actions": torch.rand(size, ACTION_DIM, device=device) * 2 - 1,
               "episode_last": torch.full((size,), size - 1, device=device)}
    space = diffuser_align.PlanSpace(args, planner, offline)
    compiled = CompiledOnce()

    def train_build(variant: Variant) -> Timed:
        unet.train()
        optimizer = adam(unet.parameters(), args.foundation_lr, variant)
        model = compiled("train", unet) if variant.compile else unet

        def step():
            with autocast(variant, device):
                return diffuser_align.foundation_step(space, model, optimizer, args)["loss"]
        return Timed(step)

    def plan_build(variant: Variant) -> Timed:
        unet.eval()
        planner.compiled = CompiledModules(variant.compile)
        observation = torch.randn(1, STATE_DIM)
        state = observation.to(device)

        def outer(call):
            return lambda: (state.copy_(observation), call().cpu())[1]
        return Timed(lambda: planner.act(state)[0], outer)

    note = (f"temporal U-Net, horizon {args.horizon}, base {args.unet_base_dim}, mults {args.unet_dim_mults}: "
            f"{count_parameters(unet):,} parameters")
    return [Case("Diffuser", f"training step, batch {args.batch_size}", "ours", "steps/s", 1, train_variants,
                 train_build, note),
            Case("Diffuser", f"planning, {args.num_candidates} plans x {args.sample_steps} DDPM steps, 1 env", "ours",
                 "ms", 1, sample_variants, plan_build, note)]


# ---------------------------------------------------------------------------------------------------------------------
# The other projects, imported unchanged from their checkouts
# ---------------------------------------------------------------------------------------------------------------------
def load_from_checkout(path: Path, name: str) -> types.ModuleType:
    """Load the module (a .py file) or package (a folder) at `path` under the top-level `name` it has in its own
    project, so that its imports of its sibling files and submodules resolve to the checkout."""
    if path.is_dir():
        spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    else:
        spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def import_authors_eda(checkout: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """BDiffusion and utils of the authors' EDA code. Its files import each other by top-level name (model imports
    dpm_solver_pytorch, BDiffusion imports model), so they are loaded in that order. `utils.py` imports d4rl and
    gym (old gym) at the top but uses them only in functions we do not call: where they are not installed, empty
    stand-ins let it load."""
    for missing in ("d4rl", "gym"):
        if missing not in sys.modules and importlib.util.find_spec(missing) is None:
            sys.modules[missing] = types.ModuleType(missing)
    for name in ("dpm_solver_pytorch", "model", "utils", "BDiffusion"):
        load_from_checkout(checkout / f"{name}.py", name)
    return sys.modules["BDiffusion"], sys.modules["utils"]


def official_eda_cases(checkout: Path, device: torch.device, data: dict[str, torch.Tensor], workdir: Path) -> list[Case]:
    """The authors' EDA code (hopper, its defaults: MLPResNet with 3 blocks, dropout 0.1, linear VP-SDE, 15-step
    DPM-Solver, IQL critic), timed through its own update and sampling methods on the same tensors as ours."""
    bdiffusion, official_utils = import_authors_eda(checkout)
    args = types.SimpleNamespace(device=str(device), env="hopper-medium-v2", model_type="MLPResNet", actor_blocks=3,
                                 dropout_rate=0.1, critic_type="IQL", q_layer=2, alpha=3.0, beta=0.2, M=16)
    marginal_prob_std = functools.partial(official_utils.marginal_prob_std, device=str(device), beta_1=20.0)
    x_dim = STATE_DIM + ACTION_DIM
    behavior = bdiffusion.BDiffusion_Behavior(input_dim=x_dim, output_dim=ACTION_DIM,
                                              marginal_prob_std=marginal_prob_std, args=args)
    checkpoint = workdir / "official_behavior.pt"
    torch.save(behavior.state_dict(), checkpoint)
    eda = bdiffusion.EDA_policy(input_dim=x_dim, output_dim=ACTION_DIM, marginal_prob_std=marginal_prob_std,
                                actor_load_path=str(checkpoint), args=args)
    critic = eda.q[0]
    states, actions = data["states"], data["actions"]
    fake_actions = torch.rand(20_000, args.M, ACTION_DIM, device=device) * 2 - 1
    # the authors' dataset holds rewards and done flags as (N, 1) columns
    rewards, terminals = data["rewards"][:, None], data["terminals"][:, None]

    def behavior_case(batch: int) -> Case:
        def build(variant: Variant) -> Timed:
            def step():
                index = torch.randint(DATASET_SIZE, (batch,), device=device)
                behavior.update_behavior({"a": actions[index], "s": states[index]})
            return Timed(step)
        return Case("EDA", f"behavior step, batch {batch}", "authors' EDA code", "steps/s", 1, SHIPPED_VARIANTS,
                    build, "BDiffusion_Behavior.update_behavior")

    def critic_build(variant: Variant) -> Timed:
        def step():
            index = torch.randint(DATASET_SIZE, (256,), device=device)
            critic.update_q0({"s": states[index], "a": actions[index], "r": rewards[index],
                              "s_": data["next_states"][index], "d": terminals[index]})
        return Timed(step)

    def shipped_alignment_build(variant: Variant) -> Timed:
        def step():
            index = torch.randint(len(fake_actions), (256,), device=device)
            eda.update_policy({"s": states[index], "fake_a": fake_actions[index]})
        return Timed(step)

    def alignment_with_gradients_build(variant: Variant) -> Timed:
        """EDA_policy.update_policy takes the policy's energy under torch.no_grad, so its loss has no gradient and
        backward() raises. This is its computation with that energy taken with gradients, on the authors' networks,
        critic and optimizer, reading the loss back to the host every step as the shipped method does."""
        def step():
            index = torch.randint(len(fake_actions), (256,), device=device)
            candidates, batch_states = fake_actions[index], states[index]
            repeated_states = batch_states.unsqueeze(1).expand(-1, args.M, -1)
            q = eda.q[0].q0_target(candidates, repeated_states).detach().squeeze()
            eda.diffusion_policy.train()
            t = (torch.rand(len(index), device=device) * (1.0 - 1e-3) + 1e-3).unsqueeze(1).expand(-1, args.M)
            noise = torch.randn_like(candidates)
            alpha_t, std = eda.marginal_prob_std(t)
            perturbed = candidates * alpha_t[..., None] + noise * std[..., None]
            with torch.no_grad():
                baseline = eda.diffusion_behavior.get_energy(perturbed, t, repeated_states)
            logits = args.beta * (eda.diffusion_policy.get_energy(perturbed, t, repeated_states) - baseline)
            loss = -torch.mean(torch.sum(torch.softmax(q * args.alpha, 1) * torch.log_softmax(logits, 1), -1))
            eda.diffusion_optimizer.zero_grad()
            loss.backward()
            eda.diffusion_optimizer.step()
            return loss.detach().mean().cpu().item()
        return Timed(step)

    def candidates_case(batch: int) -> Case:
        def build(variant: Variant) -> Timed:
            batch_states = states[:batch].cpu().numpy()  # ScoreNet_IDQL.sample takes numpy states
            return Timed(lambda: eda.diffusion_behavior.sample(batch_states, sample_per_state=args.M,
                                                               diffusion_steps=15))
        return Case("EDA", f"candidates, {batch} states x K {args.M} per call", "authors' EDA code", "states/s",
                    batch, SHIPPED_VARIANTS, build, "ScoreNet_IDQL.sample (15-step DPM-Solver, order 2)")

    def action_case(envs: int) -> Case:
        def build(variant: Variant) -> Timed:
            observations = torch.randn(envs, STATE_DIM)
            return Timed(lambda: eda.select_actions_sfbc(observations, diffusion_steps=15, sample_per_state=4,
                                                         base="policy"))
        return Case("EDA", f"evaluation action, {envs} envs, best of 4 by Q", "authors' EDA code", "ms", 1,
                    SHIPPED_VARIANTS, build, "EDA_policy.select_actions_sfbc")

    return [behavior_case(256),
            Case("EDA", "IQL critic step, batch 256", "authors' EDA code", "steps/s", 1, SHIPPED_VARIANTS,
                 critic_build, "IQL_Critic.update_q0"),
            Case("EDA", "alignment step, 256 states x K 16", "authors' EDA code", "steps/s", 1, SHIPPED_VARIANTS,
                 shipped_alignment_build, "EDA_policy.update_policy, unchanged"),
            Case("EDA", "alignment step, 256 states x K 16", "authors' EDA code, policy energy with gradients",
                 "steps/s", 1, SHIPPED_VARIANTS, alignment_with_gradients_build,
                 "update_policy's computation on the authors' modules, policy energy taken with gradients"),
            behavior_case(2048), candidates_case(256), candidates_case(1024), action_case(1), action_case(20)]


def cleandiffuser_cases(checkout: Path, device: torch.device) -> list[Case]:
    """CleanDiffuser's Diffuser (DiscreteDiffusionSDE + JannerUNet1d, x0 prediction, 20 diffusion steps, DDPM
    solver, as its diffuser_d4rl_mujoco pipeline) with our planner's U-Net size (model_dim 32, dim_mult 1-2-4,
    kernel 5) and horizon 32, timed through its own update and sample methods."""
    load_from_checkout(checkout / "cleandiffuser", "cleandiffuser")
    diffusion_module, nn_diffusion, nn_classifier, classifier_module = (importlib.import_module(f"cleandiffuser.{name}")
                                                                        for name in ("diffusion", "nn_diffusion",
                                                                                     "nn_classifier", "classifier"))
    horizon, x_dim, plans = DIFFUSER_SHAPE["horizon"], STATE_DIM + ACTION_DIM, DIFFUSER_SHAPE["num_candidates"]
    dim_mult = list(DIFFUSER_SHAPE["unet_dim_mults"])
    fix_mask = torch.zeros(horizon, x_dim)
    fix_mask[0, :STATE_DIM] = 1.0
    loss_weight = torch.ones(horizon, x_dim)
    loss_weight[0, STATE_DIM:] = 10.0  # the pipeline's action_loss_weight

    def make_agent(with_guidance: bool):
        network = nn_diffusion.JannerUNet1d(x_dim, model_dim=32, emb_dim=32, dim_mult=dim_mult,
                                            timestep_emb_type="positional", attention=False, kernel_size=5)
        classifier = None
        if with_guidance:  # the pipeline's value guidance: a half U-Net regressing the return, w_cg 0.2 for hopper
            classifier = classifier_module.CumRewClassifier(
                nn_classifier.HalfJannerUNet1d(horizon, x_dim, out_dim=1, model_dim=32, emb_dim=32, dim_mult=dim_mult,
                                               timestep_emb_type="positional", kernel_size=3), device=device)
        agent = diffusion_module.DiscreteDiffusionSDE(network, None, fix_mask=fix_mask, loss_weight=loss_weight,
                                                      classifier=classifier, ema_rate=0.9999, device=device,
                                                      diffusion_steps=20, predict_noise=False)
        return agent, count_parameters(network)

    agent, parameters = make_agent(with_guidance=False)
    windows = torch.randn(DATASET_SIZE // 10, horizon, x_dim, device=device)

    def train_build(variant: Variant) -> Timed:
        agent.train()
        return Timed(lambda: agent.update(windows[torch.randint(len(windows), (256,), device=device)]))

    def plan_build(variant: Variant, planning_agent, guidance: float) -> Timed:
        planning_agent.eval()
        observation = torch.randn(1, STATE_DIM)

        def plan():
            prior = torch.zeros(plans, horizon, x_dim, device=device)
            prior[:, 0, :STATE_DIM] = observation.to(device)
            trajectories, log = planning_agent.sample(prior, solver="ddpm", n_samples=plans, sample_steps=20,
                                                      use_ema=True, w_cg=guidance, temperature=0.5)
            best = log["log_p"].view(plans, -1).sum(-1).argmax() if guidance else 0
            return trajectories[best, 0, STATE_DIM:].clip(-1.0, 1.0).cpu()
        return Timed(plan)

    guided_agent, _ = make_agent(with_guidance=True)
    note = f"JannerUNet1d, model_dim 32, dim_mult {tuple(dim_mult)}: {parameters:,} parameters"
    return [Case("Diffuser", "training step, batch 256", "CleanDiffuser", "steps/s", 1, SHIPPED_VARIANTS, train_build,
                 note + "; DiscreteDiffusionSDE.update"),
            Case("Diffuser", f"planning, {plans} plans x 20 DDPM steps, 1 env", "CleanDiffuser", "ms", 1,
                 SHIPPED_VARIANTS, lambda variant: plan_build(variant, agent, 0.0),
                 note + "; DiscreteDiffusionSDE.sample without guidance, like our planner"),
            Case("Diffuser", f"planning, {plans} plans x 20 DDPM steps, 1 env", "CleanDiffuser, value guidance",
                 "ms", 1, SHIPPED_VARIANTS, lambda variant: plan_build(variant, guided_agent, 0.2),
                 "as its hopper pipeline plans: classifier guidance w_cg 0.2, best plan by the classifier")]


# ---------------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------------
class Benchmark:
    def __init__(self, options: argparse.Namespace, device: torch.device):
        self.options, self.device = options, device
        self.environment = environment(device, options)
        self.deadline = time.monotonic() + options.budget_s if options.budget_s else math.inf
        self.rows: list[Row] = []

    def measure(self, case: Case, variant: Variant) -> Row:
        row = Row(case.group, case.loop, case.implementation, variant.name, case.unit, note=case.note)
        if time.monotonic() > self.deadline:
            row.note = "skipped: the run's time budget was spent"
            return row
        try:
            with precision(variant):
                if self.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(self.device)
                timed = case.build(variant)
                call = cuda_graph(timed.call) if variant.graph else timed.call
                outer = timed.outer(call) if timed.outer else call
                first, median, fastest, slowest = seconds_per_call(outer, self.device, self.options.window_s,
                                                                   self.options.windows, self.options.warmup)
                if not outputs_finite(outer()):
                    row.note = "non-finite output; " + row.note
        except Exception as error:  # a variant that cannot run is reported, not fatal: the other rows still count
            traceback.print_exc()
            row.note = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200] if str(error).strip() else ''}"
            return row
        finally:
            gc.collect()
        row.ms_per_call, row.ms_range, row.first_call_s = 1000 * median, (1000 * fastest, 1000 * slowest), first
        row.value = row.ms_per_call if case.unit == "ms" else case.per_call / median
        if self.device.type == "cuda":
            row.peak_memory_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        return row

    def run(self, cases: list[Case]) -> None:
        """Every case's variants without torch.compile first, then the compiled ones (slow to start); the matmul
        rate before and after."""
        size = 4096 if self.device.type == "cuda" else 1024
        self.environment["matmul_gflops"] = [matmul_gflops(self.device, size)]
        for compiled in (False, True):
            for case in cases:
                for variant in case.variants:
                    if variant.compile != compiled:
                        continue
                    row = self.measure(case, variant)
                    self.rows.append(row)
                    value = f"{row.value:.4g} {row.unit}" if not math.isnan(row.value) else row.note
                    print(f"{case.group:9s} {case.loop:55s} {case.implementation:28s} {variant.name:34s} {value}",
                          flush=True)
                    self.write()
        self.environment["matmul_gflops"].append(matmul_gflops(self.device, size))

    # ----- reporting ------------------------------------------------------------------------------------------------
    def results(self) -> dict:
        """Everything the report is made from: where and how it was measured, and the rows."""
        return {"environment": self.environment, "rows": [asdict(row) for row in self.rows]}

    def write(self) -> None:
        if self.options.json:
            Path(self.options.json).write_text(json.dumps(self.results(), indent=1))
        if self.options.out:
            Path(self.options.out).write_text(report(self.results()))


def environment(device: torch.device, options: argparse.Namespace) -> dict:
    info = {"torch": torch.__version__, "device": str(device), "commit": options.commit or git_commit(),
            "python": sys.version.split()[0], "command": "python -m benchmarks.speed " + " ".join(options.argv),
            "windows": options.windows, "window_s": options.window_s, "warmup": options.warmup}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["cpu_threads"] = torch.get_num_threads()
    return info


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def best_row(rows: list[Row], loop: str, implementation: str, shipped_only: bool = False) -> Row | None:
    """The fastest measured row of one loop and implementation (highest rate, or lowest latency)."""
    candidates = [row for row in rows if row.loop == loop and row.implementation == implementation
                  and not math.isnan(row.value) and not row.note.startswith("non-finite")
                  and (not shipped_only or row.variant == SHIPPED_VARIANTS[0].name)]
    if not candidates:
        return None
    return (min if candidates[0].unit == "ms" else max)(candidates, key=lambda row: row.value)


def comparisons(rows: list[Row]) -> list[str]:
    """Ours (fastest variant) against the other code as shipped (torch defaults), loop by loop."""
    lines = []
    pairs = [("EDA", "behavior step, batch 256", "authors' EDA code"),
             ("EDA", "behavior step, batch 2048", "authors' EDA code"),
             ("EDA", "IQL critic step, batch 256", "authors' EDA code"),
             ("EDA", "alignment step, 256 states x K 16", "authors' EDA code, policy energy with gradients"),
             ("EDA", "candidates, 1024 states x K 16 per call", "authors' EDA code"),
             ("EDA", "evaluation action, 20 envs, best of 4 by Q", "authors' EDA code"),
             ("Diffuser", "training step, batch 256", "CleanDiffuser"),
             ("Diffuser", "planning, 16 plans x 20 DDPM steps, 1 env", "CleanDiffuser"),
             ("Diffuser", "planning, 16 plans x 20 DDPM steps, 1 env", "CleanDiffuser, value guidance")]
    for group, loop, other in pairs:
        ours, theirs = best_row(rows, loop, "ours"), best_row(rows, loop, other, shipped_only=True)
        if ours is None or theirs is None:
            continue
        if ours.unit == "ms":
            ratio = f"{theirs.value / ours.value:.2f}x lower latency ({ours.value:.3g} ms vs {theirs.value:.3g} ms)"
        else:
            ratio = f"{ours.value / theirs.value:.2f}x the rate ({ours.value:.4g} vs {theirs.value:.4g} {ours.unit})"
        lines.append(f"| {group} | {loop} | {other} | {ours.variant} | {ratio} |")
    return lines


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def paper_scale_eda_hours(rows: list[Row]) -> list[str]:
    """EDA at paper scale from the fastest measured rates: 1M behavior steps at batch 2048, 1.5M critic
    steps at 256, 16 candidates for each of hopper-medium's ~1M states, 200k alignment steps, and 4 evaluations of
    20 episodes x 1000 steps (20 environments stepped together)."""
    parts = [("behavior, 1M steps at batch 2048", "behavior step, batch 2048", 1_000_000),
             ("critic, 1.5M steps at batch 256", "IQL critic step, batch 256", 1_500_000),
             ("candidates, 1M states x 16", "candidates, 1024 states x K 16 per call", 1_000_000),
             ("alignment, 200k steps", "alignment step, 256 states x K 16", 200_000)]
    lines, total = [], 0.0
    for label, loop, amount in parts:
        row = best_row(rows, loop, "ours")
        if row is None:
            return []
        seconds = amount / row.value
        total += seconds
        lines.append(f"| {label} | {row.variant} | {row.value:.4g} {row.unit} | {duration(seconds)} |")
    action = best_row(rows, "evaluation action, 20 envs, best of 4 by Q", "ours")
    if action is not None:
        seconds = 4 * 1000 * action.value / 1000  # network time only; MuJoCo stepping comes on top
        total += seconds
        lines.append(f"| evaluation, 4 x 20 episodes x 1000 steps (network only) | {action.variant} | "
                     f"{action.value:.3g} ms per step of 20 envs | {duration(seconds)} |")
    lines.append(f"| **total** | | | **{duration(total)}** |")
    return lines


def report(results: dict) -> str:
    """The markdown report of a run (or of its JSON file): one table per script, the comparisons, the paper-scale
    EDA estimate."""
    env, rows = results["environment"], [Row(**{**row, "ms_range": tuple(row["ms_range"])}) for row in results["rows"]]
    where = (f"{env.get('gpu')}, driver {env.get('driver', '?')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}"
             if env["device"].startswith("cuda") else f"CPU, {env.get('cpu_threads')} torch thread(s)")
    lines = [f"# Speed on {where}", "",
             f"torch {env['torch']}, Python {env['python']}, commit `{env['commit']}`. Measured by `{env['command']}`.",
             "",
             "Random hopper-shaped tensors (11-d states, 3-d actions) kept on the device; every value is the median "
             f"over {env['windows']} windows of back-to-back calls (~{env['window_s']} s each) after {env['warmup']} "
             "warm-up calls, with the range over the windows. 'First call' includes torch.compile's compilation and "
             "CUDA graph capture. Latencies include copying the observation to the device and the action back. TF32: "
             "float32 matmuls on TF32 tensor cores (`torch.set_float32_matmul_precision('high')`); cuDNN convolutions "
             "use TF32 in every row (torch's default).", ""]
    if env.get("matmul_gflops"):
        lines += ["fp32 matmul rate of this device, before and after the loops: "
                  + " and ".join(f"{value:.0f}" for value in env["matmul_gflops"]) + " GFLOP/s.", ""]
    header = ["| loop | implementation | variant | rate or latency | ms per call (range) | first call (s) | "
              "peak memory (MiB) | note |", "|---|---|---|---|---|---|---|---|"]
    for group in dict.fromkeys(row.group for row in rows):
        lines += [f"## {group}", "", *header]
        loops = list(dict.fromkeys(row.loop for row in rows if row.group == group))  # in the order measured
        ordered = sorted((row for row in rows if row.group == group),
                         key=lambda row: (loops.index(row.loop), row.implementation != "ours", row.implementation))
        for row in ordered:
            value = "-" if math.isnan(row.value) else f"{row.value:.4g} {row.unit}"
            timing = "-" if math.isnan(row.ms_per_call) else (
                f"{row.ms_per_call:.3g} ({row.ms_range[0]:.3g}-{row.ms_range[1]:.3g})")
            first = "-" if math.isnan(row.first_call_s) else f"{row.first_call_s:.2g}"
            memory = "-" if math.isnan(row.peak_memory_mib) else f"{row.peak_memory_mib:.0f}"
            lines.append(f"| {row.loop} | {row.implementation} | {row.variant} | {value} | {timing} | {first} | "
                         f"{memory} | {row.note} |")
        lines.append("")
    compared = comparisons(rows)
    if compared:
        lines += ["## Ours against the other code", "",
                  "Our fastest variant against the other code as shipped (torch defaults).", "",
                  "| group | loop | against | our variant | ratio |", "|---|---|---|---|---|", *compared, ""]
    hours = paper_scale_eda_hours(rows)
    if hours:
        lines += ["## EDA at paper scale on this device", "",
                  "Extrapolated from the fastest measured rate of each stage's loop (hopper shapes; MuJoCo stepping "
                  "during evaluation not included).", "",
                  "| stage | variant | rate | time |", "|---|---|---|---|", *hours, ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The scripts end to end (--scripts-on)
# ---------------------------------------------------------------------------------------------------------------------
SCRIPT_SHORT_STAGES = {  # a few thousand steps: the numbers are speeds, not returns
    "eda_d4rl": ["--behavior-steps", "2000", "--critic-steps", "2000", "--data-ratio", "0.05", "--align-steps", "2000",
                 "--eval-every", "0", "--eval-episodes", "2", "--eval-max-steps", "100", "--log-every", "500"],
    "dp_align": ["--foundation-steps", "1000", "--critic-steps", "1000", "--align", "rl", "--rl-steps", "20",
                 "--eval-episodes", "2", "--eval-max-steps", "100"],
    "diffuser_align": ["--foundation-steps", "1000", "--critic-steps", "1000", "--align", "qvpg", "--qvpg-steps", "20",
                       "--horizon", "32", "--eval-episodes", "2", "--eval-max-steps", "100"],
}
SCRIPT_MODES = {"eager": ["--no-cuda-graphs"], "CUDA graphs": [], "CUDA graphs + compile": ["--compile"]}


def time_scripts(options: argparse.Namespace) -> None:
    """Run every script in every mode on one dataset and tabulate the `throughput` block of each summary.json."""
    rows, commands = [], []
    for mode in options.modes.split(","):
        for script in options.scripts.split(","):
            run_dir = options.runs / f"{script}__{mode.replace(' ', '_').replace('+', 'and')}"
            command = [sys.executable, f"{script}.py", "--env", options.scripts_on, "--device", options.device,
                       "--seed", "0", "--run-dir", str(run_dir), *SCRIPT_SHORT_STAGES[script], *SCRIPT_MODES[mode]]
            commands.append(shlex.join(["python", *command[1:]]))
            started = time.perf_counter()
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=options.timeout_s, cwd=REPO)
                failure = "" if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
            except subprocess.TimeoutExpired:
                failure = f"timed out after {options.timeout_s:.0f} s"
            summary = run_dir / "summary.json"
            throughput = json.loads(summary.read_text())["throughput"] if summary.exists() and not failure else {}
            rows.append({"script": script, "mode": mode, "wall_s": time.perf_counter() - started, "failure": failure,
                         **throughput})
            print(json.dumps(rows[-1]), flush=True)
    keys = sorted({key for row in rows for key in row} - {"script", "mode", "wall_s", "failure"})
    lines = ["| script | mode | wall (s) | " + " | ".join(keys) + " | failure |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for row in rows:
        cells = [f"{row[key]:.4g}" if isinstance(row.get(key), float) else "-" for key in keys]
        lines.append(f"| {row['script']} | {row['mode']} | {row['wall_s']:.0f} | " + " | ".join(cells)
                     + f" | {row['failure']} |")
    text = "\n".join(lines + ["", "Commands:", "", "```bash", *commands, "```", ""])
    print(text)
    if options.out:
        Path(options.out).write_text(text)
    if options.json:
        Path(options.json).write_text(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--official-eda", type=Path, help="checkout of thu-ml/Efficient-Diffusion-Alignment")
    parser.add_argument("--cleandiffuser", type=Path, help="checkout of CleanDiffuserTeam/CleanDiffuser")
    parser.add_argument("--groups", default="EDA,DP,Diffuser", help="comma-separated subset of EDA, DP, Diffuser")
    parser.add_argument("--variants", default="", help="comma-separated variant names to run (default: all that "
                                                        "the device supports)")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip the rows not started after this many "
                                                                    "seconds (0: no limit)")
    parser.add_argument("--window-s", type=float, default=0.2, help="length of one timing window")
    parser.add_argument("--windows", type=int, default=5, help="timing windows per row (the median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", help="write every row here as it is measured")
    parser.add_argument("--out", help="markdown report, rewritten after every row")
    parser.add_argument("--commit", default="", help="commit to name in the report (default: git rev-parse)")
    parser.add_argument("--from-json", type=Path, help="measure nothing: rewrite --out from a JSON file of a run")
    parser.add_argument("--scripts-on", metavar="DATASET", help="time the scripts end to end on DATASET instead")
    parser.add_argument("--scripts", default="eda_d4rl,dp_align,diffuser_align", help="with --scripts-on: which")
    parser.add_argument("--modes", default="CUDA graphs,eager", help="with --scripts-on, comma-separated from: "
                                                                      + ", ".join(SCRIPT_MODES))
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "speed", help="with --scripts-on: run folders")
    parser.add_argument("--timeout-s", type=float, default=600, help="with --scripts-on: limit per run")
    options = parser.parse_args(argv)
    options.argv = sys.argv[1:] if argv is None else argv
    if options.from_json:
        text = report(json.loads(options.from_json.read_text()))
        Path(options.out).write_text(text) if options.out else print(text)
        return
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but no CUDA device is available")
    if options.scripts_on:
        unknown = set(options.scripts.split(",")) - set(SCRIPT_SHORT_STAGES) or set(options.modes.split(",")) - set(SCRIPT_MODES)
        if unknown:
            parser.error(f"unknown --scripts or --modes entries: {', '.join(sorted(unknown))}")
        return time_scripts(options)
    if options.threads:
        torch.set_num_threads(options.threads)
    groups = set(options.groups.split(","))
    if not groups <= {"EDA", "DP", "Diffuser"}:
        parser.error(f"--groups takes EDA, DP and Diffuser, got {options.groups!r}")
    torch.manual_seed(0)

    def supported(variants: list[Variant]) -> list[Variant]:
        """CUDA graphs and TF32 need a GPU; on the CPU only the eager default runs (compile is minutes there)."""
        chosen = variants if device.type == "cuda" else [v for v in variants if not (v.graph or v.tf32 or v.compile
                                                                                        or v.fused_adam)]
        if options.variants:
            names = set(options.variants.split(","))
            chosen = [v for v in chosen if v.name in names or v in SHIPPED_VARIANTS]
        return chosen

    train_variants, sample_variants = supported(TRAIN_VARIANTS), supported(SAMPLE_VARIANTS)
    data = random_transitions(device, torch.Generator().manual_seed(0))
    cases: list[Case] = []
    with tempfile.TemporaryDirectory() as workdir:
        if "EDA" in groups:
            cases += eda_cases(device, data, train_variants, sample_variants)
            if options.official_eda:
                cases += [replace_variants(case, supported(case.variants))
                          for case in official_eda_cases(options.official_eda, device, data, Path(workdir))]
        if "Diffuser" in groups:
            cases += diffuser_cases(device, train_variants, sample_variants)
            if options.cleandiffuser:
                cases += [replace_variants(case, supported(case.variants))
                          for case in cleandiffuser_cases(options.cleandiffuser, device)]
        if "DP" in groups:
            cases += dp_cases(device, train_variants, sample_variants)
        benchmark = Benchmark(options, device)
        benchmark.run(priority_order(cases))
    benchmark.write()
    print(report(benchmark.results()))


def replace_variants(case: Case, variants: list[Variant]) -> Case:
    case.variants = variants
    return case


def priority_order(cases: list[Case]) -> list[Case]:
    """The loops the project's speed goals name first (EDA behavior and alignment at batch 256, planning latency),
    each ours next to the other code, so that a run cut short by its budget has the comparisons that matter."""
    first = ["behavior step, batch 256", "alignment step, 256 states x K 16",
             "planning, 16 plans x 20 DDPM steps, 1 env", "IQL critic step, batch 256"]
    return sorted(cases, key=lambda case: first.index(case.loop) if case.loop in first else len(first))


if __name__ == "__main__":
    main()
