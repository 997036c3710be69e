"""The benchmark runner's bookkeeping: which runs the tables share, and how a table turns summaries (aggregated by
benchmarks.aggregate) into numbers."""

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import aggregate, nav1d_tables, runner
from benchmarks.runner import run_jobs


def write_summary(job, before: float, after: float) -> None:
    job.run_dir.mkdir(parents=True)
    stage = lambda value: {"return_mean": value, "return_std": 0.5, "normalized_mean": 10 * value, "coherency": 1.0}
    job.summary_path.write_text(json.dumps({"stages": {"foundation": stage(before), "aligned": stage(after)},
                                            "wall_time_s": 100.0, "device": "cpu"}))


def test_methods_share_the_policy_tables_expectation_runs(tmp_path):
    base, variants = nav1d_tables.method_jobs(tmp_path, [0, 1])
    expectation = {job.run_dir for job in nav1d_tables.policy_jobs(tmp_path, [0, 1])
                   if job.tags["selection"] == "expectation"}
    dp_bases = {job.run_dir for job in base if job.script == "dp_align"}
    assert dp_bases == expectation
    for job in variants:  # every single-method run loads the foundation and critic of its own seed's base run
        checkpoint = Path(job.args[job.args.index("--load-foundation") + 1])
        assert checkpoint.parent.parent.name == f"policy_expectation_{job.tags['data']}_s{job.seed}"
        assert job.args[job.args.index("--load-critic") + 1] == str(checkpoint)


def test_eda_ratio_points_load_the_full_data_run_of_their_seed(tmp_path):
    full, variants = nav1d_tables.eda_ratio_jobs(tmp_path, [3])
    assert [job.tags["ratio"] for job in full] == [1.0]
    assert sorted(job.tags["ratio"] for job in variants) == sorted(r for r in nav1d_tables.DATA_RATIOS if r < 1)
    assert all(str(full[0].run_dir) in job.args[job.args.index("--load-behavior") + 1] for job in variants)


def test_table_cells_are_mean_and_std_over_seeds(tmp_path):
    base, variants = nav1d_tables.method_jobs(tmp_path, [0, 1])
    qvpg_full = [j for j in variants if j.tags == {"method": "qvpg", "data": "full"}]
    for job, (before, after) in zip(qvpg_full, [(1.0, 5.0), (2.0, 6.0)]):
        write_summary(job, before, after)
    runner.write_sweep_description(base + variants, tmp_path)
    table = nav1d_tables.methods_table(base + variants, nav1d_tables.Cells(tmp_path), "cmd")
    row = next(line for line in table.splitlines() if line.startswith("| qvpg | full |"))
    assert row == "| qvpg | full | 1.50 ± 0.50 → 5.50 ± 0.50 | 55.0 ± 5.0 | 1.00 → 1.00 | 100 ± 0 | 2 |"
    empty = next(line for line in table.splitlines() if line.startswith("| dpo | full |"))
    assert empty.endswith("| 0 |")  # a method with no finished run shows no numbers rather than zeros


def test_runner_skips_finished_runs_and_reports_failures(tmp_path):
    done = nav1d_tables.eda_job(tmp_path, "full", 0)
    write_summary(done, 1.0, 2.0)
    broken = nav1d_tables.Job("eda_d4rl", ["--env", "no-such-env"], 0, tmp_path / "broken")
    assert run_jobs([done, broken], parallel=2) == [broken]
    assert "no-such-env" in broken.log_path.read_text()


def test_a_run_that_loads_a_failed_run_is_skipped_not_started(tmp_path):
    broken = nav1d_tables.Job("eda_d4rl", ["--env", "no-such-env"], 0, tmp_path / "broken")
    loads_it = nav1d_tables.Job("eda_d4rl", ["--env", "nav1d-full"], 0, tmp_path / "loads_it", needs=broken.run_dir)
    assert run_jobs([broken, loads_it], parallel=2) == [broken, loads_it]
    assert not loads_it.log_path.exists() and not loads_it.run_dir.exists()


def test_a_run_listed_before_the_run_it_loads_is_refused(tmp_path):
    base = nav1d_tables.eda_job(tmp_path, "full", 0)
    ratio = nav1d_tables.eda_ratio_jobs(tmp_path, [0])[1][0]
    with pytest.raises(ValueError, match="listed before"):
        run_jobs([ratio, base], parallel=2)


