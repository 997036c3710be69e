"""Speed of EDA's four hot loops on the paper network with hopper shapes (S=11, A=3; DESIGN 3.1), written to
benchmark_results/eda_speed.md.

Each loop is reported as steps (or states) per second and as achieved GFLOP/s: the floating point operations of the
matrix multiplications it really executes (counted once with torch.utils.flop_counter, backward and double backward
included) divided by its wall time, next to the machine's fp32 matmul peak measured in the same process.

    python benchmark_results/bench_eda_speed.py                  # CPU, small step counts
    python benchmark_results/bench_eda_speed.py --device cuda --repeats 50
"""
from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eda_d4rl  # noqa: E402
from common.diffusion import Diffusion, VPSDE  # noqa: E402
from common.nets import TwinQ, count_parameters  # noqa: E402

STATE_DIM, ACTION_DIM = 11, 3  # hopper
NOTES = """Notes
- GFLOP/s counts only matrix multiplications (forward, backward and the backward of the input gradient), so the
  elementwise work (SiLU and LayerNorm derivatives, Adam) is overhead by this measure.
- The machine is shared (2 cores, several other jobs): every number here can move by tens of percent between runs;
  compare rows of one run, not across runs. The peak is measured next to every loop for that reason.
- Overheads found and removed:
  1. Double backward. eps = -sigma grad_a f makes the training loss a function of a gradient. With
     autograd.grad(create_graph=True) the step cannot be compiled, and a profile of the eager step shows ~30% of the
     time in elementwise multiplications of SiLU's second derivative. eda_d4rl.py takes the input gradient with
     torch.func.grad instead (bit-identical losses and gradients), which torch.compile traces into one graph;
     `--compile` compiles the training losses and fuses that elementwise work (rows "eager" -> "--compile").
  2. Host syncs per step: the training loops sum losses on the device and read them back every `log_every` steps
     (no effect on a CPU, one sync fewer per step on a GPU).
  3. Unbatched sampling: candidates are drawn for `candidate_batch_size` states x K in one sampler call and
     evaluation samples every active environment x `eval_candidates` in one call (rows "before" -> "after").
  4. CPU threads: on a busy 2-core machine a small network with 2 torch threads ran ~20x slower than with 1
     (Nav1D behavior step 167 ms vs 7.4 ms), hence `--cpu-threads` (1 in the Nav1D preset) and --threads 1 here.
"""


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(function, device, repeats: int, warmup: int = 2) -> float:
    """Fastest wall time of `function()` over `repeats` calls after warm-up calls: on a shared machine the fastest
    call is the one least disturbed by other jobs (the same statistic for the matmul peak and for every loop)."""
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


class MatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every matmul-like op that runs (torch's flop formulas). FlopCounterMode itself cannot be
    used: its module tracker breaks autograd.grad with respect to a leaf tensor, which EDA's noise prediction uses."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def counted_flops(function) -> int:
    with MatmulFlops() as counter:
        function()
    return counter.total


def matmul_peak(device, call_seconds: float, repeats: int, size: int = 1024) -> float:
    """fp32 GFLOP/s of square matmuls, the ceiling a loop is compared with. Timed like the loop: calls of about the
    same length (back-to-back matmuls), fastest of the same number of calls, right after it, so that the load of
    other jobs on a shared machine weighs on both alike."""
    left, right = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    single = seconds_per_call(lambda: left @ right, device, 3, warmup=1)
    count = max(1, round(call_seconds / single))
    seconds = seconds_per_call(lambda: [left @ right for _ in range(count)], device, repeats, warmup=0)
    return 2 * size**3 * count / seconds / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: stable numbers on a shared machine)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd training losses")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--candidate-states", type=int, default=64, help="states per candidate-sampling batch")
    parser.add_argument("--out", default=str(Path(__file__).with_name("eda_speed.md")))
    options = parser.parse_args()
    torch.set_num_threads(options.threads)
    device = torch.device(options.device)
    torch.manual_seed(0)

    sde = VPSDE()
    args = eda_d4rl.Args()  # paper network: hidden 256, 3 blocks, expansion 4, dropout 0.1
    behavior = eda_d4rl.EnergyModel(STATE_DIM, ACTION_DIM, args, sde).to(device)
    critic = TwinQ(STATE_DIM, ACTION_DIM, hidden=args.critic_hidden).to(device)
    diffusion = Diffusion("dpm_solver++", steps=args.sampler_steps, sde=sde)
    low, high = -torch.ones(ACTION_DIM, device=device), torch.ones(ACTION_DIM, device=device)
    rows = []


    def measure(name, function, flops_of, unit, per_call=1.0, repeats=options.repeats, warmup=2):
        seconds = seconds_per_call(function, device, repeats, warmup)
        rate = 1000 * seconds / per_call if unit.startswith("ms") else per_call / seconds
        rows.append((name, rate, unit, flops_of / seconds / 1e9, matmul_peak(device, seconds, repeats)))
        print(rows[-1], flush=True)

    # behavior pretraining: batch 2048, loss through grad_a f (a gradient of a gradient)
    behavior.train()
    optimizer = torch.optim.Adam(behavior.parameters(), lr=args.behavior_lr)
    states, actions = torch.randn(2048, STATE_DIM, device=device), torch.rand(2048, ACTION_DIM, device=device) * 2 - 1

    def behavior_step(loss_fn):
        loss = loss_fn(behavior, actions, states, sde)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    flops = counted_flops(lambda: behavior_step(eda_d4rl.behavior_loss))
    measure("behavior step (batch 2048), eager", lambda: behavior_step(eda_d4rl.behavior_loss), flops, "steps/s")
    if options.compile:
        compiled_loss = torch.compile(eda_d4rl.behavior_loss)
        measure("behavior step (batch 2048), --compile", lambda: behavior_step(compiled_loss), flops, "steps/s")

    # alignment: 256 states x K=16 candidates, two forward passes of f, one backward
    behavior.eval().requires_grad_(False)
    policy = copy.deepcopy(behavior).requires_grad_(True)
    policy_optimizer = torch.optim.Adam(policy.parameters(), lr=args.align_lr)
    align_states = torch.randn(256, STATE_DIM, device=device)
    candidates = torch.rand(256, args.K, ACTION_DIM, device=device) * 2 - 1
    q_labels = torch.randn(256, args.K, device=device)

    def alignment_step(loss_fn):
        loss, _ = loss_fn(policy, behavior, align_states, candidates, q_labels, args, sde)
        policy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        policy_optimizer.step()
        return loss.detach()

    flops = counted_flops(lambda: alignment_step(eda_d4rl.alignment_loss))
    measure("alignment step (256 states x 16), eager", lambda: alignment_step(eda_d4rl.alignment_loss), flops,
            "steps/s")
    if options.compile:
        compiled_loss = torch.compile(eda_d4rl.alignment_loss)
        measure("alignment step (256 states x 16), --compile", lambda: alignment_step(compiled_loss), flops,
                "steps/s")

    # candidate generation: K=16 samples per state, 15 DPM-Solver++ steps, each a forward + input gradient of f
    def generate(batch_states):
        return eda_d4rl.generate_candidates(behavior, critic, diffusion, batch_states, args.K, low, high)

    batch_states = torch.randn(options.candidate_states, STATE_DIM, device=device)
    few = max(1, options.repeats // 2)
    measure("candidates, one state per call (before)", lambda: [generate(row[None]) for row in batch_states[:8]],
            counted_flops(lambda: [generate(row[None]) for row in batch_states[:8]]), "states/s", 8, few, 1)
    measure(f"candidates, {options.candidate_states} states per call (after)", lambda: generate(batch_states),
            counted_flops(lambda: generate(batch_states)), "states/s", options.candidate_states, few, 1)

    # evaluation: one action for each of 20 environments, best of 4 samples by Q
    env_states = torch.randn(20, STATE_DIM, device=device)

    def act(observations):
        sampled = eda_d4rl.sample_actions(policy, diffusion, observations, args.eval_candidates, low, high)
        q = eda_d4rl.min_q(critic, observations.repeat_interleave(args.eval_candidates, 0), sampled)
        best = q.view(len(observations), -1).argmax(-1)
        return sampled.view(len(observations), args.eval_candidates, -1)[torch.arange(len(observations)), best]

    measure("evaluation action, one env per call (before)", lambda: [act(row[None]) for row in env_states],
            counted_flops(lambda: [act(row[None]) for row in env_states]), "ms/action (20 envs)")
    measure("evaluation action, 20 envs per call (after)", lambda: act(env_states),
            counted_flops(lambda: act(env_states)), "ms/action (20 envs)")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    lines = [
        "# EDA speed (paper network, hopper shapes)",
        "",
        f"Device: {device} ({platform.processor() or platform.machine()}), {options.threads} threads, "
        f"torch {torch.__version__}, commit {commit}. Behavior model f: {count_parameters(behavior):,} parameters.",
        "Matmul peak: fp32 1024^3 matmuls timed right after each loop, in calls as long as the loop's, fastest of "
        "as many calls (so both see the same load from other jobs).",
        "",
        "| loop | rate | unit | achieved GFLOP/s | matmul peak GFLOP/s | % of peak |",
        "|---|---|---|---|---|---|",
    ]
    for name, rate, unit, gflops, peak in rows:
        lines.append(f"| {name} | {rate:.3g} | {unit} | {gflops:.1f} | {peak:.1f} | {100 * gflops / peak:.0f}% |")
    lines += ["", f"Command: `python benchmark_results/bench_eda_speed.py {' '.join(sys.argv[1:])}`".rstrip(), "",
              NOTES]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(options.out).write_text(text)


if __name__ == "__main__":
    main()
