"""benchmarks/: the speed script measures our loops on the CPU, renders the same report from its JSON, and compares
implementations the way gpu.md quotes them."""
import json
import math
import subprocess
import sys

from benchmarks.speed import Row, comparisons, paper_scale_eda_hours


def test_speed_script_measures_and_rerenders_from_its_json(tmp_path, repo_root):
    results, report = tmp_path / "speed.json", tmp_path / "speed.md"
    command = [sys.executable, "-m", "benchmarks.speed", "--device", "cpu", "--groups", "Diffuser", "--windows", "1",
               "--window-s", "0.01", "--warmup", "0", "--threads", "1", "--json", str(results), "--out", str(report)]
    subprocess.run(command, cwd=repo_root, check=True, capture_output=True, text=True, timeout=600)
    rows = json.loads(results.read_text())["rows"]
    assert [(row["loop"], row["implementation"], row["variant"]) for row in rows] == [
        ("planning, 16 plans x 20 DDPM steps, 1 env", "ours", "eager, torch defaults"),
        ("training step, batch 256", "ours", "eager, torch defaults")]
    assert all(math.isfinite(row["value"]) and row["value"] > 0 and row["note"].startswith("temporal U-Net")
               for row in rows)
    rerendered = tmp_path / "again.md"
    subprocess.run([sys.executable, "-m", "benchmarks.speed", "--from-json", str(results), "--out", str(rerendered)],
                   cwd=repo_root, check=True, timeout=120)
    assert rerendered.read_text() == report.read_text()
    assert "| training step, batch 256 | ours | eager, torch defaults |" in report.read_text()


def test_bad_groups_are_refused_with_exit_code_2(repo_root):
    result = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--device", "cpu", "--groups", "EDA,PPO"],
                            cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--groups takes EDA, DP and Diffuser" in result.stderr


def _row(loop, implementation, variant, value, unit="steps/s", note=""):
    return Row("EDA", loop, implementation, variant, unit, value=value, note=note)


def test_comparisons_take_our_fastest_finite_row_against_the_shipped_default():
    loop = "behavior step, batch 256"
    rows = [_row(loop, "ours", "eager, torch defaults", 70.0), _row(loop, "ours", "CUDA graph, TF32", 800.0),
            _row(loop, "ours", "CUDA graph, TF32, bf16 autocast", 900.0, note="non-finite output; "),
            _row(loop, "authors' EDA code", "as shipped, torch defaults", 100.0),
            _row(loop, "authors' EDA code", "as shipped, TF32", 400.0)]  # not the shipped default: not compared
    [line] = comparisons(rows)
    assert "| CUDA graph, TF32 | 8.00x the rate (800 vs 100 steps/s) |" in line
    latency = "evaluation action, 20 envs, best of 4 by Q"
    [line] = comparisons([_row(latency, "ours", "x", 2.0, "ms"),
                          _row(latency, "authors' EDA code", "as shipped, torch defaults", 70.0, "ms")])
    assert "35.00x lower latency (2 ms vs 70 ms)" in line


def test_paper_scale_estimate_adds_the_stages_at_their_measured_rates():
    rows = [_row("behavior step, batch 2048", "ours", "g", 1000.0),  # 1M steps: 1000 s
            _row("IQL critic step, batch 256", "ours", "g", 1500.0),  # 1.5M steps: 1000 s
            _row("candidates, 1024 states x K 16 per call", "ours", "g", 10_000.0, "states/s"),  # 100 s
            _row("alignment step, 256 states x K 16", "ours", "g", 200.0)]  # 200k steps: 1000 s
    lines = paper_scale_eda_hours(rows)
    assert lines[-1] == "| **total** | | | **51.7 min** |"  # 3100 s
    assert paper_scale_eda_hours(rows[:3]) == []  # a missing stage gives no estimate


def test_unknown_script_modes_are_refused_with_exit_code_2(repo_root):
    result = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--device", "cpu", "--scripts-on", "nav1d-full",
                             "--modes", "eager,turbo"], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "turbo" in result.stderr
