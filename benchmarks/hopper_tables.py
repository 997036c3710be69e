"""Every script at 2-core CPU scale (`--preset cpu`) on one MuJoCo dataset, seeds 0-2: the evidence of issue 15.

    MINARI_DATASETS_PATH=DIR python -m benchmarks.hopper_tables --env local/hopper/medium-replay-v0 --seeds 0 1 2 \\
        --jobs 1 --threads 2

Runs per seed (run directories under --out):
- `eda_s{seed}`: eda_d4rl.py --preset cpu (behavior model, critic, alignment; best of 4 by Q and 1 sample)
- `dp_s{seed}`: dp_align.py --preset cpu, its default sequence rl,dpo,sft; also the base of the next runs
- `dp-{method}_s{seed}`: dp_align.py --preset cpu --align METHOD with dp_s{seed}'s foundation and critic loaded, so
  that every method alone starts from the same model as the sequence
- `diffuser_s{seed}`: diffuser_align.py --preset cpu, its default sequence

Writes benchmark_results/hopper_cpu_table.md (normalised score of the starting model and after alignment, mean ± std
over seeds and per seed, the divergence monitor, wall times, the command and code version) and
hopper_cpu_stages.png (the normalised score after every stage of every run, mean ± std over seeds) and
hopper_cpu_curves.png (each script's training curves, one line per seed: every stage's loss, the alignment's rewards
or accuracy, and the divergence monitor). The curves are read from the TensorBoard files of the runs under --out and
kept, thinned to CURVE_POINTS points per tag, in benchmark_results/hopper_cpu_curves.json, so the figure is rebuilt
from there for runs whose TensorBoard files are on another machine. The runs go
through benchmarks.runner like the Nav1D tables: finished runs are reused, --executor slurm submits them as job
arrays, every finished run is archived in benchmark_results/hopper_cpu_runs.json, and --report-only rebuilds the
files from there. Everything after `--` goes to every run (e.g. `-- --eval-episodes 5`), --eda-args, --dp-args and
--diffuser-args to one script's runs; the table's command line says so.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np

from benchmarks.aggregate import Cells, cell, first_stage, std_column
from benchmarks.runner import (REPO_ROOT, Job, add_benchmark_arguments, git_commit, markdown_table, run_benchmark,
                               seed_by_seed)
from benchmarks.sweep import seed_list

HERE = REPO_ROOT / "benchmark_results"
ARCHIVE = HERE / "hopper_cpu_runs.json"
CURVES_ARCHIVE = HERE / "hopper_cpu_curves.json"  # run name -> tag -> [steps, values]
CURVE_POINTS = 200
SCRIPTS = ("eda_d4rl", "dp_align", "diffuser_align")
DP_METHODS_ALONE = ("rl", "dpo", "sft")
# model -> what the table calls its starting stage
STARTS = {"EDA": "behavior", "DP": "foundation", "Diffuser": "foundation"}


def run_name(env: str, model: str, seed: int) -> str:
    dataset = re.sub(r"[^\w.+-]", "-", env)
    return f"{dataset}_{model}_s{seed}"


def jobs_for(env: str, seeds: list[int], out: Path, extra: dict[str, list[str]],
             models: tuple[str, ...] = tuple(STARTS)) -> list[Job]:
    """Every run of the table's `models`, each seed's base runs before the runs that load them; `extra` holds each
    script's additional arguments."""
    common = ["--env", env, "--preset", "cpu"]
    eda, dp_args, diffuser = ([*common, *extra[script]] for script in ("eda_d4rl", "dp_align", "diffuser_align"))
    base, dependent = [], []
    for seed in seeds:
        dp = Job("dp_align", dp_args, seed, out / run_name(env, "dp", seed), {"model": "DP", "align": "rl,dpo,sft"})
        checkpoint = str(dp.run_dir / "checkpoints" / "latest.pt")
        base += [Job("eda_d4rl", eda, seed, out / run_name(env, "eda", seed), {"model": "EDA", "align": "EDA"}), dp,
                 Job("diffuser_align", diffuser, seed, out / run_name(env, "diffuser", seed),
                     {"model": "Diffuser", "align": "rl,dpo,sft"})]
        dependent += [Job("dp_align", [*dp_args, "--load-foundation", checkpoint, "--load-critic", checkpoint,
                                       "--align", method], seed, out / run_name(env, f"dp-{method}", seed),
                          {"model": "DP", "align": method}, needs=dp.run_dir) for method in DP_METHODS_ALONE]
    return seed_by_seed([job for job in base if job.tags["model"] in models],
                        [job for job in dependent if job.tags["model"] in models])


