"""Learning checks: on nav1d-full with a fixed seed, every alignment method alone, and the default
sequence, must raise the return of its script's foundation model by a clear margin; EDA's alignment must raise both
its best-of-4 and its one-sample return.

Each alignment script trains one foundation and critic; every method then runs from them (`--load-foundation`,
`--load-critic`), as many runs at a time as the machine has cores (one thread each). The diffuser's stages are
shorter than its Nav1D preset's: the preset's 3,000-step foundation plans close to the optimum (6.5 of 7.23) since
half of its training windows are the planning case (`--inpaint-planning-share`), which leaves no room to show a gain,
so the test starts from a 600-step foundation, and its absolute returns are below those of the benchmark tables.
The margins asserted are about half of the gains these settings gave on the 2-core development machine (MEASURED);
runs are deterministic on one CPU model, but another model's float kernels take the runs elsewhere, so a margin also
has to hold there.
"""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO_ROOT

BASE_RUNS = {  # the foundation and critic, both shorter than their presets
    "dp_align": ["--foundation-steps", "1000", "--critic-steps", "2000", "--eval-episodes", "50"],
    "diffuser_align": ["--foundation-steps", "600", "--eval-episodes", "16"],
}
METHOD_RUNS = {  # DP at its preset's stage lengths, the diffuser with 40-step stages (SFT 80)
    "dp_align": {"rl": [], "qvpg": [], "dpo": [], "sft": [], "cascade": [], "rl,dpo,sft": []},
    "diffuser_align": {"rl": ["--rl-steps", "40"], "qvpg": ["--qvpg-steps", "40"], "dpo": ["--dpo-steps", "40"],
                       "sft": ["--sft-steps", "80"], "cascade": ["--cascade-steps", "100", "--rl-steps", "40"],
                       "rl,dpo,sft": ["--rl-steps", "40", "--dpo-steps", "20", "--sft-steps", "20"]},
}
MEASURED = {  # foundation -> aligned with these settings (seed 0, 2-core development machine)
    ("dp_align", "rl"): (1.71, 4.47), ("dp_align", "qvpg"): (1.71, 3.49), ("dp_align", "dpo"): (1.71, 3.70),
    ("dp_align", "sft"): (1.71, 2.01), ("dp_align", "cascade"): (1.71, 6.04), ("dp_align", "rl,dpo,sft"): (1.71, 4.44),
    ("diffuser_align", "rl"): (2.72, 3.94), ("diffuser_align", "qvpg"): (2.72, 7.08),
    ("diffuser_align", "dpo"): (2.72, 3.49), ("diffuser_align", "sft"): (2.72, 3.09),
    ("diffuser_align", "cascade"): (2.72, 4.46), ("diffuser_align", "rl,dpo,sft"): (2.72, 4.17),
}
# about half of each measured gain (the diffuser's SFT gains only 0.10 in 40 steps, hence its 80)
# (the diffuser's rl: 2.72 -> 3.25 on a second CPU model, where the other diffuser runs land within 0.3 of MEASURED)
MARGINS = {
    ("dp_align", "rl"): 1.3, ("dp_align", "qvpg"): 0.8, ("dp_align", "dpo"): 1.0, ("dp_align", "sft"): 0.15,
    ("dp_align", "cascade"): 2.0, ("dp_align", "rl,dpo,sft"): 1.3,
    ("diffuser_align", "rl"): 0.4, ("diffuser_align", "qvpg"): 2.0, ("diffuser_align", "dpo"): 0.35,
    ("diffuser_align", "sft"): 0.15, ("diffuser_align", "cascade"): 0.8, ("diffuser_align", "rl,dpo,sft"): 0.7,
}
EDA_RUN = ["--behavior-steps", "1000", "--critic-steps", "2000", "--align-steps", "1500", "--eval-episodes", "20",
           "--eval-every", "0"]
WORKERS = max(1, min(4, os.cpu_count() or 1))


def run(script: str, run_dir, options: list[str]) -> dict[str, float]:
    """Mean evaluation return of every stage of a nav1d-full run of `script` (seed 0, one thread)."""
    command = [sys.executable, f"{script}.py", "--env", "nav1d-full", "--seed", "0", "--run-dir", str(run_dir),
               "--cpu-threads", "1", *options]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    stages = json.loads((run_dir / "summary.json").read_text())["stages"]
    return {name: stats["return_mean"] for name, stats in stages.items()}


@pytest.fixture(scope="module")
def returns_after(tmp_path_factory):
    """`returns_after(script, methods)`: the stage returns of `methods` run from the script's shared foundation and
    critic; on first use of a script, its base run and then all its method runs, WORKERS at a time."""
    returns = {}

    def get(script: str, methods: str) -> dict[str, float]:
        if script not in returns:
            base = tmp_path_factory.mktemp(f"{script}_base")
            run(script, base, [*BASE_RUNS[script], "--align", "rl", "--rl-steps", "0"])
            checkpoint = str(base / "checkpoints" / "latest.pt")
            with ThreadPoolExecutor(WORKERS) as pool:
                runs = {name: pool.submit(run, script, tmp_path_factory.mktemp(f"{script}_method"),
                                          [*BASE_RUNS[script], "--align", name, "--load-foundation", checkpoint,
                                           "--load-critic", checkpoint, *options])
                        for name, options in METHOD_RUNS[script].items()}
            returns[script] = {name: future.result() for name, future in runs.items()}
        return returns[script][methods]

    return get


@pytest.mark.parametrize("script,methods", [(script, methods) for script in METHOD_RUNS
                                            for methods in METHOD_RUNS[script]])
def test_every_method_raises_the_return_of_the_foundation_model(script, methods, returns_after):
    returns = returns_after(script, methods)
    print(f"{script} {methods}: {returns}")
    assert returns["aligned"] >= returns["foundation"] + MARGINS[script, methods], (
        f"{returns}; measured foundation -> aligned on the development machine: {MEASURED[script, methods]}")


def test_eda_alignment_raises_the_return_with_and_without_q_selection(tmp_path):
    returns = run("eda_d4rl", tmp_path, EDA_RUN)
    assert returns["aligned"] >= returns["behavior"] + 1.0, returns  # best of 4 candidates by Q
    assert returns["aligned_1cand"] >= returns["behavior_1cand"] + 2.0, returns  # the policy itself