def test_a_free_worker_starts_the_next_ready_run_instead_of_waiting_for_a_base(tmp_path):
    """[base A, run loading A, base B] with two workers: B runs beside A, and the run loading A starts after A."""
    script = tmp_path / "timed.py"
    script.write_text("import json, pathlib, sys, time\n"
                      "run_dir = pathlib.Path(sys.argv[sys.argv.index('--run-dir') + 1]); run_dir.mkdir(parents=True)\n"
                      "start = time.time(); time.sleep(1.5)\n"
                      "(run_dir / 'summary.json').write_text(json.dumps({'start': start, 'end': time.time()}))\n")
    name = str(script.with_suffix(""))
    base_a = nav1d_tables.Job(name, [], 0, tmp_path / "base_a")
    loads_a = nav1d_tables.Job(name, [], 0, tmp_path / "loads_a", needs=base_a.run_dir)
    base_b = nav1d_tables.Job(name, [], 1, tmp_path / "base_b")
    assert run_jobs([base_a, loads_a, base_b], parallel=2) == []
    times = {job.name: job.summary() for job in (base_a, loads_a, base_b)}
    assert times["base_b"]["start"] < times["base_a"]["end"] <= times["loads_a"]["start"], times


def test_sweeps_run_seed_by_seed_each_base_before_the_runs_that_load_it(tmp_path):
    base, variants = nav1d_tables.method_jobs(tmp_path, [0, 1])
    ratio_base, ratio_variants = nav1d_tables.eda_ratio_jobs(tmp_path, [0, 1])
    order = nav1d_tables.seed_by_seed(base + ratio_base, variants + ratio_variants)
    assert len(order) == len({job.run_dir for job in base + variants + ratio_base + ratio_variants})
    assert [job.seed for job in order] == sorted(job.seed for job in order)
    position = {job.run_dir: index for index, job in enumerate(order)}
    assert all(position[job.needs] < position[job.run_dir] for job in order if job.needs is not None)


def test_archived_runs_come_back_only_for_the_code_that_made_them(tmp_path, monkeypatch):
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=nav1d_tables.REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setattr(runner, "git_commit", lambda paths=(): head)  # this checkout, as if it had no edits
    archive = tmp_path / "runs.json"
    made_now, made_before = nav1d_tables.eda_job(tmp_path / "a", "full", 0), nav1d_tables.eda_job(tmp_path / "a", "full", 1)
    for job, commit in [(made_now, head), (made_before, "0000000")]:  # 0000000: code git does not know, so other code
        write_summary(job, 1.0, 2.0 + job.seed)
        job.commits_path.parent.mkdir(parents=True, exist_ok=True)
        job.commits_path.write_text(commit + "\n")
    runner.archive_summaries([made_now, made_before], archive)
    assert set(json.loads(archive.read_text())) == {made_now.run_dir.name, made_before.run_dir.name}

    fresh = [nav1d_tables.eda_job(tmp_path / "b", "full", seed) for seed in (0, 1)]
    assert runner.restore_summaries(fresh, archive) == 1  # continuing a sweep: the same code only
    assert fresh[0].summary() == made_now.summary() and fresh[0].commits_path.read_text() == head + "\n"
    assert fresh[1].summary() is None
    assert runner.restore_summaries(fresh, archive, same_code_only=False) == 1  # rebuilding tables: every run
    assert fresh[1].summary()["stages"]["aligned"]["return_mean"] == 3.0

    other_option = nav1d_tables.eda_job(tmp_path / "c", "full", 0)
    other_option.args += ["--beta", "2.0"]
    assert runner.restore_summaries([other_option], archive) == 0  # the same code, another option: trained again


