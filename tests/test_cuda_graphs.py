"""CUDA graph replay (common.runtime.CudaGraphed): the same numbers as eager execution, one call = one step, and a
graceful fall-back when a function cannot be captured. The GPU tests run only where CUDA is available (the
project's lent GPU sessions); on a CPU the switch must leave every function untouched."""
import types

import pytest
import torch

from common.runtime import CudaGraphed, cuda_graphed, use_cuda_graphs

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_graphs_are_off_on_the_cpu():
    args = types.SimpleNamespace(cuda_graphs=True)
    assert not use_cuda_graphs(args, torch.device("cpu"))
    function = lambda: 1  # noqa: E731
    assert cuda_graphed(function, use_cuda_graphs(args, torch.device("cpu"))) is function
    assert not use_cuda_graphs(types.SimpleNamespace(cuda_graphs=False), torch.device("cuda"))


def _training_run(graphed: bool, steps: int):
    """A small regression trained with Adam on fixed batches drawn inside the step; returns weights and losses."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.SiLU(), torch.nn.Linear(64, 1)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=graphed)
    inputs = torch.randn(512, 8, device=device)
    targets = inputs.sum(1, keepdim=True).sin()
    batch_number = torch.zeros((), dtype=torch.long, device=device)  # device state that the step advances

    def step():
        index = (torch.arange(64, device=device) + 64 * batch_number) % len(inputs)
        batch_number.add_(1)
        loss = (model(inputs[index]) - targets[index]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    call = CudaGraphed(step) if graphed else step
    losses = [float(call()) for _ in range(steps)]
    return [p.detach().clone() for p in model.parameters()], losses, optimizer


@needs_cuda
def test_graphed_training_steps_match_eager_steps():
    eager_weights, eager_losses, _ = _training_run(graphed=False, steps=12)
    graph_weights, graph_losses, optimizer = _training_run(graphed=True, steps=12)
    assert float(optimizer.state[next(iter(optimizer.state))]["step"]) == 12  # one step per call, warm-up included
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for eager, graph in zip(eager_weights, graph_weights):
        torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-6)


@needs_cuda
def test_inputs_are_copied_in_and_each_shape_gets_its_graph():
    weight = torch.randn(4, 3, device="cuda")
    graphed = CudaGraphed(lambda x: x @ weight)
    for rows in (2, 5, 2, 5, 2, 5, 7):
        x = torch.randn(rows, 4, device="cuda")
        torch.testing.assert_close(graphed(x).clone(), x @ weight)
    assert set(graphed.graphs) == {(((2, 4), torch.float32),), (((5, 4), torch.float32),)}  # 7 rows: warm-up only


@needs_cuda
def test_a_function_that_cannot_be_captured_runs_eagerly(capsys):
    def host_sync(x):
        return x * float(x.sum())  # reads a value back to the host: not capturable

    graphed = CudaGraphed(host_sync)
    x = torch.ones(3, device="cuda")
    results = [graphed(x) for _ in range(4)]
    assert graphed.failed and "capture of" in capsys.readouterr().err
    for result in results:
        torch.testing.assert_close(result, x * 3)
