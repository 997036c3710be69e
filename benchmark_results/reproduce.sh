#!/usr/bin/env bash
# Every table and figure of benchmark_results/, with the commands that made the committed files.
# Run from the repository root. The Nav1D grids take hours on 2 CPU cores; each command reuses finished runs
# (under runs/benchmark), so it can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Speed: every script in one run, with the matmul peak (throughput.md), then the per-script files.
python benchmark_results/throughput.py
python benchmark_results/bench_eda_speed.py --repeats 3 --candidate-states 64 --compile
python benchmark_results/dp_speed.py
python benchmark_results/diffuser_speed.py --threads 1 2

# Nav1D tables and figures (--jobs = runs in parallel, one thread each). The planner grid is the slow one
# (~4.5 CPU-minutes per run), hence seeds 0-3 there; policies and methods share their DP expectation runs.
python benchmark_results/nav1d_tables.py --tables planners --seeds 0 1 2 3 --jobs 2
python benchmark_results/nav1d_tables.py --tables policies methods eda_ratio --seeds 0 1 2 3 4 --jobs 2
