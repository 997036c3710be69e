"""Reproduce the Nav1D tables and figures of benchmark_results/ from the scripts' summary.json files.

    python -m benchmarks.nav1d_tables --tables planners policies methods --seeds 0 1 2 --jobs 2
    python -m benchmarks.nav1d_tables --tables planners policies methods --seeds 0 1 2 --executor slurm \
        --partition cpu --time-min 120

Tables (markdown, written to benchmark_results/):
- nav1d_planners.md : paper Table 2 on Nav1D (Diffuser ddpm/ddim/sm/fm, DD ddpm x partial/full/expert)
- nav1d_policies.md : paper Table 3 on Nav1D (DP expectation / idql x partial/full/expert)
- nav1d_methods.md  : EDA and every alignment method alone, and rl,dpo,sft with 1-3 passes, all methods from the
                      same DP foundation and critic (one base run per dataset and seed, loaded by the others)
- nav1d_eda_data_ratio.md : EDA on nav1d-full with 1%-100% of the states Q-labelled (paper Figure 5a)
Figures (PNG): nav1d_task.png, nav1d_learning_curves.png (DP: return after every method of every pass, +-1 std over
seeds, foundation level dashed), nav1d_coherency_passes.png, nav1d_planner_curves.png (every planner: return and plan
coherency after every method), eda_data_ratio.png (EDA's return against the Q-labelled fraction).

Runs go to --out (default runs/benchmark, not committed); finished runs are reused, so the command can be
interrupted and started again. Each run goes through benchmarks.sweep's run function (a stopped run continues with
--resume), on this machine (--jobs at a time, a run that loads another's checkpoint once that one has finished) or,
with --executor slurm and benchmarks.sweep's SLURM options, as two SLURM job arrays: the runs that load nothing, then
the runs that load one of them, held by SLURM until the first array has ended. --out gets a sweep.json, so
`python -m benchmarks.aggregate --out OUT` writes every run's stages as one generic table and CSV next to these
tables. Each finished run's summary.json and code version are also merged into
benchmark_results/nav1d_runs.json, which is committed with the tables: a sweep on a fresh checkout continues from it
when a run's code has not changed since (its script, nav1d.py and common/ less the other datasets' modules), and
`--report-only` rebuilds the tables from it. Each table names the command and commit that produced it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from benchmarks.aggregate import Cells, before_after, cell, std_column
from benchmarks.runner import (REPO_ROOT, Job, add_benchmark_arguments, git_commit, markdown_table, run_benchmark,
                               seed_by_seed)

HERE = REPO_ROOT / "benchmark_results"  # where the tables and figures go
ARCHIVE = HERE / "nav1d_runs.json"  # every finished run's summary and code version, committed with the tables
DATASETS = ("partial", "full", "expert")
# Paper numbers, before -> after (Huh & Mohapatra, Tables 2 and 3; their Nav1D, not ours: compare trend and scale).
PAPER_PLANNERS = {
    ("diffuser", "ddpm"): {"partial": "2.1 → 4.3", "full": "3.2 → 6.9", "expert": "6.2 → 7.3"},
    ("diffuser", "ddim"): {"partial": "1.9 → 3.3", "full": "4.3 → 7.3", "expert": "5.9 → 7.2"},
    ("diffuser", "sm"): {"partial": "2.5 → 4.1", "full": "2.9 → 6.9", "expert": "5.9 → 7.2"},
    ("diffuser", "fm"): {"partial": "2.3 → 5.2", "full": "3.9 → 6.8", "expert": "6.4 → 7.1"},
    ("dd", "ddpm"): {"partial": "2.0 → 3.9", "full": "3.3 → 6.9", "expert": "6.2 → 7.2"},
}
PAPER_POLICIES = {
    "expectation": {"partial": "1.10 → 3.91", "full": "1.32 → 5.98", "expert": "5.43 → 5.80"},
    "idql": {"partial": "2.69 → 4.42", "full": "4.61 → 6.24", "expert": "6.89 → 7.06"},
}
CODE = ("*.py", "common")  # what a table's numbers depend on; the tables and figures themselves are not code
SINGLE_METHODS = ("rl", "qvpg", "dpo", "sft", "cascade")
DATA_RATIOS = (0.01, 0.03, 0.1, 0.3, 1.0)  # fraction of dataset states given Q-labelled candidates


def align_sequence(sampler: str) -> str:
    """Deterministic samplers have no step likelihood: their RL step is the truncated value gradient."""
    return "qvpg,dpo,sft" if sampler in ("ddim", "fm") else "rl,dpo,sft"


def planner_label(planner: str, sampler: str) -> str:
    return f"{'Diffuser' if planner == 'diffuser' else 'DD'} {sampler}"


def planner_jobs(out: Path, seeds) -> list[Job]:
    return [Job("diffuser_align", ["--env", f"nav1d-{data}", "--planner", planner, "--sampler", sampler,
                                   "--align", align_sequence(sampler)], seed,
                out / f"planner_{planner}_{sampler}_{data}_s{seed}", {"planner": planner, "sampler": sampler, "data": data})
            for (planner, sampler) in PAPER_PLANNERS for data in DATASETS for seed in seeds]


def policy_job(out: Path, selection: str, data: str, seed: int) -> Job:
    """`dp_align.py --align rl,dpo,sft` from scratch: one cell of Table 3. The expectation runs are also the base runs
    of the methods table (its `rl,dpo,sft x1` row), whose foundation and critic every single-method run loads."""
    tags = {"selection": selection, "data": data} | ({"method": "rl,dpo,sft x1"} if selection == "expectation" else {})
    return Job("dp_align", ["--env", f"nav1d-{data}", "--selection", selection, "--align", "rl,dpo,sft"], seed,
               out / f"policy_{selection}_{data}_s{seed}", tags)


def policy_jobs(out: Path, seeds) -> list[Job]:
    return [policy_job(out, selection, data, seed)
            for selection in PAPER_POLICIES for data in DATASETS for seed in seeds]


def eda_job(out: Path, data: str, seed: int) -> Job:
    """EDA with everything trained from scratch; the full-data run is also the ratio-1.0 point of the data-ratio curve."""
    tags = {"method": "EDA", "data": data} | ({"ratio": 1.0} if data == "full" else {})
    return Job("eda_d4rl", ["--env", f"nav1d-{data}"], seed, out / f"method_eda_{data}_s{seed}", tags)


def method_jobs(out: Path, seeds) -> tuple[list[Job], list[Job]]:
    """First the base runs (DP foundation, critic, rl,dpo,sft x1; and EDA), then every DP variant loading its base."""
    base, variants = [], []
    for data in DATASETS:
        for seed in seeds:
            base_job = policy_job(out, "expectation", data, seed)
            base += [base_job, eda_job(out, data, seed)]
            checkpoint = str(base_job.run_dir / "checkpoints" / "latest.pt")
            shared = ["--env", f"nav1d-{data}", "--load-foundation", checkpoint, "--load-critic", checkpoint]
            for method in SINGLE_METHODS:
                variants.append(Job("dp_align", [*shared, "--align", method], seed,
                                    out / f"method_{method}_{data}_s{seed}", {"method": method, "data": data},
                                    needs=base_job.run_dir))
            for passes in (2, 3):
                variants.append(Job("dp_align", [*shared, "--align", "rl,dpo,sft", "--passes", str(passes)], seed,
                                    out / f"method_seq{passes}_{data}_s{seed}",
                                    {"method": f"rl,dpo,sft x{passes}", "data": data}, needs=base_job.run_dir))
    return base, variants


def eda_ratio_jobs(out: Path, seeds) -> tuple[list[Job], list[Job]]:
    """The full-data EDA run of each seed, then every smaller ratio reusing its behavior model and critic: the ratio
    only decides which states get Q-labelled candidates, so what differs between points is the alignment alone."""
    full = [eda_job(out, "full", seed) for seed in seeds]
    variants = []
    for job in full:
        checkpoint = str(job.run_dir / "checkpoints" / "latest.pt")
        variants += [Job("eda_d4rl", ["--env", "nav1d-full", "--data-ratio", str(ratio), "--load-behavior", checkpoint,
                                      "--load-critic", checkpoint], job.seed, out / f"eda_ratio{ratio}_s{job.seed}",
                         {"ratio": ratio}, needs=job.run_dir) for ratio in DATA_RATIOS if ratio < 1]
    return full, variants


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------
def header_lines(title: str, command: str, jobs: list[Job], paper_columns: bool = False) -> list[str]:
    done = [job for job in jobs if job.finished()]
    devices = sorted({job.summary()["device"] for job in done}) or ["—"]
    run_commits = sorted({commit for job in done for commit in job.commits()}) or ["—"]
    lines = [f"# {title}", "", f"Command: {command}  ",
             f"Runs made with the code of commit {', '.join(f'`{c}`' for c in run_commits)} (the last change to the "
             f"scripts they ran); "
             f"table written at `{git_commit(CODE)}`  ", f"Device: {', '.join(devices)}",
             "", "Returns are mean ± std over seeds of the per-seed mean evaluation return (Nav1D returns lie in [0, 8];",
             "exact optimum 7.23, uniform-random actions 1.40)."]
    if paper_columns:
        lines += ["'episode std' is the spread of returns over evaluation episodes (mean over seeds), before → after.",
                  "Paper numbers are for the paper's own Nav1D, whose constants are not published: compare trend and scale."]
    return lines + [""]


def planners_table(jobs: list[Job], cells: Cells, command: str) -> str:
    rows = []
    for planner, sampler in PAPER_PLANNERS:
        for data in DATASETS:
            stages = cells.stages(planner=planner, sampler=sampler, data=data)
            ours, spread, coherency, n = before_after(stages)
            rows.append([planner_label(planner, sampler), data, ours, spread, coherency,
                         cell(stages.get("aligned"), "wall_time_s", 0), n, PAPER_PLANNERS[(planner, sampler)][data]])
    header = ["planner", "dataset", "return before → after (ours)", "episode std", "plan coherency", "wall time (s)",
              "seeds", "paper"]
    return "\n".join(header_lines("Nav1D, planning-based DMC (paper Table 2)", command, jobs, paper_columns=True)
                     + [markdown_table(header, rows)]) + "\n"


def policies_table(jobs: list[Job], cells: Cells, command: str) -> str:
    rows = []
    for selection in PAPER_POLICIES:
        for data in DATASETS:
            ours, spread, coherency, n = before_after(cells.stages(selection=selection, data=data))
            rows.append([f"DP {selection}", data, ours, spread, coherency, n, PAPER_POLICIES[selection][data]])
    header = ["policy", "dataset", "return before → after (ours)", "episode std", "policy coherency", "seeds", "paper"]
    return "\n".join(header_lines("Nav1D, policy-based DMC (paper Table 3)", command, jobs, paper_columns=True)
                     + [markdown_table(header, rows)]) + "\n"


def methods_table(jobs: list[Job], cells: Cells, command: str) -> str:
    rows = []
    for method in ["EDA", *SINGLE_METHODS, "rl,dpo,sft x1", "rl,dpo,sft x2", "rl,dpo,sft x3"]:
        for data in DATASETS:
            stages = cells.stages(method=method, data=data)
            ours, _, coherency, n = before_after(stages)
            aligned = stages.get("aligned")
            rows.append([method, data, ours, cell(aligned, "normalized_mean", 1), coherency,
                         cell(aligned, "wall_time_s", 0), n])
    header = ["method", "dataset", "return before → after", "normalised after", "coherency", "wall time (s)", "seeds"]
    notes = ["All DP rows share one foundation and one critic per dataset and seed (those of the `rl,dpo,sft x1` run,",
             "which the others load); EDA trains its own behavior model and critic (its method needs the scalar-energy",
             "behavior model). A run that loads the foundation evaluates it again with its own sampling noise, so its",
             "'before' differs from the `x1` row's by evaluation noise only, and its wall time leaves out the",
             "foundation and critic training (one thread per run).", ""]
    eda_rows = []
    for data in DATASETS:
        stages = cells.stages(method="EDA", data=data)
        eda_rows.append([data, *eda_stage_cells(stages), before_after(stages)[3]])
    eda_notes = ["", "EDA's own evaluations: best of 4 sampled actions by Q (the rows above), and one sample per action,",
                 "which shows what the alignment changed in the policy itself.", ""]
    return "\n".join(header_lines("Nav1D: EDA against each alignment method alone", command, jobs) + notes
                     + [markdown_table(header, rows)] + eda_notes
                     + [markdown_table(["dataset", *EDA_STAGE_HEADER, "seeds"], eda_rows)]) + "\n"


EDA_STAGES = ("behavior", "aligned", "behavior_1cand", "aligned_1cand")
EDA_STAGE_HEADER = ["behavior (best of 4)", "aligned (best of 4)", "behavior (1 sample)", "aligned (1 sample)"]


def eda_stage_cells(stages: dict[str, dict]) -> list[str]:
    """EDA's four evaluations (best of 4 by Q and one sample, behavior and aligned), mean ± std over seeds; a run
    with --num-candidates 1 has no separate one-sample stages."""
    return [cell(stages.get(stage), "return_mean") for stage in EDA_STAGES]


def eda_ratio_table(jobs: list[Job], cells: Cells, command: str) -> str:
    rows = []
    for ratio in DATA_RATIOS:
        stages = cells.stages(ratio=ratio)
        rows.append([f"{ratio:g}", *eda_stage_cells(stages), before_after(stages)[3]])
    header = ["Q-labelled fraction", *EDA_STAGE_HEADER, "seeds"]
    notes = ["Every ratio below 1 loads the behavior model and critic of the ratio-1 run of its seed, so the rows",
             "differ only in how many dataset states received K Q-labelled candidates for the alignment.", ""]
    return "\n".join(header_lines("EDA on nav1d-full with a fraction of the data Q-labelled (paper Figure 5a)",
                                  command, jobs) + notes + [markdown_table(header, rows)]) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------
def stage_curve(stages: dict[str, dict], key: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Stages in run order ('aligned' repeats the last one, so it is left out), and the mean and std over seeds of
    `key` at each."""
    names = [name for name in stages if name != "aligned"]
    return (names, np.array([stages[name][key] for name in names]),
            np.array([stages[name][std_column(key)] for name in names]))


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_optimum(axis) -> None:
    from common import nav1d

    axis.axhline(nav1d.optimal_return(), color="grey", linestyle=":", linewidth=1, label="exact optimum")


