"""Speed of diffuser_align.py's planner with a Hopper-sized temporal U-Net: training steps/s and planning latency.

Planning latency is one environment step of the evaluation policy: 16 plans from one state, 20 denoising steps,
in-painting, twin-Q scoring and selection (Planner.act). Writes benchmark_results/diffuser_speed.md.

    python benchmark_results/diffuser_speed.py --threads 1 2
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import diffuser_align as da  # noqa: E402
from benchmark_results.runner import device_name, git_commit  # noqa: E402
from common.nets import TemporalUNet, TwinQ, count_parameters  # noqa: E402
from common.runtime import cli  # noqa: E402


@dataclass
class Args:
    threads: tuple[int, ...] = (1, 2)
    """torch intra-op thread counts to measure (the target machine has 2 CPU cores)"""
    state_dim: int = 11
    """Hopper observation size"""
    action_dim: int = 3
    """Hopper action size"""
    batch_size: int = 256
    """windows per training step"""
    train_steps: int = 30
    """timed training steps (after 3 warm-up steps)"""
    plan_repeats: int = 30
    """timed planning calls (after 3 warm-up calls); the median is reported"""
    device: str = "cpu"
    """cpu or cuda (on cuda the thread count only affects the host side)"""
    output: str = str(REPO / "benchmark_results" / "diffuser_speed.md")
    """markdown file to write"""


def measure(args: Args, threads: int) -> dict:
    """Training steps/s and planning latency with `threads`, by wall clock and by this process's CPU time.

    On a shared machine the wall clock counts time spent waiting for a core; with one thread, CPU time is what the
    wall clock would be on an idle core."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    planner_args = da.Args(env="hopper-medium-v2", planner="diffuser", sampler="ddpm", horizon=32, denoising_steps=20,
                           num_plans=16, unet_base_dim=32, unet_dim_mults=(1, 2, 4))
    x_dim = args.state_dim + args.action_dim
    unet = TemporalUNet(x_dim, planner_args.horizon, 0, planner_args.unet_base_dim, planner_args.unet_dim_mults).to(device)
    critic = TwinQ(args.state_dim, args.action_dim, 256).requires_grad_(False).to(device)
    diffusion = da.make_diffusion(planner_args)
    planner = da.Planner(planner_args, diffusion, unet, critic, args.state_dim, args.action_dim)

    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    windows = torch.randn(args.batch_size, planner_args.horizon, x_dim, device=device)

    def train_step() -> None:
        known = da.random_prefix_masks(len(windows), planner_args.horizon, args.state_dim, x_dim, device)
        loss = diffusion.loss(unet, windows, None, mask=~known, known=known).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        train_step()
    synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.train_steps):
        train_step()
    synchronize()
    train_steps_per_s = args.train_steps / (time.perf_counter() - start)
    train_cpu_steps_per_s = args.train_steps / (time.process_time() - cpu_start)

    unet.eval()
    state = torch.randn(1, args.state_dim, device=device)
    result = dict(train_steps_per_s=train_steps_per_s, train_cpu_steps_per_s=train_cpu_steps_per_s,
                  parameters=count_parameters(unet))
    for mode in ("eager", "compiled"):
        planner.compile = mode == "compiled"  # what diffuser_align.py --compile does when planning
        for _ in range(3):  # warm-up (and, compiled, the compilation itself)
            planner.act(state)
        latencies, cpu_times = [], []
        for _ in range(args.plan_repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            planner.act(state)
            synchronize()
            latencies.append((time.perf_counter() - start) * 1000)
            cpu_times.append((time.process_time() - cpu_start) * 1000)
        result.update({f"{mode}_ms": float(np.median(latencies)), f"{mode}_p90_ms": float(np.percentile(latencies, 90)),
                       f"{mode}_cpu_ms": float(np.median(cpu_times))})
    return result


def main(args: Args) -> None:
    rows = []
    for threads in args.threads:
        result = measure(args, threads)
        parameters = result["parameters"]
        rows.append(f"| {threads} | {result['train_steps_per_s']:.2f} | {result['train_cpu_steps_per_s']:.2f} | "
                    + " | ".join(f"{result[f'{mode}_ms']:.1f} | {result[f'{mode}_p90_ms']:.1f} | {result[f'{mode}_cpu_ms']:.1f}"
                                 for mode in ("eager", "compiled")) + " |")
        print(rows[-1])
    table = "\n".join(rows)
    commit = git_commit()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = f"""# diffuser_align.py speed (Hopper-sized planner)

Temporal U-Net: horizon 32, {args.state_dim}-d states + {args.action_dim}-d actions, base_dim 32, dim_mults (1, 2, 4),
{parameters:,} parameters; DDPM (x0-prediction), 20 denoising steps. Planning latency is one environment step of the
evaluation policy: 16 plans x 20 denoising steps, in-painting, twin-Q scoring and selection (target <= 150 ms),
eager and with `--compile` (torch.compile of the denoiser; compilation itself, ~20 s on CPU, is not timed).
Training is one masked in-painting step on a batch of {args.batch_size} windows.

| threads | training steps/s (wall) | training steps per CPU-second | planning median (ms, wall) | p90 | CPU median (ms) | planning `--compile` median (ms, wall) | p90 | CPU median (ms) |
|---|---|---|---|---|---|---|---|---|
{table}

Device: {device_name(args.device)}, torch {torch.__version__},
1-minute load average at the end of the run {load:.1f} (the machine was shared: a load above the core count
inflates every number). Commit {commit}.

Reading the numbers: with one thread, a call's CPU time is what it would take on an idle core (last column). With
two threads the wall clock is only meaningful when the load average above is below the core count; otherwise the
threads wait for each other. Target: planning latency <= 150 ms on 2 cores.

Command: `python benchmark_results/diffuser_speed.py --threads {' '.join(map(str, args.threads))}{'' if args.device == 'cpu' else ' --device ' + args.device}`
"""
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    cli(main, Args)