ROWS = [("EDA", "EDA"), ("DP", "rl,dpo,sft"), *(("DP", method) for method in DP_METHODS_ALONE),
        ("Diffuser", "rl,dpo,sft")]


def row_label(model: str, align: str) -> str:
    if model == "EDA":
        return "EDA (best of 4 by Q)"
    return f"{model} {align}" + (" (sequence)" if "," in align else " alone")


def gain(stages: dict[str, dict], start: str, end: str) -> str:
    if start not in stages or end not in stages:
        return "—"
    return f"{stages[end]['normalized_mean'] - stages[start]['normalized_mean']:+.1f}"


def per_seed(jobs: list[Job], model: str, align: str, start: str, end: str) -> str:
    """'seed: start -> end' for every finished run of the row."""
    cells = []
    for job in jobs:
        summary = job.summary()
        if summary is None or job.tags != {"model": model, "align": align} or end not in summary["stages"]:
            continue
        stages = summary["stages"]
        cells.append(f"{job.seed}: {stages[start]['normalized_mean']:.1f} → {stages[end]['normalized_mean']:.1f}")
    return "; ".join(cells) or "—"


def table_text(jobs: list[Job], cells: Cells, env: str, command: str) -> str:
    rows, seed_rows, monitor_rows = [], [], []
    table_rows = [(model, align, STARTS[model], "aligned", row_label(model, align)) for model, align in ROWS]
    table_rows.insert(1, ("EDA", "EDA", "behavior_1cand", "aligned_1cand", "EDA (1 sample)"))
    for model, align, start, end, label in table_rows:
        stages = cells.stages(model=model, align=align)
        seeds = str(stages[end]["seeds"]) if end in stages else "0"
        rows.append([label, cell(stages.get(start), "normalized_mean", 1), cell(stages.get(end), "normalized_mean", 1),
                     gain(stages, start, end), cell(stages.get("aligned"), "wall_time_s", 0), seeds])
        seed_rows.append([label, per_seed(jobs, model, align, start, end)])
        if end == "aligned":
            monitor_rows.append([label, *(f"{cell(first_stage(stages), key, 2)} → {cell(stages['aligned'], key, 2)}"
                                          if "aligned" in stages and key in stages["aligned"] else "—"
                                          for key in ("denoising_error", "actions_at_bounds"))])
    done = [job for job in jobs if job.finished()]
    devices = sorted({job.summary()["device"] for job in done}) or ["—"]
    commits = sorted({commit for job in done for commit in job.commits()}) or ["—"]
    lines = [f"# `--preset cpu` on {env}", "", f"Command: `{command}`  ",
             f"Runs made with the code of commit {', '.join(f'`{c}`' for c in commits)}; table written at "
             f"`{git_commit()}`  ", f"Device: {', '.join(devices)}", "",
             "D4RL-normalised score of the starting model (EDA: the behavior model; DP and Diffuser: the foundation)",
             "and after alignment, mean ± std over seeds of each run's mean over its evaluation episodes. The DP rows",
             "'alone' load the foundation and critic of the DP sequence run of the same seed. Wall time: the whole run",
             "(a run that loads its foundation and critic leaves their training out).", "",
             markdown_table(["model", "start", "aligned", "gain", "wall time (s)", "seeds"], rows), "",
             "Per seed, start → aligned:", "", markdown_table(["model", "seed: start → aligned"], seed_rows), "",
             "Divergence monitor, start → aligned: denoising error of the model on dataset samples at a small noise",
             "level, and the share of sampled actions at the action bounds. Diffuser predicts x0, so its error in noise",
             "units is scaled by alpha²/sigma² at that level and reads larger than the others' at the same fit.", "",
             markdown_table(["model", "denoising error", "actions at bounds"], monitor_rows)]
    return "\n".join(lines) + "\n"