def test_an_archived_base_run_is_trained_again_when_a_run_still_to_be_made_loads_it(tmp_path, monkeypatch):
    """The archive keeps summaries, not checkpoints: restoring a base whose dependants must still run would leave
    them nothing to load."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=nav1d_tables.REPO_ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    monkeypatch.setattr(runner, "git_commit", lambda paths=(): head)
    archive = tmp_path / "runs.json"
    made_base, made_variants = nav1d_tables.eda_ratio_jobs(tmp_path / "a", [0])
    for job in made_base + made_variants[:1]:  # the sweep stopped after the first ratio point
        write_summary(job, 1.0, 2.0)
        job.commits_path.parent.mkdir(parents=True, exist_ok=True)
        job.commits_path.write_text(head + "\n")
    runner.archive_summaries(made_base + made_variants, archive)

    base, variants = nav1d_tables.eda_ratio_jobs(tmp_path / "b", [0])
    assert runner.restore_summaries(base + variants, archive) == 1  # the finished ratio point only
    assert base[0].summary() is None and variants[0].summary() is not None

    base, variants = nav1d_tables.eda_ratio_jobs(tmp_path / "c", [0])
    assert runner.restore_summaries(base + base + variants[:1], archive) == 2  # none left to load the base; twice listed
    base, variants = nav1d_tables.eda_ratio_jobs(tmp_path / "d", [0])
    assert runner.restore_summaries(base + variants, archive, same_code_only=False) == 2  # tables: every summary


def test_the_nav1d_runs_are_a_sweep_that_benchmarks_aggregate_tabulates(tmp_path):
    base, variants = nav1d_tables.method_jobs(tmp_path, [0, 1])
    jobs = [job for job in base + variants if job.tags.get("method") == "dpo" or job.script == "eda_d4rl"]
    for job in jobs:
        write_summary(job, 1.0, 2.0 + job.seed)
    runner.write_sweep_description(base + variants, tmp_path)
    options, rows = aggregate.rows(tmp_path)
    assert "method" in options and "data" in options
    dpo_full = [row for row in rows if row["method"] == "dpo" and row["data"] == "full" and row["stage"] == "aligned"]
    assert len(dpo_full) == 1 and dpo_full[0]["seeds"] == 2 and dpo_full[0]["return_mean"] == 2.5


def test_eda_coherency_is_read_from_the_summarys_coherency_block(tmp_path):
    job = nav1d_tables.eda_job(tmp_path, "expert", 0)
    job.run_dir.mkdir(parents=True)
    stage = {"return_mean": 7.0, "return_std": 0.1, "normalized_mean": 95.0}
    job.summary_path.write_text(json.dumps({"stages": {"behavior": stage, "aligned": stage}, "wall_time_s": 1.0,
                                            "device": "cpu", "coherency": {"behavior": 0.8, "aligned": 0.7}}))
    runner.write_sweep_description([job], tmp_path)
    table = nav1d_tables.methods_table([job], nav1d_tables.Cells(tmp_path), "cmd")
    assert "| EDA | expert | 7.00 ± 0.00 → 7.00 ± 0.00 | 95.0 ± 0.0 | 0.80 → 0.70 |" in table


def test_run_commits_name_the_last_change_to_the_runs_code(tmp_path):
    job = nav1d_tables.eda_job(tmp_path, "full", 0)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=nav1d_tables.HERE).stdout.strip()
    job.commits_path.parent.mkdir(parents=True)
    job.commits_path.write_text(f"{head}\n{head}+uncommitted\n")
    last_change = subprocess.run(["git", "log", "-1", "--format=%h", "--", *job.code_paths], capture_output=True,
                                 text=True, check=True, cwd=nav1d_tables.HERE.parent).stdout.strip()
    assert job.commits() == [last_change, f"{last_change}+uncommitted"]


def test_a_change_to_another_datasets_module_keeps_nav1d_runs_current(tmp_path, monkeypatch):
    """In a repository of its own: after a commit that touches only PushT's module, a Nav1D run's code still last
    changed at the first commit, and a PushT run's at the second."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    for path in ("dp_align.py", "nav1d.py", "common/data.py", *runner.NOT_RUN_BY_NAV1D):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("# first\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "code")
    first = git("rev-parse", "--short", "HEAD")
    (tmp_path / "common/pusht_tasks.py").write_text("# changed\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "pusht only")
    second = git("rev-parse", "--short", "HEAD")
    monkeypatch.setattr(runner, "REPO_ROOT", tmp_path)
    runner.last_change.cache_clear()
    nav1d_run = runner.Job("dp_align", ["--env", "nav1d-full"], 0, tmp_path / "runs" / "a")
    pusht_run = runner.Job("dp_align", ["--env", "pusht/dp"], 0, tmp_path / "runs" / "b")
    try:
        assert runner.last_change(second, nav1d_run.code_paths) == first
        assert runner.last_change(second, pusht_run.code_paths) == second
        (tmp_path / "common/pusht_tasks.py").write_text("# edited, not committed\n")
        assert runner.git_commit(nav1d_run.code_paths) == second
        assert runner.git_commit(pusht_run.code_paths) == f"{second}+uncommitted"
    finally:
        runner.last_change.cache_clear()
