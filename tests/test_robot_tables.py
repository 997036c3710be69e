"""The robotics tables: one sweep per model, and the table built from the sweeps' summaries."""
import json

from benchmarks import robot_tables, sweep


def test_each_model_is_one_sweep_over_its_tables_datasets(tmp_path):
    argv = robot_tables.sweep_argv("metaworld", "DD", "0-2", tmp_path, "--executor slurm --partition cpu",
                                   ["--preset", "cpu"])
    assert argv[:5] == ["diffuser_align.py", "--env", ",".join(robot_tables.DATASETS["metaworld"]), "--seed", "0-2"]
    assert argv[argv.index("--out") + 1] == str(tmp_path / "metaworld_dd")
    assert argv[argv.index("--") + 1:] == ["--planner", "dd", "--sampler", "ddpm", "--preset", "cpu"]
    assert "--executor" in argv[:argv.index("--")]


def test_the_table_has_success_and_score_before_and_after_over_seeds_next_to_the_paper(tmp_path, monkeypatch):
    monkeypatch.setattr(robot_tables, "HERE", tmp_path)
    folder = robot_tables.sweep_folder(tmp_path / "runs", "robotics", "DP idql")
    points = sweep.grid("dp_align.py", ["robomimic/lift/scripted-mh"], [0, 1], [], [], folder)
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text(json.dumps({"points": [{"name": p.name, "env": p.env} for p in points]}))
    for point, (before, after) in zip(points, [(0.2, 0.6), (0.4, 1.0)]):
        point.run_dir.mkdir()
        stage = lambda rate: {"success_rate": rate, "normalized_mean": 100 * rate}
        point.run_dir.joinpath("summary.json").write_text(json.dumps({
            "stages": {"foundation": stage(before), "pass1/rl": stage(0.5), "aligned": stage(after)},
            "wall_time_s": 60.0, "device": "cpu"}))
    text = robot_tables.table_text("robotics", tmp_path / "runs", "cmd")
    assert ("| DP idql | robomimic/lift/scripted-mh | 0.30 ± 0.10 → 0.80 ± 0.20 | 30.0 ± 10.0 → 80.0 ± 20.0 | "
            "60 ± 0 | 2 | 0.79 → 1.0 (lift-mh) |") in text
    assert "| DP expectation | pusht/scripted | — | — | — | 0 | 0.42 → 1.0 |" in text
