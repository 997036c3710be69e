"""The Hopper benchmark's bookkeeping: which runs it makes, what each loads, and how its table reads their summaries."""
import json
from pathlib import Path

import pytest

from benchmarks import hopper_tables, runner
from benchmarks.aggregate import Cells

ENV = "local/hopper/medium-replay-v0"
EXTRA = {"eda_d4rl": ["--beta", "2"], "dp_align": ["--dpo-beta", "5"], "diffuser_align": ["--horizon", "8"]}


def test_each_seed_runs_every_script_and_dps_methods_alone_load_the_dp_sequence_run(tmp_path):
    jobs = hopper_tables.jobs_for(ENV, [0, 1], tmp_path, EXTRA)
    assert len(jobs) == 2 * (3 + len(hopper_tables.DP_METHODS_ALONE))
    assert [job.seed for job in jobs[:6]] == [0] * 6  # seed by seed
    for job in jobs:
        assert job.args[:4] == ["--env", ENV, "--preset", "cpu"]
        assert all(argument in job.args for argument in EXTRA[job.script])  # each script gets its own extras only
        assert not any(argument in job.args for script, extra in EXTRA.items() if script != job.script
                       for argument in extra[:1])
    assert {job.tags["model"] for job in hopper_tables.jobs_for(ENV, [0], tmp_path, EXTRA, ("DP",))} == {"DP"}
    alone = [job for job in jobs if job.needs is not None]
    assert {job.tags["align"] for job in alone} == set(hopper_tables.DP_METHODS_ALONE)
    for job in alone:
        base = next(other for other in jobs if other.run_dir == job.needs)
        assert base.tags == {"model": "DP", "align": "rl,dpo,sft"} and base.seed == job.seed
        assert job.args[job.args.index("--load-foundation") + 1] == str(base.run_dir / "checkpoints" / "latest.pt")
        assert jobs.index(base) < jobs.index(job)


def write_summary(job: runner.Job, start: float, end: float) -> None:
    first = "behavior" if job.script == "eda_d4rl" else "foundation"
    stage = lambda score: {"return_mean": 10 * score, "return_std": 1.0, "normalized_mean": score,
                           "denoising_error": 0.5, "actions_at_bounds": 0.1}
    stages = {first: stage(start), "aligned": stage(end)}
    if job.script == "eda_d4rl":
        stages |= {"behavior_1cand": stage(start - 5), "aligned_1cand": stage(end - 5)}
    job.run_dir.mkdir(parents=True)
    job.summary_path.write_text(json.dumps({"stages": stages, "wall_time_s": 60.0, "device": "cpu"}))


def test_the_table_gives_start_aligned_and_gain_over_seeds_and_per_seed(tmp_path):
    jobs = hopper_tables.jobs_for(ENV, [0, 1], tmp_path, {script: [] for script in hopper_tables.SCRIPTS})
    for job in jobs:
        if job.tags["align"] != "dpo":  # a row with no finished run
            write_summary(job, 20.0 + job.seed, 50.0 + 3 * job.seed)
    runner.write_sweep_description(jobs, tmp_path)
    table = hopper_tables.table_text(jobs, Cells(tmp_path), ENV, "cmd")
    assert "| DP rl,dpo,sft (sequence) | 20.5 ± 0.5 | 51.5 ± 1.5 | +31.0 | 60 ± 0 | 2 |" in table
    assert "| EDA (1 sample) | 15.5 ± 0.5 | 46.5 ± 1.5 | +31.0 |" in table
    assert "| DP dpo alone | — | — | — | — | 0 |" in table
    assert "| Diffuser rl,dpo,sft (sequence) | 0: 20.0 → 50.0; 1: 21.0 → 53.0 |" in table
    assert "| EDA (best of 4 by Q) | 0.50 ± 0.00 → 0.50 ± 0.00 | 0.10 ± 0.00 → 0.10 ± 0.00 |" in table
    assert hopper_tables.curve_stages(["foundation", "pass1/rl", "pass1/dpo", "aligned"]) == [
        "foundation", "pass1/rl", "pass1/dpo"]
    assert hopper_tables.curve_stages(["behavior", "aligned", "behavior_1cand", "aligned_1cand"]) == [
        "behavior", "aligned"]
    hopper_tables.plot_stages(Cells(tmp_path), tmp_path / "stages.png")
    assert (tmp_path / "stages.png").stat().st_size > 0


def test_bad_seeds_are_refused_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        hopper_tables.main(["--seeds", "3-1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "runs backwards" in capsys.readouterr().err
    assert not Path(tmp_path / "sweep.json").exists()


def test_training_curves_come_from_tensorboard_and_are_kept_thinned_in_their_archive(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    archive = tmp_path / "curves.json"
    jobs = hopper_tables.jobs_for(ENV, [0, 1], tmp_path, {script: [] for script in hopper_tables.SCRIPTS})
    nothing = hopper_tables.archive_curves(jobs, archive)  # no run has written anything
    assert nothing == {} and not hopper_tables.plot_training_curves(jobs, nothing, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    eda = [job for job in jobs if job.script == "eda_d4rl"]
    for job in eda:
        with SummaryWriter(str(job.run_dir)) as writer:
            for step in range(500):
                writer.add_scalar("losses/alignment/loss", 2.7 - 0.0001 * step, step)
                writer.add_scalar("charts/SPS", 100.0, step)  # not a tag of the figure: not archived
        job.summary_path.write_text("{}")
    curves = hopper_tables.scalar_curves(eda[0].run_dir)
    assert len(curves["losses/alignment/loss"][0]) == 500
    assert hopper_tables.plot_training_curves(jobs, hopper_tables.archive_curves(jobs, archive),
                                              tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    kept = json.loads(archive.read_text())
    assert sorted(kept) == sorted(job.name for job in eda) and list(kept[eda[0].name]) == ["losses/alignment/loss"]
    steps, values = kept[eda[0].name]["losses/alignment/loss"]
    assert len(steps) == hopper_tables.CURVE_POINTS and steps[0] == 0 and steps[-1] == 499
    assert values[-1] == pytest.approx(2.7 - 0.0499, abs=1e-3)  # 4 significant digits

    for job in eda:  # on another machine: the TensorBoard files are gone, the archive is committed
        for events in job.run_dir.glob("events.out.tfevents.*"):
            events.unlink()
    (tmp_path / "curves.png").unlink()
    assert hopper_tables.plot_training_curves(jobs, hopper_tables.archive_curves(jobs, archive),
                                              tmp_path / "curves.png")
    assert json.loads(archive.read_text()) == kept
