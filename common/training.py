"""The run machinery every script shares: stage bookkeeping for --resume and --load-*, checkpoints, the training
loop, evaluation records and the TensorBoard tags, so that a script holds only its method.

A run is a sequence of named stages ("behavior", "critic", "pass1/rl", ...). The `Trainer` knows which stages are
done, which one is in progress and at which step, the modules and optimisers to checkpoint (the script registers them
as it makes them), and the global step: the number of training steps over all stages so far, the x axis of every
TensorBoard curve, so curves never go back when a new stage or pass starts.

TensorBoard tags (CleanRL's convention):
  losses/{stage}/{name}    every value a training step returns, averaged over `log_every` steps
  charts/SPS               training steps per second of the current stage
  charts/learning_rate     the learning rate of the stage's optimiser
  eval/{metric}            return, return_std, normalized_score (and success_rate on MetaWorld, coherency on Nav1D)
                           of each evaluated stage
  eval/{label}/{metric}    the same for side evaluations (e.g. EDA's behavior model, one-sample policies)
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from common.data import collect_episodes
from common.diffusion import DISCRETE_SAMPLERS
from common.runtime import (Run, UserError, capture_rng, check_finite, load_module_state, print_results_table,
                            read_checkpoint_file, restore_rng)

StepMetrics = dict[str, torch.Tensor]


class Trainer:
    def __init__(self, run: Run, log_every: int, save_every: int):
        self.run, self.log_every, self.save_every = run, log_every, save_every
        self.models: dict[str, torch.nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.done: dict[str, dict] = {}  # finished stage -> what it recorded
        self.stage, self.step = "", 0  # the stage in progress and its next step
        self.global_step = 0
        self.throughput: dict[str, float] = {}
        self.results: dict[str, dict] = {}  # evaluations, in the order they were made
        self.state: dict[str, Any] = {}  # the script's own checkpointed state (candidates, online data, ...)
        self.started, self.elapsed_before = time.perf_counter(), 0.0
        self.checkpoint: dict | None = None  # the checkpoint this run resumed from

    # ----- checkpoints ---------------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint everything registered; a non-finite weight stops the run first (the last good one is kept)."""
        for name, module in self.models.items():
            check_finite(sum(float(p.detach().sum()) for p in module.parameters()), f"{self.stage} ({name} weights)",
                         self.step)
        return self.run.save_checkpoint({
            "stage": self.stage, "step": self.step, "global_step": self.global_step, "done": self.done,
            "results": self.results, "throughput": self.throughput, "state": self.state,
            "models": {name: module.state_dict() for name, module in self.models.items()},
            "optimizers": {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
            "rng": capture_rng(), "elapsed_s": self.elapsed()})

    def resume(self, checkpoint: dict) -> None:
        """Continue from `checkpoint`: bookkeeping, script state, RNG, and every registered module and optimiser it
        holds. Modules made later in the run (an aligned policy, a cascade) are loaded when registered (`adopt_module`);
        an optimiser registered later belongs to one stage and is loaded only inside it (`adopt_optimizer`)."""
        self.checkpoint = checkpoint
        self.stage, self.step, self.global_step = checkpoint["stage"], checkpoint["step"], checkpoint["global_step"]
        self.done, self.results = checkpoint["done"], checkpoint["results"]
        self.throughput, self.state = checkpoint["throughput"], checkpoint["state"]
        self.elapsed_before = checkpoint["elapsed_s"]
        for name in list(self.models):
            self.adopt_module(name, self.models[name])
        for name, optimizer in self.optimizers.items():  # these live across stages (the critic's is used again
            if name in checkpoint["optimizers"]:            # by online stages): their state whatever the stage
                optimizer.load_state_dict(checkpoint["optimizers"][name])
        restore_rng(checkpoint["rng"])
        print(f"resuming stage {self.stage or '(between stages)'} at step {self.step}")

    def adopt_module(self, name: str, module: torch.nn.Module) -> torch.nn.Module:
        """Register a module to checkpoint; when resuming, load its saved weights."""
        self.models[name] = module
        if self.checkpoint is not None and name in self.checkpoint["models"]:
            load_module_state(module, self.checkpoint["models"][name], f"checkpoint model {name!r}")
        return module

    def adopt_optimizer(self, name: str, optimizer: torch.optim.Optimizer, stage: str) -> torch.optim.Optimizer:
        """Register the optimiser of `stage`; its saved state is loaded only when the run resumes inside `stage`."""
        self.optimizers[name] = optimizer
        if self.checkpoint is not None and name in self.checkpoint["optimizers"] and self.start_step(stage) > 0:
            optimizer.load_state_dict(self.checkpoint["optimizers"][name])
        return optimizer

    def load_stage(self, stage: str, checkpoint: dict, path: str, names: tuple[str, ...]) -> None:
        """--load-{stage}: copy the modules `names` from another run's checkpoint (read by `check_loadable`); the stage
        then counts as done here."""
        for name in names:
            load_module_state(self.models[name], checkpoint["models"][name], f"--load-{stage} model {name!r}")
        self.done[stage] = {"loaded_from": path}
        print(f"{stage} loaded from {path}")

    # ----- stages --------------------------------------------------------------------------------------------------
    def start_step(self, stage: str) -> int:
        return self.step if stage == self.stage else 0

    def finish(self, stage: str, record: dict | None = None) -> None:
        """Mark `stage` done (with what it recorded) and checkpoint."""
        self.done[stage] = record or {}
        self.stage, self.step = "", 0
        self.save()

    def at(self, stage: str, step: int, save: bool = False) -> None:
        """Progress inside a stage that is not a training loop (e.g. batches of candidates): checkpoint when `save`
        or after Ctrl-C (then exit with code 130)."""
        self.stage, self.step = stage, step
        if save or self.run.interrupted():
            path = self.save()
            if self.run.interrupted():
                print(f"interrupted: checkpoint saved to {path}", file=sys.stderr)
                self.run.close()
                raise SystemExit(130)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def train(self, stage: str, total_steps: int, step: Callable[[], StepMetrics], tag: str | None = None,
              optimizer: torch.optim.Optimizer | None = None, log_every: int | None = None) -> Iterator[int]:
        """Run `step()` -> {name: detached scalar tensor} from the resumed step to `total_steps`, yielding the number
        of steps done after each. Losses are summed on the device and read back only every `log_every` steps and
        before each checkpoint, where a non-finite one stops the run (no host sync per step); a checkpoint every
        `save_every` steps; Ctrl-C saves and exits with code 130. Records `{tag}_steps_per_s`."""
        tag, log_every = tag or stage, log_every or self.log_every
        first = self.start_step(stage)
        self.stage, self.step = stage, first
        writer, sums, count = self.run.writer, {}, 0
        bar = tqdm(range(first, total_steps), desc=stage, initial=first, total=total_steps, dynamic_ncols=True,
                   mininterval=1.0, leave=False)
        began = log_start = time.perf_counter()
        for index in bar:
            metrics = step()
            for name, value in metrics.items():
                sums[name] = sums[name] + value if name in sums else torch.as_tensor(value).detach().clone()
            count, done = count + 1, index + 1
            self.step, self.global_step = done, self.global_step + 1
            saving = done % self.save_every == 0 and done < total_steps
            if done % log_every == 0 or done == total_steps or saving or self.run.interrupted():
                means = {name: float(value) / count for name, value in sums.items()}
                for name, value in means.items():
                    check_finite(value, f"{stage} ({name})", done)
                    writer.add_scalar(f"losses/{tag}/{name}", value, self.global_step)
                writer.add_scalar("charts/SPS", count / max(time.perf_counter() - log_start, 1e-9), self.global_step)
                if optimizer is not None:
                    writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], self.global_step)
                bar.set_postfix({name: f"{value:.4g}" for name, value in list(means.items())[:3]})
                sums, count, log_start = {}, 0, time.perf_counter()
            if saving:
                self.save()
            if self.run.interrupted():
                path = self.save()
                print(f"interrupted: checkpoint saved to {path}", file=sys.stderr)
                self.run.close()
                raise SystemExit(130)
            yield done
        bar.close()
        if total_steps > first:
            self.throughput[f"{tag}_steps_per_s"] = (total_steps - first) / max(time.perf_counter() - began, 1e-9)

    def run_stage(self, stage: str, total_steps: int, step: Callable[[], StepMetrics], **kwargs) -> None:
        """train() to the end, for stages with nothing to do between steps."""
        for _ in self.train(stage, total_steps, step, **kwargs):
            pass

    # ----- evaluation and the summary ---------------------------------------------------------------------------
    def log_divergence(self, metrics: dict[str, float]) -> None:
        """A DivergenceMonitor reading at the global step: divergence/{metric}."""
        for name, value in metrics.items():
            self.run.writer.add_scalar(f"divergence/{name}", value, self.global_step)

    def log_eval(self, stats: dict, label: str = "") -> None:
        """An evaluation at the global step: eval/{metric}, or eval/{label}/{metric} for a side evaluation."""
        prefix = f"eval/{label}/" if label else "eval/"
        for metric in ("return_mean", "return_std", "normalized_mean", "success_rate", "coherency"):
            if metric in stats:
                tag = {"return_mean": "return", "normalized_mean": "normalized_score"}.get(metric, metric)
                self.run.writer.add_scalar(prefix + tag, stats[metric], self.global_step)

    def record(self, name: str, stats: dict, label: str = "") -> None:
        """Keep the evaluation of stage `name` for summary.json, log it and print it. Its speed goes to the
        throughput (the latest evaluation's), so that the stage records hold results only."""
        stats = dict(stats)
        speed = stats.pop("eval_actions_per_s", None)
        if speed is not None:
            self.throughput["eval_actions_per_s"] = speed
            self.run.writer.add_scalar("charts/eval_actions_per_s", speed, self.global_step)
        self.results[name] = stats
        self.log_eval(stats, label)
        extra = f", success rate {stats['success_rate']:.2f}" if "success_rate" in stats else ""
        extra += f", coherency {stats['coherency']:.3f}" if "coherency" in stats else ""
        if "denoising_error" in stats:
            extra += (f", denoising error {stats['denoising_error']:.3f}, actions at bounds "
                      f"{stats['actions_at_bounds']:.2f}")
        print(f"[{name}] return {stats['return_mean']:.3f} +- {stats['return_std']:.3f}, normalized score "
              f"{stats['normalized_mean']:.1f} +- {stats['normalized_std']:.1f}{extra}")

    def write_summary(self, script: str, args: Any, family: str) -> None:
        """summary.json, the final checkpoint and the results table."""
        summary = {"script": script, "env": args.env, "seed": args.seed, "stages": self.results,
                   "throughput": self.throughput, "wall_time_s": self.elapsed(), "device": str(self.run.device),
                   "args": dataclasses.asdict(args)}
        if family == "nav1d":
            summary["coherency"] = {name: stats["coherency"] for name, stats in self.results.items()
                                    if "coherency" in stats}
        self.run.write_summary(summary)
        self.finish("done")
        print_results_table(self.results)
        print(f"summary: {self.run.run_dir / 'summary.json'}")


