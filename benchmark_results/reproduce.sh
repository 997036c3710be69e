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

# Nav1D tables and figures: 245 runs, one thread each, --jobs at a time (~1.6 CPU-hours per seed, measured on a 2-core machine;
# the planner runs are ~60% of it). Runs that load another run's checkpoint start after it. On a cluster, the same
# command with `--executor slurm --partition P --time-min 60` submits them as two job arrays, the second held by
# SLURM until the first has ended; every table cell is read from `python -m benchmarks.aggregate`'s rows.
python -m benchmarks.nav1d_tables --tables planners policies methods eda_ratio --seeds 0 1 2 3 4 --jobs 2
