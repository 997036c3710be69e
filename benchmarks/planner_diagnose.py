"""Has a diffuser_align.py foundation learned to plan from the current state? Read from a run's checkpoint.

    python -m benchmarks.planner_diagnose runs/RUN_DIR [--states 512] [--json out.json]

On dataset states (one plan each, the current state in-painted, no selection by Q):
- first action: mean squared difference between the plan's first action and the dataset's action at that state,
  next to the same for the dataset's mean action (a planner that knows the state should beat it) and for the action
  at the nearest state of another episode (what drawing from the data's own spread of actions at a state scores: a
  planner at this level has learned the first action as well as this check can tell);
- next state: the plan's step-1 state against the dataset's next state, next to the current state itself as the
  guess (the dynamics move little per step, so a planner that uses the current state comes close to it);
- per plan step, the error of the network's clean-plan estimate at a nearly pure-noise level (network time 0.99,
  where all but the in-painted current state is noise): where the first steps are worse than later ones, the
  planning case was trained too little (see --inpaint-planning-share).
Everything is in the planner's own coordinates (normalised states, actions in [-1, 1]).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.runner import REPO_ROOT, load_finished_run, print_report

sys.path.insert(0, str(REPO_ROOT))  # diffuser_align.py is a script at the repository root

import diffuser_align as planning  # noqa: E402
from common.data import Normalizer, load_offline_data, model_transitions  # noqa: E402
from common.nets import InverseDynamics, TwinQ  # noqa: E402
from common.runtime import UserError  # noqa: E402

STEPS_SHOWN = 6  # plan steps in the per-step error
NOISY_TIME = 0.99  # network time of the per-step error (1.0 is pure noise; flow matching cannot invert it there)


def load_planner(run_dir: Path):
    """(args, Planner, PlanSpace) of a run whose foundation (and critic) are trained."""
    checkpoint, args = load_finished_run(run_dir, planning, "foundation")
    data = load_offline_data(args.env)
    normalizer = Normalizer.from_state_dict(checkpoint["state"]["normalizer"])
    state_dim, action_dim = data.observations.shape[1], data.actions.shape[1]
    x_dim = state_dim + (action_dim if args.planner == "diffuser" else 0)
    foundation = planning.TemporalUNet(x_dim, args.horizon, 0, args.unet_base_dim, args.unet_dim_mults)
    inverse_dynamics = InverseDynamics(state_dim, action_dim, args.inverse_dynamics_hidden)
    critic = TwinQ(state_dim, action_dim, args.critic_hidden)
    for module, key in ((foundation, "foundation"), (inverse_dynamics, "inverse_dynamics"), (critic, "critic_target")):
        module.load_state_dict(checkpoint["models"][key])
        module.eval().requires_grad_(False)
    planner = planning.Planner(args, planning.make_diffusion(args), foundation, critic, state_dim, action_dim,
                               inverse_dynamics if args.planner == "dd" else None)
    offline = model_transitions(data, normalizer, device="cpu")
    return args, planner, planning.PlanSpace(args, planner, offline), offline


def neighbour_actions(states: torch.Tensor, offline: dict[str, torch.Tensor], chunk: int = 65_536) -> torch.Tensor:
    """For dataset states, the action at the nearest dataset state (normalised coordinates) of another episode.
    Distances are taken `chunk` dataset states at a time, so a million-step file needs no million-column matrix."""
    data, episode = offline["observations"], offline["episode_first"]

    def nearest(excluded_episode: torch.Tensor | None) -> torch.Tensor:
        best = torch.full((len(states),), float("inf"), device=states.device)
        best_index = torch.zeros(len(states), dtype=torch.long, device=states.device)
        for start in range(0, len(data), chunk):
            distances = torch.cdist(states, data[start:start + chunk])
            if excluded_episode is not None:
                distances[episode[None, start:start + chunk] == excluded_episode[:, None]] = float("inf")
            value, index = distances.min(1)
            closer = value < best
            best, best_index = torch.where(closer, value, best), torch.where(closer, index + start, best_index)
        return best_index

    own_episode = episode[nearest(None)]  # each state is in the data: distance 0 to itself
    return offline["actions"][nearest(own_episode)]


@torch.no_grad()
def diagnose(run_dir: Path, num_states: int = 512, seed: int = 0) -> dict:
    if num_states < 1:
        raise UserError("--states must be >= 1")
    args, planner, space, offline = load_planner(run_dir)
    torch.manual_seed(seed)
    windows, current = space.dataset_samples(num_states)  # dataset plans from random states, and those states
    data_states, data_actions = planner.states_actions(windows)
    plans = planner.sample(current, 1).x0
    plan_states, plan_actions = planner.states_actions(plans)
    first_action = float(((plan_actions[:, 0] - data_actions[:, 0]) ** 2).mean())
    mean_action = float(((space.actions(space.dataset_samples(4096)[0])[:, 0].mean(0) - data_actions[:, 0]) ** 2).mean())
    neighbour = float(((neighbour_actions(current, offline) - data_actions[:, 0]) ** 2).mean())
    report = {
        "first_action": {"plan": first_action, "dataset_mean_action": mean_action,
                         "other_episode_neighbour": neighbour},
        "next_state": {"plan": float(((plan_states[:, 1] - data_states[:, 1]) ** 2).mean()),
                       "current_state": float(((data_states[:, 0] - data_states[:, 1]) ** 2).mean())},
    }
    # the network's clean-plan estimate at a nearly pure-noise level, where only the in-painted current state is known
    diffusion, state_dim = planner.diffusion, planner.state_dim
    t = torch.full((num_states,), NOISY_TIME)
    noise = torch.randn_like(windows)
    alpha, sigma = (level.view(-1, 1, 1) for level in diffusion.noise_levels(t))
    known = space.known(windows)
    noisy = torch.where(known, windows, alpha * windows + sigma * noise)
    estimate = (noisy - sigma * space.predicted_noise(planner.denoiser, windows, current, t, noise)) / alpha
    error = (estimate - windows) ** 2
    steps = range(1, min(STEPS_SHOWN, args.horizon))
    report["noisy_level_error"] = {
        "states": [float(error[:, step, :state_dim].mean()) for step in steps],
        "actions": ([float(error[:, step - 1, state_dim:].mean()) for step in steps] if args.planner == "diffuser"
                    else None)}
    report["settings"] = {"run_dir": str(run_dir), "states": num_states, "planner": args.planner,
                          "sampler": args.sampler, "horizon": args.horizon,
                          "inpaint_planning_share": args.inpaint_planning_share}
    return report


def text(report: dict) -> str:
    first, nxt, noisiest = report["first_action"], report["next_state"], report["noisy_level_error"]
    lines = [f"first action, squared error to the dataset's: plan {first['plan']:.3f}, the dataset's mean action "
             f"{first['dataset_mean_action']:.3f}, the nearest other episode's action "
             f"{first['other_episode_neighbour']:.3f}",
             f"next state, squared error to the dataset's: plan {nxt['plan']:.3f}, the current state "
             f"{nxt['current_state']:.3f}",
             f"clean-plan estimate at network time {NOISY_TIME}, squared error per plan step (states from step 1"
             + (", actions from step 0):" if noisiest["actions"] else "):"),
             "  states  " + " ".join(f"{value:.3f}" for value in noisiest["states"])]
    if noisiest["actions"]:
        lines.append("  actions " + " ".join(f"{value:.3f}" for value in noisiest["actions"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a diffuser_align.py run with a trained foundation")
    parser.add_argument("--states", type=int, default=512, help="dataset states to plan from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    options = parser.parse_args(argv)
    return print_report(lambda: diagnose(options.run_dir, options.states, options.seed), text, options.json)

if __name__ == "__main__":
    sys.exit(main())
