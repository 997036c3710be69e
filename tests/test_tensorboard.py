"""TensorBoard output of every script: one step axis that never goes back (a global step across stages and
passes), evaluations on that axis, learning rates logged, and the resolved arguments as a text table."""
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO_ROOT
from test_diffuser_align import TINY as TINY_DIFFUSER
from test_dp_align import TINY as TINY_DP
from test_eda import TINY_NAV1D as TINY_EDA

RUNS = {
    "eda_d4rl": TINY_EDA,
    "dp_align": [*TINY_DP, "--passes", "2", "--align", "rl,dpo,cascade"],
    "diffuser_align": [*TINY_DIFFUSER, "--passes", "2", "--align", "qvpg,sft"],
}


@pytest.fixture(scope="module", params=list(RUNS))
def events(request, tmp_path_factory):
    script = request.param
    run_dir = tmp_path_factory.mktemp(script) / "run"
    result = subprocess.run([sys.executable, f"{script}.py", "--env", "nav1d-full", *RUNS[script], "--run-dir",
                             str(run_dir), "--seed", "3"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return script, accumulator


def test_every_scalar_lies_on_one_step_axis_that_never_goes_back(events):
    script, accumulator = events
    logged = sorted((event.wall_time, event.step, tag) for tag in accumulator.Tags()["scalars"]
                    for event in accumulator.Scalars(tag))
    steps = [step for _, step, _ in logged]
    back = [(tag, step) for (_, before, _), (_, step, tag) in zip(logged, logged[1:]) if step < before]
    assert back == [], f"{script}: these scalars went back on the step axis: {back[:5]}"
    final = [event.step for event in accumulator.Scalars("eval/return")][-1]
    assert final == max(steps) > 0, "the final evaluation sits at the last step, not at step 0"


def test_learning_rates_and_the_arguments_are_logged(events):
    script, accumulator = events
    rates = accumulator.Scalars("charts/learning_rate")
    assert len(rates) > 0 and all(event.value > 0 for event in rates)
    text = accumulator.Tensors("hyperparameters/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "|argument|value|" in text and "|seed|3|" in text and "|env|nav1d-full|" in text
