#!/usr/bin/env bash
# Every table and figure of benchmark_results/, with the commands that made the committed files.
# Run from the repository root. The Nav1D grids take hours on 2 CPU cores; each command reuses finished runs
# (under runs/benchmark), so it can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Speed: every hot loop on one CPU thread (cpu_speed.md). The GPU files (gpu.md, gpu_speed.md) come from
#   python -m benchmarks.speed --device cuda --official-eda EDA_CHECKOUT --cleandiffuser CLEANDIFFUSER_CHECKOUT
#   python -m benchmarks.speed --scripts-on local/hopper/medium-replay-v0 --device cuda
python -m benchmarks.speed --device cpu --threads 1 --json benchmark_results/cpu_speed.json \
    --out benchmark_results/cpu_speed.md

# Nav1D tables and figures (--jobs = runs in parallel, one thread each). The planner grid is the slow one
# (~4.5 CPU-minutes per run), hence seeds 0-3 there; policies and methods share their DP expectation runs.
python -m benchmarks.nav1d_tables --tables planners --seeds 0 1 2 3 --jobs 2
python -m benchmarks.nav1d_tables --tables policies methods eda_ratio --seeds 0 1 2 3 4 --jobs 2
