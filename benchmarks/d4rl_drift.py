"""How far the Gymnasium `-v5` MuJoCo environments, on which this project evaluates, drift from the D4RL data,
which gym's v3-era environments made on mujoco-py.

D4RL locomotion files log the simulator state of every step (`infos/qpos`, `infos/qvel`). For start steps drawn
from the file, the `-v5` environment is set to the logged state and the logged actions are replayed; the report
gives how far its observations and rewards are from the file's after 1, 10 and 100 steps (only stretches of one
episode, without a termination or time-out inside, are used):

    python -m benchmarks.d4rl_drift --env hopper-medium-v2 [--starts 200] [--env-kwargs '{"reset_noise_scale": 0}']

The file is found (or downloaded) the way the scripts find it. Observation drift is given in units of the data's
per-dimension std, so the numbers of different environments compare.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

from common.data import LOCOMOTION_ENVS, load_offline_data, parse_d4rl_name

HORIZONS = (1, 10, 100)


def replay_drift(path, env_id: str, starts: int = 200, horizons=HORIZONS, seed: int = 0,
                 env_kwargs: dict | None = None) -> dict[int, dict[str, float]]:
    """{horizon: {observation_drift (mean |obs - logged| / std), observation_drift_max, reward_drift (mean
    |r - logged r|), stretches}} for `starts` start steps drawn from the D4RL file at `path`."""
    with h5py.File(path, "r") as file:
        if "infos/qpos" not in file or "infos/qvel" not in file:
            raise ValueError(f"{path} has no infos/qpos and infos/qvel to set the environment's state from")
        observations, actions = file["observations"][()], file["actions"][()]
        rewards, qpos, qvel = file["rewards"][()], file["infos/qpos"][()], file["infos/qvel"][()]
        ends = file["terminals"][()].astype(bool) | file["timeouts"][()].astype(bool)
    longest = max(horizons)
    # a stretch [i, i + longest] lies in one episode: no end among steps i .. i + longest - 1
    ends_before = np.concatenate([[0], np.cumsum(ends)])
    valid = np.flatnonzero(ends_before[longest:len(ends) + 1] - ends_before[:len(ends) + 1 - longest] == 0)
    valid = valid[valid + longest < len(observations)]
    if len(valid) == 0:
        raise ValueError(f"{path} has no stretch of {longest} steps inside one episode")
    chosen = np.random.default_rng(seed).choice(valid, size=min(starts, len(valid)), replace=False)
    scale = observations.std(axis=0) + 1e-6
    env = gym.make(env_id, **(env_kwargs or {}))
    env.reset(seed=seed)
    simulator = env.unwrapped
    observation_error = {h: [] for h in horizons}
    reward_error = {h: [] for h in horizons}
    for start in chosen:
        simulator.set_state(qpos[start], qvel[start])
        for offset in range(longest):
            observation, reward, *_ = simulator.step(actions[start + offset])
            if offset + 1 in observation_error:
                logged = observations[start + offset + 1]
                observation_error[offset + 1].append(np.abs((observation - logged) / scale).mean())
                reward_error[offset + 1].append(abs(reward - rewards[start + offset]))
    env.close()
    return {h: {"observation_drift": float(np.mean(observation_error[h])),
                "observation_drift_max": float(np.max(observation_error[h])),
                "reward_drift": float(np.mean(reward_error[h])), "stretches": len(chosen)} for h in horizons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="hopper-medium-v2", help="a D4RL locomotion name")
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--env-kwargs", default="{}", help="JSON keyword arguments of the -v5 environment")
    options = parser.parse_args()
    parsed = parse_d4rl_name(options.env)
    if parsed is None or parsed[0] != "locomotion":
        parser.error(f"--env takes a D4RL locomotion name such as hopper-medium-v2, got {options.env}")
    data = load_offline_data(options.env)  # finds or downloads the file, with the scripts' messages
    env = parsed[1]
    path = Path(data.source.removeprefix("d4rl-hdf5:"))
    report = replay_drift(path, LOCOMOTION_ENVS[env], options.starts, seed=options.seed,
                          env_kwargs=json.loads(options.env_kwargs))
    print(f"{options.env} ({path}) replayed on {LOCOMOTION_ENVS[env]} {options.env_kwargs}:")
    print("| steps | observation drift (data std) | max | reward drift | stretches |\n|---|---|---|---|---|")
    for horizon, row in report.items():
        print(f"| {horizon} | {row['observation_drift']:.4g} | {row['observation_drift_max']:.4g} | "
              f"{row['reward_drift']:.4g} | {row['stretches']} |")


if __name__ == "__main__":
    main()
