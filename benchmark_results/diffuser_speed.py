"""Speed of diffuser_align.py's planner with a Hopper-sized temporal U-Net: training steps/s and planning latency.

Planning latency is one environment step of the evaluation policy: 16 plans from one state, 20 denoising steps,
in-painting, twin-Q scoring and selection (Planner.act). Writes benchmark_results/diffuser_speed.md.

    python benchmark_results/diffuser_speed.py --threads 2
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import diffuser_align as da  # noqa: E402
from common.nets import TemporalUNet, TwinQ, count_parameters  # noqa: E402
from common.runtime import cli  # noqa: E402


@dataclass
class Args:
    threads: int = 2
    """torch intra-op threads (the target machine has 2 CPU cores)"""
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
    output: str = str(REPO / "benchmark_results" / "diffuser_speed.md")
    """markdown file to write"""


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    planner_args = da.Args(env="hopper-medium-v2", planner="diffuser", sampler="ddpm", horizon=32, denoising_steps=20,
                           num_plans=16, unet_base_dim=32, unet_dim_mults=(1, 2, 4))
    x_dim = args.state_dim + args.action_dim
    unet = TemporalUNet(x_dim, planner_args.horizon, 0, planner_args.unet_base_dim, planner_args.unet_dim_mults)
    critic = TwinQ(args.state_dim, args.action_dim, 256).requires_grad_(False)
    diffusion = da.make_diffusion(planner_args)
    planner = da.Planner(planner_args, diffusion, unet, critic, args.state_dim, args.action_dim)

    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-4)
    windows = torch.randn(args.batch_size, planner_args.horizon, x_dim)

    def train_step() -> None:
        known = da.random_prefix_masks(len(windows), planner_args.horizon, args.state_dim, x_dim, "cpu")
        loss = diffusion.loss(unet, windows, None, mask=~known, known=known).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        train_step()
    start = time.perf_counter()
    for _ in range(args.train_steps):
        train_step()
    train_steps_per_s = args.train_steps / (time.perf_counter() - start)

    unet.eval()
    state = torch.randn(1, args.state_dim)
    for _ in range(3):
        planner.act(state)
    latencies = []
    for _ in range(args.plan_repeats):
        start = time.perf_counter()
        planner.act(state)
        latencies.append((time.perf_counter() - start) * 1000)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    median, p90 = float(np.median(latencies)), float(np.percentile(latencies, 90))
    text = f"""# diffuser_align.py speed (Hopper-sized planner)

Temporal U-Net: horizon {planner_args.horizon}, {args.state_dim}-d states + {args.action_dim}-d actions, base_dim
{planner_args.unet_base_dim}, dim_mults {planner_args.unet_dim_mults}, {count_parameters(unet):,} parameters; DDPM
(x0-prediction), 20 denoising steps.

| measurement | value |
|---|---|
| foundation training, batch {args.batch_size} | {train_steps_per_s:.2f} steps/s |
| planning latency, one env step (16 plans x 20 denoising steps + Q selection), median | {median:.1f} ms |
| planning latency, 90th percentile | {p90:.1f} ms |
| target for planning latency | <= 150 ms |

Device: CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}, {args.threads} threads,
1-minute load average at the end of the run {load:.1f} (the machine was shared: a load above the core count
inflates every number). Commit {commit}.

Command: `python benchmark_results/diffuser_speed.py --threads {args.threads}`
"""
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    cli(main, Args)
