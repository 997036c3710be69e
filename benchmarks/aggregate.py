"""A sweep's summaries as one table: mean ± std over seeds per dataset, swept values and stage.

    python -m benchmarks.aggregate --out runs/sweeps/eda_beta

reads DIR/sweep.json (written by benchmarks.sweep) and every finished run's summary.json, and writes DIR/table.md
(markdown) and DIR/table.csv (one row per dataset, values and stage; the spread is the population std over the seeds
that finished, and `seeds` says how many that was). Per stage: return, normalised score, success rate, coherency and
the divergence monitor (denoising error, actions at the bounds) where the script reports them, `episode_std` (the spread of the evaluation episodes' returns within a run, averaged
over seeds) and `wall_time_s` (the whole run's). The Nav1D tables (benchmarks.nav1d_tables) are built from these rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.runner import markdown_table, mean_std

# column -> where a run's summary has it: a stage's key, or (for the whole run) the summary's own key
STAGE_METRICS = {"return_mean": "return_mean", "normalized_mean": "normalized_mean", "success_rate": "success_rate",
                 "coherency": "coherency", "episode_std": "return_std", "denoising_error": "denoising_error",
                 "actions_at_bounds": "actions_at_bounds"}
RUN_METRICS = ("wall_time_s",)
METRICS = (*STAGE_METRICS, *RUN_METRICS)


def std_column(metric: str) -> str:
    """return_mean -> return_std, success_rate -> success_rate_std."""
    return metric[: -len("_mean")] + "_std" if metric.endswith("_mean") else metric + "_std"


def rows(out: Path) -> tuple[list[str], list[dict]]:
    """(swept options, one dict per dataset x values x stage with the seeds' metrics) of the sweep in `out`."""
    sweep = json.loads((out / "sweep.json").read_text())
    groups: dict[tuple, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for point in sweep["points"]:
        summary_path = out / point["name"] / "summary.json"
        if not summary_path.is_file():
            continue
        key = (point["env"],) + tuple(point["values"][option] for option in sweep["options"])
        summary = json.loads(summary_path.read_text())
        for stage, stats in summary["stages"].items():
            # EDA reports its stages' coherency beside the stages
            stats = stats | ({"coherency": summary["coherency"][stage]} if stage in summary.get("coherency", {}) else {})
            for metric, field in STAGE_METRICS.items():
                if field in stats:
                    groups[key][stage][metric].append(float(stats[field]))
            for metric in RUN_METRICS:
                if metric in summary:
                    groups[key][stage][metric].append(float(summary[metric]))
    table = []
    for key, stages in groups.items():
        for stage, metrics in stages.items():
            row = {"env": key[0], **dict(zip(sweep["options"], key[1:])), "stage": stage,
                   "seeds": len(next(iter(metrics.values())))}
            for metric, values in metrics.items():
                row[metric], row[std_column(metric)] = float(np.mean(values)), float(np.std(values))
                row[f"{metric}_cell"] = mean_std(values)
            table.append(row)
    return sweep["options"], table


class Cells:
    """A sweep's rows (mean ± std over seeds per values and stage), looked up by the values that group runs into one
    row of a benchmark's table (benchmarks.nav1d_tables, benchmarks.hopper_tables)."""

    def __init__(self, out: Path):
        self.rows = rows(out)[1] if (out / "sweep.json").is_file() else []

    def stages(self, **tags) -> dict[str, dict]:
        """stage -> aggregated row, in the runs' stage order, for the runs whose tags include `tags`."""
        wanted = {key: str(value) for key, value in tags.items()}
        found: dict[str, dict] = {}
        for row in self.rows:
            if all(row.get(key) == value for key, value in wanted.items()):
                if row["stage"] in found:
                    raise ValueError(f"the tags {tags} match runs of more than one table row")
                found[row["stage"]] = row
        return found


def cell(row: dict | None, metric: str, digits: int = 2) -> str:
    """'mean ± std' over seeds of an aggregated row's metric; '—' where no finished run has it."""
    if row is None or metric not in row:
        return "—"
    return f"{row[metric]:.{digits}f} ± {row[std_column(metric)]:.{digits}f}"


def first_stage(stages: dict[str, dict]) -> dict:
    return stages["foundation"] if "foundation" in stages else stages["behavior"]


def before_after(stages: dict[str, dict]) -> tuple[str, str, str, str]:
    """Return before → after (mean ± std over seeds), the episode std before → after (mean over seeds), coherency
    before → after, and how many seeds finished."""
    if "aligned" not in stages:
        return "—", "—", "—", "0"
    before, after = first_stage(stages), stages["aligned"]
    spread = f"{before['episode_std']:.2f} → {after['episode_std']:.2f}"
    coherency = "—"
    if "coherency" in before and "coherency" in after:
        coherency = f"{before['coherency']:.2f} → {after['coherency']:.2f}"
    return f"{cell(before, 'return_mean')} → {cell(after, 'return_mean')}", spread, coherency, str(after["seeds"])


def write(out: Path) -> tuple[Path, Path]:
    options, table = rows(out)
    if not table:
        raise ValueError(f"no finished run in {out}")
    present = [metric for metric in METRICS if any(metric in row for row in table)]
    header = ["env", *options, "stage", "seeds", *present]
    markdown = markdown_table(header, [[row["env"], *(row[option] for option in options), row["stage"],
                                        str(row["seeds"]), *(row.get(f"{metric}_cell", "—") for metric in present)]
                                       for row in table])
    (out / "table.md").write_text(markdown + "\n")
    numbers = [column for metric in present for column in (metric, std_column(metric))]
    with open(out / "table.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["env", *options, "stage", "seeds", *numbers])
        for row in table:
            writer.writerow([row["env"], *(row[option] for option in options), row["stage"], row["seeds"],
                             *(row.get(column, "") for column in numbers)])
    return out / "table.md", out / "table.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the sweep's folder (benchmarks.sweep --out)")
    options = parser.parse_args(argv)
    if not (options.out / "sweep.json").is_file():
        print(f"error: {options.out} holds no sweep.json (made by python -m benchmarks.sweep)", file=sys.stderr)
        return 2
    try:
        markdown, table = write(options.out)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown.read_text(), end="")
    print(f"wrote {markdown} and {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