def draw_mean_band(axis, mean: np.ndarray, std: np.ndarray, alpha: float, **line_style) -> None:
    """The mean over seeds as a line with a ±1 std band."""
    line, = axis.plot(range(len(mean)), mean, marker="o", **line_style)
    axis.fill_between(range(len(mean)), mean - std, mean + std, alpha=alpha, color=line.get_color())


def plot_planner_curves(cells: Cells) -> None:
    """Return and plan coherency after every method of the planners' sequence (paper Figure 6 for Diffuser and DD)."""
    plt = pyplot()
    figure, axes = plt.subplots(2, len(DATASETS), figsize=(4 * len(DATASETS), 6), sharey="row")
    for column, data in enumerate(DATASETS):
        for planner, sampler in PAPER_PLANNERS:
            stages = cells.stages(planner=planner, sampler=sampler, data=data)
            if not stages:
                continue
            label = planner_label(planner, sampler)
            for row, key in enumerate(("return_mean", "coherency")):
                draw_mean_band(axes[row, column], *stage_curve(stages, key)[1:], alpha=0.15, label=label)
        draw_optimum(axes[0, column])
        axes[0, column].set_title(f"nav1d-{data}")
        for row, ylabel in enumerate(("return", "plan coherency")):
            axes[row, column].set_xticks(range(4), ["foundation", "rl / qvpg", "dpo", "sft"], fontsize=8)
            axes[row, column].set_ylabel(ylabel)
    axes[0, -1].legend(fontsize=7, loc="center")
    figure.suptitle("Planners after every method of one pass (±1 std over seeds; qvpg for DDIM and FM)", fontsize=10)
    figure.tight_layout()
    figure.savefig(HERE / "nav1d_planner_curves.png", dpi=120)
    plt.close(figure)


