"""What an EDA alignment did, read from a finished eda_d4rl.py run: the numbers that tell over-fitting, labels too
sharp for the chosen beta, and a policy that leaves the data apart (benchmark_results/hopper_cpu.md uses them).

    python -m benchmarks.eda_diagnose runs/RUN_DIR [--states 512] [--samples 4] [--json out.json]

- labels: the within-state Q range of the candidates, the best candidate's soft-target weight and the targets'
  entropy against ln K (close to one-hot targets ask f for large differences between nearby candidates);
- loss: the alignment loss and accuracy on states that had candidates (training) and on as many other dataset states
  with fresh candidates from the behavior model (held out); a gap means the policy fitted its labelled states only;
- samples, on the held-out states, for the behavior model and the aligned policy: min twin-Q of one sample and of
  the best of --samples by Q, the spread of one state's samples, and the share of action entries at a bound. Q that
  rises while the return falls is the critic extrapolating where the policy went.

The dataset must be loadable as it was for the run (MINARI_DATASETS_PATH for local ids).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.runner import REPO_ROOT, load_finished_run, print_report

sys.path.insert(0, str(REPO_ROOT))  # eda_d4rl.py is a script at the repository root

import eda_d4rl as eda  # noqa: E402
from common.data import Normalizer, load_offline_data  # noqa: E402
from common.runtime import UserError  # noqa: E402
from common.training import fraction_at_bounds  # noqa: E402


def load_run(run_dir: Path):
    """(args, data, normalised states, models, candidates) of a finished run's checkpoint."""
    checkpoint, args = load_finished_run(run_dir, eda, "alignment")
    data = load_offline_data(args.env)
    normalizer = Normalizer.from_state_dict(checkpoint["state"]["normalizer"])
    states = torch.as_tensor(normalizer.normalize(data.observations.astype(np.float32)))
    sde = eda.VPSDE()
    models = {}
    for name in ("behavior", "policy"):
        models[name] = eda.EnergyModel(states.shape[1], data.actions.shape[1], args, sde)
    models["critic"] = eda.TwinQ(states.shape[1], data.actions.shape[1], hidden=args.critic_hidden)
    for name, key in (("behavior", "behavior"), ("policy", "policy"), ("critic", "critic_target")):
        models[name].load_state_dict(checkpoint["models"][key])
        models[name].eval().requires_grad_(False)
    return args, data, states, models, checkpoint["state"]["candidates"], sde


def mean_loss(models, states, actions, q_labels, args, sde, draws: int) -> tuple[float, float]:
    """Alignment loss and accuracy averaged over `draws` draws of diffusion time and noise."""
    results = [eda.alignment_loss(models["policy"], models["behavior"], states, actions, q_labels, args, sde)
               for _ in range(draws)]
    return float(np.mean([loss.item() for loss, _ in results])), float(np.mean([acc.item() for _, acc in results]))


def sample_stats(model, critic, diffusion, states, samples: int, low, high) -> dict[str, float]:
    actions = eda.sample_actions(model, diffusion, states, samples, low, high)
    q = eda.min_q(critic, states.repeat_interleave(samples, 0), actions).view(len(states), samples)
    normalized = 2 * (actions - low) / (high - low) - 1  # bounds at +-1 whatever the environment's box
    return {"q_one_sample": float(q[:, 0].mean()), "q_best_of_n": float(q.max(1).values.mean()),
            "within_state_spread": float(actions.view(len(states), samples, -1).std(1).mean()),
            "at_bounds": fraction_at_bounds(normalized)}


def diagnose(run_dir: Path, num_states: int = 512, samples: int = 4, draws: int = 8, seed: int = 0) -> dict:
    if min(num_states, samples, draws) < 1:
        raise UserError("--states, --samples and --draws must be >= 1")
    args, data, states, models, candidates, sde = load_run(run_dir)
    torch.manual_seed(seed)
    low, high = torch.as_tensor(data.action_low), torch.as_tensor(data.action_high)
    diffusion = eda.Diffusion(args.solver, steps=args.sampler_steps, sde=sde)
    labelled = candidates["indices"]
    train_rows = torch.randperm(len(labelled))[:num_states]
    unlabelled = torch.ones(len(states), dtype=torch.bool)
    unlabelled[labelled] = False
    others = torch.nonzero(unlabelled)[:, 0]
    if len(others) == 0:
        raise UserError("every dataset state had candidates (--data-ratio 1): no held-out states to compare with")
    held_out = states[others[torch.randperm(len(others))[:num_states]]]
    q_labels = candidates["q_labels"]
    targets = torch.softmax(args.q_scale * q_labels, -1)
    report = {"labels": {
        "q_range_within_state": float((q_labels.max(1).values - q_labels.min(1).values).mean()),
        "best_candidate_target": float(targets.max(-1).values.mean()),
        "target_entropy": float(-(targets * targets.clamp_min(1e-12).log()).sum(-1).mean()),
        "ln_K": math.log(args.K)}}
    with torch.no_grad():
        train_loss = mean_loss(models, states[labelled[train_rows]], candidates["actions"][train_rows],
                               q_labels[train_rows], args, sde, draws)
    fresh_actions, fresh_labels = eda.generate_candidates(models["behavior"], models["critic"], diffusion, held_out,
                                                          args.K, low, high)
    with torch.no_grad():
        held_loss = mean_loss(models, held_out, fresh_actions, fresh_labels, args, sde, draws)
    report["loss"] = {"training": {"loss": train_loss[0], "accuracy": train_loss[1]},
                      "held_out": {"loss": held_loss[0], "accuracy": held_loss[1]}}
    report["samples"] = {name: sample_stats(models[name], models["critic"], diffusion, held_out, samples, low, high)
                         for name in ("behavior", "policy")}
    report["settings"] = {"run_dir": str(run_dir), "states": len(held_out), "samples": samples, "draws": draws,
                          "beta": args.beta, "q_scale": args.q_scale, "K": args.K}
    return report


def text(report: dict) -> str:
    labels, loss, samples = report["labels"], report["loss"], report["samples"]
    lines = [f"labels: within-state Q range {labels['q_range_within_state']:.3f}, best candidate's target "
             f"{labels['best_candidate_target']:.2f}, target entropy {labels['target_entropy']:.3f} "
             f"(ln K = {labels['ln_K']:.3f})",
             f"loss (beta {report['settings']['beta']}): training {loss['training']['loss']:.3f} "
             f"(accuracy {loss['training']['accuracy']:.2f}), held out {loss['held_out']['loss']:.3f} "
             f"(accuracy {loss['held_out']['accuracy']:.2f})",
             f"samples on {report['settings']['states']} held-out states (best of {report['settings']['samples']}):",
             f"  {'model':<9} {'Q 1 sample':>10} {'Q best':>8} {'spread':>7} {'at bound':>9}"]
    for name, stats in samples.items():
        lines.append(f"  {name:<9} {stats['q_one_sample']:>10.2f} {stats['q_best_of_n']:>8.2f} "
                     f"{stats['within_state_spread']:>7.3f} {stats['at_bounds']:>8.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished eda_d4rl.py run")
    parser.add_argument("--states", type=int, default=512, help="held-out (and training) states to read")
    parser.add_argument("--samples", type=int, default=4, help="samples per state for the best-of-N Q")
    parser.add_argument("--draws", type=int, default=8, help="draws of time and noise per loss estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    options = parser.parse_args(argv)
    return print_report(lambda: diagnose(options.run_dir, options.states, options.samples, options.draws, options.seed),
                        text, options.json)

if __name__ == "__main__":
    sys.exit(main())