def fraction_at_bounds(actions: torch.Tensor, low=-1.0, high=1.0, tolerance: float = 1e-3) -> float:
    """Share of action entries within `tolerance` of the action box's bounds (after clipping to it)."""
    clipped = torch.minimum(torch.maximum(actions, torch.as_tensor(low, device=actions.device)),
                            torch.as_tensor(high, device=actions.device))
    return float(((clipped - low).abs() <= tolerance).logical_or((high - clipped).abs() <= tolerance).float().mean())


class DivergenceMonitor:
    """How far a model under alignment has walked from the data, measured while it happens: its denoising error on a
    fixed batch of dataset samples at a small noise level (network time 0.05, where the score field near the data
    decides what the sampler returns), and the share of its sampled actions at the action bounds. A collapse shows
    as both rising while the alignment loss hardly moves. The batch, noise and sampling seed are fixed, and the global
    RNG is left as it was, so monitoring does not change a run's numbers.

    `space` is an alignment sample space (dataset_samples, eps_error, sample, actions, diffusion)."""

    def __init__(self, space: Any, batch: int = 256, seed: int = 0, network_time: float = 0.05):
        self.space, self.seed = space, seed
        device = space.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.samples, self.cond = space.dataset_samples(batch)
            self.noise = torch.randn_like(self.samples)
        diffusion = space.diffusion
        if diffusion.sampler in DISCRETE_SAMPLERS:  # the nearest training level
            network_time = max(1, round(network_time * diffusion.train_steps)) / diffusion.train_steps
        self.t = torch.full((batch,), network_time, device=device)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        error = self.space.eps_error(model, self.samples, self.cond, self.t, self.noise).mean()
        device = self.samples.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed + 1)
            actions = self.space.actions(self.space.sample(model, self.cond).x0)
        return {"denoising_error": float(error), "actions_at_bounds": fraction_at_bounds(actions)}


