"""Every speed figure of the three scripts in one run on one machine, with the matmul peak measured in the same run.

Runs, one after the other, the EDA loop benchmark (`bench_eda_speed.py`), the dp_align stage throughput
(`dp_speed.py`) and the diffuser_align planner speed (`diffuser_speed.py`), measures the fp32 matmul peak before and
after them (so a change of load during the run shows), and writes benchmark_results/throughput.md with their tables,
the device, the commit and the commands.

    python benchmark_results/throughput.py                 # CPU
    python benchmark_results/throughput.py --device cuda   # GPU rows, naming the device
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from benchmark_results.bench_eda_speed import matmul_peak  # noqa: E402
from benchmark_results.runner import device_name, git_commit  # noqa: E402


def benchmarks(device: str, out_dir: Path) -> list[tuple[str, list[str], Path]]:
    """(title, command, markdown it writes) of each speed benchmark, with the settings of the committed tables."""
    scripts = [
        ("EDA (`eda_d4rl.py`), paper network with hopper shapes", "bench_eda_speed.py",
         ["--repeats", "3", "--candidate-states", "64", "--compile", "--device", device], "--out", "eda.md"),
        ("Diffusion Policy (`dp_align.py`), Nav1D preset networks", "dp_speed.py", ["--device", device], "--out",
         "dp.md"),
        ("Diffuser (`diffuser_align.py`), hopper-sized planner", "diffuser_speed.py",
         ["--threads", "1", "2", "--device", device], "--output", "diffuser.md"),
    ]
    return [(title, [sys.executable, str(HERE / script), *extra, out_flag, str(out_dir / name)], out_dir / name)
            for title, script, extra, out_flag, name in scripts]


def peak_gflops(device: torch.device) -> tuple[float, float]:
    """fp32 matmul GFLOP/s with one thread and with every core (on a GPU the two are the same measurement)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single = matmul_peak(device, call_seconds=0.5, repeats=5)
    torch.set_num_threads(os.cpu_count() or 1)
    every = matmul_peak(device, call_seconds=0.5, repeats=5)
    torch.set_num_threads(threads)
    return single, every


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=HERE / "throughput.md")
    options = parser.parse_args()
    device = torch.device(options.device)
    start = time.time()
    peaks = [peak_gflops(device)]
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for title, command, markdown in benchmarks(options.device, Path(tmp)):
            print(f"running {shlex.join(command[1:])}", flush=True)
            result = subprocess.run(command, cwd=HERE.parent)
            if result.returncode != 0:
                sys.exit(f"error: {shlex.join(command[1:])} failed with exit code {result.returncode}")
            body = markdown.read_text().split("\n", 1)[1]  # the sub-report without its own title
            sections.append(f"## {title}\n{body.replace(str(tmp), '/tmp')}")
            peaks.append(peak_gflops(device))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    peak_rows = [f"| {when} | {single:.1f} | {every:.1f} |" for when, (single, every)
                 in zip(["before", "after EDA", "after Diffusion Policy", "after Diffuser"], peaks)]
    text = "\n".join([
        "# Throughput of every script in one run",
        "",
        f"Device: {device_name(options.device)}; torch {torch.__version__}; commit `{git_commit()}`; "
        f"{(time.time() - start) / 60:.1f} minutes; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min).",
        "",
        "The fp32 matmul peak (1024^3 matmuls) measured before and after every benchmark of this run: a drop means",
        "other jobs took the machine meanwhile, and the numbers of that benchmark are low by about as much.",
        "",
        "| when | matmul peak, 1 thread (GFLOP/s) | all threads (GFLOP/s) |",
        "|---|---|---|",
        *peak_rows,
        "",
        f"Command: `python benchmark_results/throughput.py{'' if options.device == 'cpu' else ' --device ' + options.device}`",
        "",
        *sections,
    ])
    options.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
