"""The layout contract: a script together with `common/` is all a user copies into their project, so
`common/` never imports a top-level file, and each script runs end to end from such a copy."""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, make_tiny_hopper_dataset

TOP_LEVEL_MODULES = {path.stem for path in REPO_ROOT.glob("*.py")} | {"benchmarks", "tests"}


def test_common_never_imports_a_top_level_file():
    for path in (REPO_ROOT / "common").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] not in TOP_LEVEL_MODULES, f"{path.name} imports {name}"


COPY_RUNS = {
    "eda_d4rl": ["--behavior-steps", "3", "--critic-steps", "3", "--align-steps", "3", "--K", "2", "--hidden", "16",
                 "--blocks", "1", "--critic-hidden", "16", "--behavior-batch-size", "16", "--align-batch-size", "4",
                 "--num-candidates", "2", "--sampler-steps", "2", "--eval-every", "0"],
    "dp_align": ["--foundation-steps", "3", "--critic-steps", "3", "--align", "rl,sft", "--rl-steps", "1",
                 "--sft-steps", "1", "--hidden", "16", "--critic-hidden", "16", "--batch-size", "16",
                 "--align-batch", "2", "--group-size", "2", "--sample-steps", "2", "--train-steps", "2",
                 "--num-candidates", "2", "--sft-elbo-draws", "2"],
}


@pytest.mark.parametrize("script", COPY_RUNS)
def test_a_script_with_common_alone_runs_end_to_end_on_hopper_data(tmp_path, script):
    dataset_id = f"mujoco/hopper/copy{script.split('_')[0]}-v0"
    make_tiny_hopper_dataset(dataset_id)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO_ROOT / f"{script}.py", project)
    shutil.copytree(REPO_ROOT / "common", project / "common", ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, f"{script}.py", "--env", dataset_id, "--run-dir", "run", "--eval-episodes",
                             "1", "--eval-max-steps", "5", "--cpu-threads", "1", *COPY_RUNS[script]], cwd=project,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((project / "run" / "summary.json").read_text())
    assert np.isfinite(summary["stages"]["aligned"]["normalized_mean"])


def test_the_repository_never_points_to_a_design_document_it_does_not_hold():
    """The repository stands on its own: its code and docs cite the README, the papers or files it holds, never
    the sections of the team's design notes, which are not part of it."""
    citation = re.compile(r"\bDESIGN(\.md| \d| section)")
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    citing = [name for name in tracked.split() if name.endswith((".py", ".md", ".sh"))
              and citation.search((REPO_ROOT / name).read_text(encoding="utf-8"))]
    assert citing == [], f"these files cite design notes that are not in the repository: {citing}"