def plot_figures(cells: Cells) -> None:
    from common import nav1d

    plt = pyplot()

    nav1d.plot_task(HERE / "nav1d_task.png")
    sequences = {data: cells.stages(method="rl,dpo,sft x3", data=data) for data in DATASETS}
    for filename, key, ylabel in (("nav1d_learning_curves.png", "return_mean", "return"),
                                  ("nav1d_coherency_passes.png", "coherency", "policy coherency")):
        if not any(sequences.values()):
            break
        figure, axes = plt.subplots(1, len(DATASETS), figsize=(4 * len(DATASETS), 3.2), sharey=True)
        for axis, data in zip(axes, DATASETS):
            if not sequences[data]:
                continue
            names, mean, std = stage_curve(sequences[data], key)
            draw_mean_band(axis, mean, std, alpha=0.25, label="after each method (±1 std over seeds)")
            axis.axhline(mean[0], color="black", linestyle="--", linewidth=1, label="foundation")
            if key == "return_mean":
                draw_optimum(axis)
            axis.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
            axis.set_title(f"DP expectation, nav1d-{data}")
            axis.set_ylabel(ylabel)
        axes[0].legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(HERE / filename, dpi=120)
        plt.close(figure)
    by_ratio = {ratio: cells.stages(ratio=ratio) for ratio in DATA_RATIOS}
    ratios = [ratio for ratio, stages in by_ratio.items() if stages]
    if ratios:
        figure, axis = plt.subplots(figsize=(4.5, 3.2))
        for stage, label in (("aligned", "EDA aligned"), ("behavior", "behavior model")):
            rows = [by_ratio[ratio][stage] for ratio in ratios]
            axis.errorbar(ratios, [row["return_mean"] for row in rows], [row["return_std"] for row in rows],
                          marker="o", label=label)
        draw_optimum(axis)
        axis.set_xscale("log")
        axis.set_xlabel("fraction of states with Q-labelled candidates")
        axis.set_ylabel("return (nav1d-full)")
        axis.legend()
        figure.tight_layout()
        figure.savefig(HERE / "eda_data_ratio.png", dpi=120)
        plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tables", nargs="+", default=["planners", "policies", "methods"],
                        choices=["planners", "policies", "methods", "eda_ratio"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"))
    add_benchmark_arguments(parser)
    options = parser.parse_args()
    out = options.out.resolve()
    arguments = shlex.join(a for a in sys.argv[1:] if a != "--report-only")
    command = f"`python -m benchmarks.nav1d_tables {arguments}`" + (
        " (this file rebuilt from the finished runs with `--report-only`)" if options.report_only else "")

    planners = planner_jobs(out, options.seeds) if "planners" in options.tables else []
    policies = policy_jobs(out, options.seeds) if "policies" in options.tables else []
    base, variants = method_jobs(out, options.seeds) if "methods" in options.tables else ([], [])
    ratio_base, ratio_variants = eda_ratio_jobs(out, options.seeds) if "eda_ratio" in options.tables else ([], [])
    ordered = seed_by_seed(planners + policies + base + ratio_base, variants + ratio_variants)
    if not run_benchmark(ordered, out, ARCHIVE, options):
        return
    ratios = ratio_base + ratio_variants
    cells = Cells(out)
    if options.report_only and not cells.rows:
        sys.exit("no finished runs under --out to report on")
    if planners:
        (HERE / "nav1d_planners.md").write_text(planners_table(planners, cells, command))
        plot_planner_curves(cells)
    if policies:
        (HERE / "nav1d_policies.md").write_text(policies_table(policies, cells, command))
    if base:
        (HERE / "nav1d_methods.md").write_text(methods_table(base + variants, cells, command))
    if ratios:
        (HERE / "nav1d_eda_data_ratio.md").write_text(eda_ratio_table(ratios, cells, command))
    plot_figures(cells)


if __name__ == "__main__":
    main()
