"""The robotics tables, as sweeps: MetaWorld (the alignment paper's Table 2 tasks) and Lift / PushT (its Table 3).

    python -m benchmarks.robot_tables --tables metaworld robotics --seeds 0-2 --out runs/robot_tables \\
        --sweep "--workers 2" -- --preset cpu

Each model of a table is one `benchmarks.sweep` grid (its datasets x the seeds) in a folder of its own under --out;
--sweep passes executor options on (e.g. "--executor slurm --partition cpu --time-min 120"), and everything after
`--` goes to every run. Re-running the command continues the sweeps; --report-only only rewrites the tables from
the runs that finished. The tables (benchmark_results/metaworld.md, benchmark_results/robotics.md) give the success
rate before -> after alignment (mean ± std over the seeds that finished), the wall time, and the paper's numbers.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks import sweep
from benchmarks.runner import REPO_ROOT, git_commit, markdown_table, mean_std
from common.metaworld_tasks import TASKS

HERE = REPO_ROOT / "benchmark_results"
# table -> model -> (script, its fixed arguments)
MODELS = {
    "metaworld": {
        "Diffuser-DDPM": ("diffuser_align.py", ["--planner", "diffuser", "--sampler", "ddpm"]),
        "DD": ("diffuser_align.py", ["--planner", "dd", "--sampler", "ddpm"]),
        "DP": ("dp_align.py", ["--selection", "expectation"]),
    },
    "robotics": {
        "DP expectation": ("dp_align.py", ["--selection", "expectation"]),
        "DP idql": ("dp_align.py", ["--selection", "idql"]),
    },
}
DATASETS = {"metaworld": [f"metaworld/{task}/medium-v0" for task in TASKS],
            "robotics": ["robomimic/lift/scripted-mh", "pusht/scripted"]}
# Paper success rates, before -> after (Huh & Mohapatra, Tables 2 and 3; their data: the real robomimic lift-mh and
# Diffusion Policy's PushT, where ours are the local scripted sets; MetaWorld data of their own making)
PAPER = {
    ("metaworld", "Diffuser-DDPM"): {"button-press": "0.0 → 0.7", "drawer-open": "0.2 → 0.9",
                                     "sweep-into": "0.3 → 0.7", "plate-slide": "0.2 → 0.6"},
    ("metaworld", "DD"): {"button-press": "0.1 → 0.5", "drawer-open": "0.3 → 0.9", "sweep-into": "0.2 → 1.0",
                          "plate-slide": "0.1 → 0.6"},
    ("robotics", "DP expectation"): {"lift": "0.65 → 0.98 (lift-mh)", "pusht": "0.42 → 1.0"},
    ("robotics", "DP idql"): {"lift": "0.79 → 1.0 (lift-mh)", "pusht": "0.71 → 1.0"},
}
TITLES = {"metaworld": "MetaWorld, medium data (paper Table 2's tasks)",
          "robotics": "Lift and PushT, Diffusion Policy (paper Table 3's low-dim rows)"}


def sweep_folder(out: Path, table: str, model: str) -> Path:
    return out / f"{table}_{model.lower().replace(' ', '-')}"


def sweep_argv(table: str, model: str, seeds: str, out: Path, sweep_options: str, extra: list[str]) -> list[str]:
    script, arguments = MODELS[table][model]
    return [script, "--env", ",".join(DATASETS[table]), "--seed", seeds, "--out", str(sweep_folder(out, table, model)),
            *shlex.split(sweep_options), "--", *arguments, *extra]


def short_name(dataset: str) -> str:
    """metaworld/button-press/medium-v0 -> button-press, robomimic/lift/scripted-mh -> lift, pusht/scripted -> pusht."""
    parts = dataset.split("/")
    return parts[1] if parts[0] in ("metaworld", "robomimic") else parts[0]


def summaries(folder: Path, dataset: str) -> list[dict]:
    if not (folder / "sweep.json").is_file():
        return []
    points = json.loads((folder / "sweep.json").read_text())["points"]
    paths = [folder / point["name"] / "summary.json" for point in points if point["env"] == dataset]
    return [json.loads(path.read_text()) for path in paths if path.is_file()]


def before_after(done: list[dict], metric: str, digits: int = 2) -> str:
    """'mean ± std → mean ± std' of `metric` for the first stage (the starting model) and the aligned one."""
    if not done:
        return "—"
    first = [summary["stages"][next(iter(summary["stages"]))][metric] for summary in done]
    aligned = [summary["stages"]["aligned"][metric] for summary in done]
    return f"{mean_std(first, digits)} → {mean_std(aligned, digits)}"


def table_text(table: str, out: Path, command: str) -> str:
    rows, devices = [], set()
    for model in MODELS[table]:
        for dataset in DATASETS[table]:
            done = summaries(sweep_folder(out, table, model), dataset)
            devices |= {summary["device"] for summary in done}
            rows.append([model, dataset, before_after(done, "success_rate"), before_after(done, "normalized_mean", 1),
                         mean_std([summary["wall_time_s"] for summary in done], 0), str(len(done)),
                         PAPER.get((table, model), {}).get(short_name(dataset), "—")])
    header = ["model", "dataset", "success before → after (ours)", "normalised score before → after", "wall time (s)",
              "seeds", "paper (success)"]
    lines = [f"# {TITLES[table]}", "", f"Command: `{command}`  ", f"Table written at `{git_commit()}`  ",
             f"Device: {', '.join(sorted(devices)) or '—'}", "",
             "Success rate of the evaluation episodes and normalised score, mean ± std over seeds, for the starting",
             "model (foundation) and after the script's default alignment sequence (PushT's normalised score is",
             "Diffusion Policy's coverage score in percent; Lift's is the success rate in percent; MetaWorld's is scaled",
             "between the random and the scripted policy's returns). The wall time is the training's, evaluations",
             "included, data loading not. The paper's numbers come from its own data (see the README): compare trend",
             "and scale, not digits.", "", markdown_table(header, rows)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tables", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", default="0-2", help="as benchmarks.sweep --seed")
    parser.add_argument("--out", type=Path, default=Path("runs/robot_tables"))
    parser.add_argument("--sweep", default="--workers 1", help="executor options for benchmarks.sweep, one string")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the tables from finished runs")
    options = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    out = options.out.resolve()
    command = "python -m benchmarks.robot_tables " + shlex.join(a for a in argv if a != "--report-only")
    status = 0
    for table in options.tables:
        if not options.report_only:
            for model in MODELS[table]:
                status = max(status, sweep.main(sweep_argv(table, model, options.seeds, out, options.sweep, extra)))
        (HERE / f"{table}.md").write_text(table_text(table, out, command))
        print(f"wrote {HERE / f'{table}.md'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