def method_sequence(text: str, flag: str, allowed: tuple[str, ...], required: bool = True) -> list[str]:
    """The comma-separated methods of `flag` (--align, --cascade-align) as a list; a UserError for an unknown or
    repeated name, or for an empty list where one is `required`."""
    methods = [name.strip() for name in text.split(",") if name.strip()]
    if any(name not in allowed for name in methods) or (required and not methods):
        raise UserError(f"{flag} takes a comma-separated sequence of {', '.join(allowed)}, got {text!r}")
    if len(set(methods)) < len(methods):
        raise UserError(f"{flag} {text!r} names a method twice; repeat the sequence with --passes instead")
    return methods


def run_alignment(trainer: Trainer, args: Any, methods: list[str], cascade_methods: list[str],
                  updates: dict[str, Callable], space: Any, cascade_space: Callable[[], Any], policy: torch.nn.Module,
                  reference: torch.nn.Module, cascade_model: torch.nn.Module | None,
                  evaluate_model: Callable[[torch.nn.Module | None], dict],
                  online_policy: Callable[[torch.nn.Module | None], Callable], make_env: Callable,
                  retrain_critic: Callable[[str], None], monitor: DivergenceMonitor) -> None:
    """The --align sequence, --passes times, as stages "pass{p}/{method}". Per stage: a fresh Adam over
    what the method trains (the policy's adapters at `{method}_lr`, or the cascade at cascade_lr); DPO's and SFT's
    reference, a frozen snapshot of the policy as the stage finds it; `updates[method](space, trained, reference,
    optimizer, args)` for `{method}_steps` steps; an evaluation `evaluate_model(cascade or None)` at the end (and every
    --eval-every steps), with the cascade once a cascade stage has trained it.

    The cascade first learns from consistent pairs of the policy's samples ("pass{p}/cascade"), then
    goes through "the same alignment process" as the policy: each of `cascade_methods` trains it in
    `cascade_space()`, whose conditions carry a sample of the policy to improve, with the cascade as the stage found
    it as the reference ("pass{p}/cascade/{method}").

    Before every pass after the first, with --online-episodes, a stage "pass{p}/online": episodes of
    `online_policy(cascade or None)` (an evaluate() policy) join trainer.state["online"] (once: a resumed stage finds
    them in the checkpoint), then `retrain_critic(stage)`.

    `monitor(policy)` is logged every log_every steps of the policy's stages and joins each stage's record."""
    def cascade_now(training_cascade: bool = False):
        trained = training_cascade or any("/cascade" in stage for stage in trainer.done)
        return cascade_model if trained else None

    def align_stage(stage: str, method: str, trained: torch.nn.Module, stage_space: Any,
                    method_reference: torch.nn.Module | None) -> None:
        """One stage; `method_reference` None: a frozen snapshot of `trained` as the stage finds it."""
        if stage in trainer.done:
            return
        training_cascade = trained is cascade_model
        lr = args.cascade_lr if training_cascade else getattr(args, f"{method}_lr")
        optimizer = trainer.adopt_optimizer("align", torch.optim.Adam(
            [p for p in trained.parameters() if p.requires_grad], lr=lr), stage)
        if method_reference is None:
            method_reference = copy.deepcopy(trained).requires_grad_(False)
            if trainer.start_step(stage) > 0:  # resumed inside the stage: the snapshot it started from
                trainer.adopt_module("stage_reference", method_reference)
            trainer.models["stage_reference"] = method_reference
        update = updates[method]
        for done in trainer.train(stage, getattr(args, f"{method}_steps"),
                                  lambda: update(stage_space, trained, method_reference, optimizer, args), tag=method,
                                  optimizer=optimizer):
            if args.eval_every and done % args.eval_every == 0:
                trainer.log_eval(evaluate_model(cascade_now(training_cascade)), label=method)
            if done % args.log_every == 0 and not training_cascade:
                trainer.log_divergence(monitor(policy))
        trainer.models.pop("stage_reference", None)
        trainer.record(stage, evaluate_model(cascade_now(training_cascade)) | ({} if training_cascade else monitor(policy)))
        trainer.finish(stage)

    for alignment_pass in range(1, args.passes + 1):
        stage = f"pass{alignment_pass}/online"
        if alignment_pass > 1 and args.online_episodes > 0 and stage not in trainer.done:
            if trainer.start_step(stage) == 0:
                new = collect_episodes(online_policy(cascade_now()), make_env, args.online_episodes,
                                       args.seed + 1000 * alignment_pass, args.eval_max_steps or None)
                old = trainer.state["online"]
                trainer.state["online"] = new if old is None else {key: np.concatenate([old[key], new[key]])
                                                                   for key in new}
            print(f"[{stage}] {len(trainer.state['online']['rewards'])} online transitions in total")
            retrain_critic(stage)
        for method in methods:
            stage = f"pass{alignment_pass}/{method}"
            if method != "cascade":
                snapshot = method in ("dpo", "sft")
                align_stage(stage, method, policy, space, None if snapshot else reference)
                continue
            align_stage(stage, "cascade", cascade_model, space, policy)  # pairs of the policy's samples
            for cascade_method in cascade_methods:
                align_stage(f"{stage}/{cascade_method}", cascade_method, cascade_model, cascade_space(), None)
    last = f"pass{args.passes}/{methods[-1]}"
    if methods[-1] == "cascade" and cascade_methods:
        last += f"/{cascade_methods[-1]}"
    trainer.results.pop("aligned", None)  # a resumed run with more passes: the final entry goes last again
    trainer.results["aligned"] = dict(trainer.results[last])


