"""`--preset cpu` on a locomotion dataset: every script runs its whole method with the preset's sizes, the dataset's
own preset underneath and the command line on top (here it cuts the step counts so the run takes seconds)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, make_tiny_hopper_dataset

DATASET = "mujoco/hopper/presettiny-v0"
CUT_STEPS = {  # every stage a few steps long, evaluation two short episodes
    "eda_d4rl": ["--behavior-steps", "3", "--critic-steps", "3", "--align-steps", "3", "--K", "2",
                 "--sampler-steps", "2", "--log-every", "1"],
    "dp_align": ["--foundation-steps", "3", "--critic-steps", "3", "--rl-steps", "2", "--dpo-steps", "2",
                 "--sft-steps", "2", "--sample-steps", "3", "--log-every", "1"],
    "diffuser_align": ["--foundation-steps", "3", "--critic-steps", "3", "--rl-steps", "2", "--dpo-steps", "2",
                       "--sft-steps", "2", "--sample-steps", "5", "--num-candidates", "2", "--log-every", "1"],
}
FROM_THE_PRESET = {  # what the cpu preset sets and the run must show
    "eda_d4rl": {"hidden": 128, "blocks": 2, "data_ratio": 0.05, "align_batch_size": 64, "beta": 3.0},
    "dp_align": {"backbone": "mlp", "depth": 3, "train_steps": 200, "spacing": "quadratic", "kl_coef": 0.1},
    "diffuser_align": {"horizon": 8, "unet_base_dim": 32, "train_steps": 200, "align_batch": 16, "kl_coef": 0.1,
                       "sft_data_weight": 1.0},
}


@pytest.mark.parametrize("script", list(CUT_STEPS))
def test_the_cpu_preset_runs_the_whole_method_on_hopper_data(script, tmp_path):
    make_tiny_hopper_dataset(DATASET, episodes=6, steps=40)
    run_dir = tmp_path / "run"
    command = [sys.executable, f"{script}.py", "--env", DATASET, "--preset", "cpu", "--run-dir", str(run_dir),
               "--eval-episodes", "2", "--eval-max-steps", "5", "--cpu-threads", "1", *CUT_STEPS[script]]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for name, value in FROM_THE_PRESET[script].items():
        assert summary["args"][name] == value, name
    assert summary["args"]["eval_episodes"] == 2  # the command line over the preset
    assert all(stats["episodes"] == 2 for stats in summary["stages"].values())
    assert summary["throughput"]["eval_actions_per_s"] > 0  # the evaluation's speed
    assert "aligned" in summary["stages"]
