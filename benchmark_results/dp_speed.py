"""Throughput of dp_align.py on Nav1D: training steps/s per stage and the latency of one action (N = 8 candidates).

Runs dp_align.py once per sampler with the Nav1D preset's networks and short stages (speed only, not returns), reads
the `throughput` block of each summary.json and writes benchmark_results/dp_speed.md with the commands, the commit
and the machine. Usage (from the repository root):

    python benchmark_results/dp_speed.py                 # CPU
    python benchmark_results/dp_speed.py --device cuda
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmark_results.runner import device_name, git_commit  # noqa: E402

SHORT_STAGES = ["--foundation-steps", "300", "--critic-steps", "300", "--rl-steps", "15", "--qvpg-steps", "15",
                "--dpo-steps", "15", "--sft-steps", "15", "--cascade-steps", "15", "--eval-episodes", "20"]
THREADS = "1"  # one torch thread per run: on a shared 2-core machine more threads only contend
RUNS = {  # every method the sampler supports
    "ddpm": ["--sampler", "ddpm", "--align", "rl,qvpg,dpo,sft,cascade"],
    "fm": ["--sampler", "fm", "--align", "qvpg,dpo,sft,cascade"],
}
STAGES = ["foundation", "critic", "rl", "qvpg", "dpo", "sft", "cascade"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (passed to dp_align.py)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmark_results" / "dp_speed.md")
    options = parser.parse_args()
    commit = git_commit()
    rows, commands = [], []
    with tempfile.TemporaryDirectory() as runs:
        for name, extra in RUNS.items():
            run_dir = Path(runs) / name
            command = [sys.executable, "dp_align.py", "--env", "nav1d-full", "--seed", "0", "--device", options.device,
                       "--run-dir", str(run_dir), *SHORT_STAGES, *extra]
            commands.append(f"OMP_NUM_THREADS={THREADS} python " + shlex.join(command[1:]).replace(str(run_dir),
                                                                                            f"/tmp/dp_speed/{name}"))
            result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                                    env={**os.environ, "OMP_NUM_THREADS": THREADS})
            if result.returncode != 0:
                sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
            throughput = json.loads((run_dir / "summary.json").read_text())["throughput"]
            cells = [f"{throughput[f'{stage}_steps_per_s']:.1f}" if f"{stage}_steps_per_s" in throughput else "-"
                     for stage in STAGES]
            rows.append(f"| {name} | " + " | ".join(cells) + f" | {throughput['action_latency_ms']:.1f} |")
    lines = [
        "# dp_align.py throughput on Nav1D",
        "",
        f"Commit `{commit}`, device: {device_name(options.device)}; the CPU is shared with other jobs, so timings are "
        f"noisy; torch {torch.__version__}, "
        f"{THREADS} thread per run. "
        "Nav1D preset networks (DiT hidden 32, depth 2; 10 sampling steps; alignment batch 32 states x 8 samples). "
        "Training steps per second per stage (an alignment step samples its own batch: rl samples 256 chains and "
        "runs 2 PPO epochs over every stochastic step), and the latency of choosing one action for one state from "
        "N = 8 candidates (mean of 20 calls after 3 warm-up calls).",
        "",
        "| sampler | " + " | ".join(f"{stage} steps/s" for stage in STAGES) + " | action latency (ms, N=8) |",
        "| --- | " + " | ".join("---" for _ in STAGES) + " | --- |",
        *rows,
        "",
        f"Commands (written by `python benchmark_results/dp_speed.py{'' if options.device == 'cpu' else ' --device ' + options.device}`):",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    options.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
