"""Stage throughput of the three scripts themselves, run end to end for a few thousand steps on a real dataset, with
and without CUDA graphs (and, optionally, with --compile): what `benchmarks/speed.py` measures on isolated loops,
checked on the scripts' own code paths (data sampling, logging, checkpoints, evaluation).

    python -m benchmarks.script_speed --env local/hopper/medium-replay-v0 --device cuda --out speed.md

Each run writes its summary.json under --runs; the table reads their `throughput` blocks. Short stages: the numbers
are speeds, not returns.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

SHORT = {
    "eda_d4rl": ["--behavior-steps", "2000", "--critic-steps", "2000", "--data-ratio", "0.05", "--align-steps", "2000",
                 "--eval-every", "0", "--eval-episodes", "2", "--eval-max-steps", "100", "--log-every", "500"],
    "dp_align": ["--foundation-steps", "1000", "--critic-steps", "1000", "--align", "rl", "--rl-steps", "20",
                 "--eval-episodes", "2", "--eval-max-steps", "100"],
    "diffuser_align": ["--foundation-steps", "1000", "--critic-steps", "1000", "--align", "qvpg", "--qvpg-steps", "20",
                       "--horizon", "32", "--eval-episodes", "2", "--eval-max-steps", "100"],
}
MODES = {"eager": ["--no-cuda-graphs"], "CUDA graphs": [], "CUDA graphs + compile": ["--compile"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", required=True, help="dataset of the runs (a hopper-shaped one for gpu.md)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scripts", default="eda_d4rl,dp_align,diffuser_align")
    parser.add_argument("--modes", default="CUDA graphs,eager", help=f"comma-separated, from: {', '.join(MODES)}")
    parser.add_argument("--runs", type=Path, default=Path("runs/script_speed"))
    parser.add_argument("--out", type=Path, help="markdown table to write")
    parser.add_argument("--timeout-s", type=float, default=600, help="per run")
    options = parser.parse_args()
    rows, commands = [], []
    for mode in options.modes.split(","):
        for script in options.scripts.split(","):
            run_dir = options.runs / f"{script}__{mode.replace(' ', '_').replace('+', 'and')}"
            command = [sys.executable, f"{script}.py", "--env", options.env, "--device", options.device, "--seed", "0",
                       "--run-dir", str(run_dir), *SHORT[script], *MODES[mode]]
            commands.append(shlex.join(["python", *command[1:]]))
            started = time.perf_counter()
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=options.timeout_s)
                failure = "" if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()[-300:]}"
            except subprocess.TimeoutExpired:
                failure = f"timed out after {options.timeout_s:.0f} s"
            wall = time.perf_counter() - started
            summary = run_dir / "summary.json"
            throughput = json.loads(summary.read_text())["throughput"] if summary.exists() and not failure else {}
            rows.append({"script": script, "mode": mode, "wall_s": wall, "failure": failure, **throughput})
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
        options.out.write_text(text)
        options.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