def curve_stages(names: list[str]) -> list[str]:
    """The stages a curve shows, in run order: 'aligned' only where it is not a copy of the last pass's stage (EDA),
    and not EDA's one-sample evaluations (a row of their own in the table)."""
    has_passes = any("/" in name for name in names)
    return [name for name in names if not name.endswith("_1cand") and not (name == "aligned" and has_passes)]


def plot_stages(cells: Cells, path: Path) -> None:
    """Normalised score after every stage (mean ± std over seeds), one line per row of the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for model, align in ROWS:
        stages = cells.stages(model=model, align=align)
        names = curve_stages(list(stages))
        if not names:
            continue
        mean = np.array([stages[name]["normalized_mean"] for name in names])
        std = np.array([stages[name][std_column("normalized_mean")] for name in names])
        positions = np.arange(len(names))
        line, = axis.plot(positions, mean, marker="o", label=row_label(model, align))
        axis.fill_between(positions, mean - std, mean + std, alpha=0.15, color=line.get_color())
        for position, name in zip(positions, names):
            axis.annotate(name.split("/")[-1], (position, mean[position]), fontsize=6, textcoords="offset points",
                          xytext=(2, 4))
    axis.set_xlabel("stage (in run order)")
    axis.set_ylabel("D4RL-normalised score")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# model -> panels of its base run's training curves: (title, TensorBoard tags drawn in it)
CURVES = {
    "EDA": [("behavior: denoising loss", ["losses/behavior/loss"]), ("critic: Q loss", ["losses/critic/q"]),
            ("alignment: contrastive loss", ["losses/alignment/loss"]),
            ("alignment: accuracy (top candidate)", ["losses/alignment/accuracy"])],
    "DP": [("foundation: denoising loss", ["losses/foundation/loss"]), ("critic: Q loss", ["losses/critic/q"]),
           ("alignment: reward of the samples", ["losses/rl/reward", "losses/dpo/reward", "losses/sft/reward"])],
    "Diffuser": [("foundation: denoising loss", ["losses/foundation/loss"]), ("critic: Q loss", ["losses/critic/q"]),
                 ("alignment: reward of the plans", ["losses/rl/reward", "losses/dpo/reward", "losses/sft/reward"])],
}
DIVERGENCE = ("alignment: denoising error (monitor)", ["divergence/denoising_error"])


def scalar_curves(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar of a run's TensorBoard files: tag -> (steps, values); empty when the run has none here."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    return {tag: (np.array([event.step for event in events.Scalars(tag)]),
                  np.array([event.value for event in events.Scalars(tag)])) for tag in events.Tags()["scalars"]}


def thinned(steps: np.ndarray, values: np.ndarray, points: int = CURVE_POINTS) -> list[list[float]]:
    """At most `points` evenly spaced entries of a curve, first and last kept, values to 4 significant digits."""
    keep = np.unique(np.linspace(0, len(steps) - 1, min(points, len(steps))).round().astype(int))
    return [steps[keep].tolist(), [float(f"{value:.4g}") for value in values[keep]]]


def archive_curves(jobs: list[Job], archive: Path) -> dict[str, dict[str, list]]:
    """The figure's curves of every base run, thinned: from its TensorBoard files where this machine has them (they
    replace the archived copy), else as archived in `archive`; written back and returned by run name."""
    tags = {model: [tag for _, model_tags in [*panels, DIVERGENCE] for tag in model_tags]
            for model, panels in CURVES.items()}
    entries = json.loads(archive.read_text()) if archive.exists() else {}
    for job in jobs:
        if job.needs is None and job.tags["model"] in tags and job.finished():
            curves = scalar_curves(job.run_dir)
            kept = {tag: thinned(*curves[tag]) for tag in tags[job.tags["model"]] if tag in curves}
            if kept:
                entries[job.name] = kept
    archive.write_text(json.dumps(entries, sort_keys=True, separators=(",", ":")) + "\n")
    return entries


def plot_training_curves(jobs: list[Job], archived: dict[str, dict[str, list]], path: Path) -> bool:
    """One row of panels per script (its base runs: EDA, the DP sequence, the Diffuser sequence), one line per seed
    and tag, from archive_curves' curves; returns False (and writes nothing) when no run has any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {model: [(job.seed, archived[job.name]) for job in jobs
                    if job.tags["model"] == model and job.needs is None and job.name in archived] for model in CURVES}
    models = [model for model in CURVES if runs[model]]
    if not models:
        return False
    columns = max(len(CURVES[model]) for model in models) + 1
    figure, axes = plt.subplots(len(models), columns, figsize=(3.2 * columns, 2.6 * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        panels = [*CURVES[model], DIVERGENCE]
        for axis, (title, tags) in zip(row, panels):
            for color, tag in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], tags):
                for seed, curves in runs[model]:
                    if tag in curves:
                        axis.plot(*curves[tag], color=color, alpha=0.8, linewidth=0.8,
                                  label=f"{tag.split('/')[1]}" if seed == runs[model][0][0] and len(tags) > 1 else None)
            axis.set_title(f"{model} {title}", fontsize=8)
            axis.tick_params(labelsize=6)
            axis.set_xlabel("global step", fontsize=7)
            if len(tags) > 1:
                axis.legend(fontsize=6)
        for axis in row[len(panels):]:
            axis.axis("off")
    figure.suptitle("training curves, one line per seed", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="local/hopper/medium-replay-v0", help="a locomotion dataset")
    parser.add_argument("--seeds", default="0-2", help="as benchmarks.sweep --seed: 0-2, 0,3 ...")
    parser.add_argument("--models", nargs="+", choices=tuple(STARTS), default=list(STARTS),
                        help="the rows to run (the table shows whatever has finished)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (--cpu-threads)")
    for script in SCRIPTS:
        parser.add_argument(f"--{script.split('_')[0]}-args", default="", metavar="ARGS",
                            help=f"more arguments for {script}.py only, one string")
    parser.add_argument("--out", type=Path, default=Path("runs/hopper_tables"))
    add_benchmark_arguments(parser)
    options = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    try:
        seeds = seed_list(options.seeds)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    out = options.out.resolve()
    command = "python -m benchmarks.hopper_tables " + shlex.join(a for a in argv if a != "--report-only")
    extra_per_script = {script: ["--cpu-threads", str(options.threads), *extra,
                                 *shlex.split(getattr(options, f"{script.split('_')[0]}_args"))] for script in SCRIPTS}
    jobs = jobs_for(options.env, seeds, out, extra_per_script, tuple(options.models))
    if not run_benchmark(jobs, out, ARCHIVE, options):
        return
    cells = Cells(out)
    if not cells.rows:
        sys.exit("no finished runs under --out to report on")
    (HERE / "hopper_cpu_table.md").write_text(table_text(jobs, cells, options.env, command))
    plot_stages(cells, HERE / "hopper_cpu_stages.png")
    print(f"wrote {HERE / 'hopper_cpu_table.md'} and {HERE / 'hopper_cpu_stages.png'}")
    if plot_training_curves(jobs, archive_curves(jobs, CURVES_ARCHIVE), HERE / "hopper_cpu_curves.png"):
        print(f"wrote {HERE / 'hopper_cpu_curves.png'} (curves kept in {CURVES_ARCHIVE.name})")
    else:
        print(f"no curves under {out} or in {CURVES_ARCHIVE.name}: {HERE / 'hopper_cpu_curves.png'} not written")


if __name__ == "__main__":
    main()