def check_loadable(path: str, script: str, stage: str) -> dict:
    """The checkpoint of another run for --load-{stage}, read before any work: it must come from the same script and
    have finished `stage`."""
    checkpoint = read_checkpoint_file(path, script=script)
    if stage not in checkpoint.get("done", {}):
        raise UserError(f"--load-{stage.replace('_', '-')}: '{path}' has not finished its {stage} stage")
    return checkpoint


def require_same_data(checkpoint: dict, normalizer, flag: str, args: Any = None, same: tuple[str, ...] = ()) -> None:
    """--load-*: the other run must have been trained on the same data (the same observation statistics) and, for
    the argument names in `same`, with the same values as `args`."""
    saved = checkpoint["state"].get("normalizer")
    if saved is None or not all(np.array_equal(np.asarray(saved[key]), np.asarray(getattr(normalizer, key)))
                                for key in ("mean", "std")):
        raise UserError(f"{flag}: that run was trained on other data (its observation statistics differ)")
    differing = [f"--{name.replace('_', '-')} {checkpoint['args'].get(name)}" for name in same
                 if checkpoint["args"].get(name) != getattr(args, name)]
    if differing:
        raise UserError(f"{flag}: that run was made with other settings ({', '.join(differing)})")


class CompiledModules:
    """`compiled(module)`: the module itself, or with --compile its torch.compile'd wrapper, made once per module
    (it reads the live weights, so training in between needs no new compilation)."""

    def __init__(self, enabled: bool):
        self.enabled, self.wrappers = enabled, {}

    def __call__(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return module
        if module not in self.wrappers:
            self.wrappers[module] = torch.compile(module)
        return self.wrappers[module]


def action_latency_ms(choose: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """The project's one definition of action latency: milliseconds for the evaluation policy to choose the action
    of one environment step for a single environment (`choose()`, host to host), median of `repeats` calls after
    `warmup` calls."""
    for _ in range(warmup):
        choose()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        choose()
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))
