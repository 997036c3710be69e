"""Relay-kitchen through Minari's D4RL ports: FrankaKitchen-v1 evaluation with the alignment paper's metric (the share
of the episode's sub-tasks completed) and a success flag, on a tiny dataset in the ports' layout made here."""
import gymnasium as gym
import gymnasium_robotics
import minari
import numpy as np
import pytest
from minari.data_collector import EpisodeBuffer

from common.data import load_offline_data, normalized_score

gym.register_envs(gymnasium_robotics)
DATASET_ID = "D4RL/kitchen/tiny-v2"
TASKS = ["microwave", "kettle", "light switch", "slide cabinet"]  # what the D4RL kitchen ports ask for
GOALS = {"microwave": ([22], [-0.75]), "kettle": ([23, 24, 25, 26, 27, 28, 29], [-0.23, 0.75, 1.62, 0.99, 0, 0, -0.06]),
         "light switch": ([17, 18], [-0.69, -0.05]), "slide cabinet": ([19], [0.37])}  # joint positions that solve them


def stack(observations: list):
    """Observation dicts of one episode as Minari stores them: a dict (nested like the space) of stacked arrays."""
    if isinstance(observations[0], dict):
        return {key: stack([observation[key] for observation in observations]) for key in observations[0]}
    return np.stack(observations)


@pytest.fixture(scope="module")
def kitchen_data():
    """Two short random FrankaKitchen-v1 episodes with dict observations, stored as the ports store theirs."""
    env_spec = gym.spec("FrankaKitchen-v1")
    env = gym.make(env_spec, tasks_to_complete=TASKS, max_episode_steps=8)
    rng = np.random.default_rng(0)
    buffers = []
    for episode in range(2):
        observations, actions, rewards, terminations, truncations = [env.reset(seed=episode)[0]], [], [], [], []
        while not (terminations and (terminations[-1] or truncations[-1])):
            actions.append(rng.uniform(-1, 1, 9).astype(np.float32))
            observation, reward, terminated, truncated, _ = env.step(actions[-1])
            observations.append(observation)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
        buffers.append(EpisodeBuffer(id=episode, seed=episode, observations=stack(observations),
                                     actions=np.stack(actions), rewards=rewards, terminations=terminations,
                                     truncations=truncations, infos={}))
    minari.create_dataset_from_buffers(dataset_id=DATASET_ID, buffer=buffers, env=env.spec, algorithm_name="random")
    env.close()
    return load_offline_data(DATASET_ID)


def solve(env, tasks):
    qpos = env.unwrapped.data.qpos
    for task in tasks:
        indices, values = GOALS[task]
        qpos[indices] = values
    return env.step(np.zeros(9, dtype=np.float32))


def test_the_port_loads_with_the_robot_and_object_state_and_the_subtask_count_as_reference(kitchen_data):
    assert kitchen_data.family == "kitchen" and kitchen_data.observation_dim == 59 and kitchen_data.action_dim == 9
    assert (kitchen_data.ref_min_score, kitchen_data.ref_max_score) == (0.0, 4.0)
    assert kitchen_data.episode_ends.sum() == 2 and len(kitchen_data) == 16


def test_the_return_counts_completed_subtasks_and_success_needs_all_four(kitchen_data):
    env = kitchen_data.make_env()
    env.reset(seed=0)
    _, reward, terminated, _, info = solve(env, ["microwave"])
    assert reward == 1.0 and not info["success"] and not terminated
    _, reward, terminated, _, info = solve(env, ["microwave"])  # done before: not counted again
    assert reward == 0.0 and not info["success"]
    _, reward, terminated, _, info = solve(env, TASKS[1:])
    assert reward == 3.0 and info["success"] and terminated
    env.close()
    assert normalized_score(kitchen_data, np.array([1.0, 4.0])).tolist() == [25.0, 100.0]  # percent of the sub-tasks
