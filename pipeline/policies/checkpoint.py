"""Trained policies: a TD3 agent's deterministic actor, from memory or from a checkpoint file.

The only module of ``policies`` that knows the learner (``train.td3``), imported when a checkpoint
is asked for, so collecting or evaluating with a scripted policy never loads torch's networks.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pipeline.policies.base import SeededPolicy


class AgentPolicy(SeededPolicy):
    """Drives with an agent's deployed policy (``agent.select_action(obs, noise=0, averaged=True)``:
    the Polyak-averaged encoder and actor), plus optional Gaussian action noise of std ``noise``
    drawn from a generator reseeded every episode, so an episode's actions depend only on the
    weights, the observations and the episode seed."""

    averaged = True  # the deployed networks: Polyak averages (False: the online ones, as before 968c5b5)

    def __init__(self, agent, noise: float = 0.0, seed: int = 0):
        super().__init__(seed, noise)
        self.agent = agent

    @property
    def obs_spec(self):
        return self.agent.obs_spec

    def act(self, obs: dict, info: dict) -> np.ndarray:
        action = self.agent.select_action(obs, noise=0.0, averaged=self.averaged)
        return self.with_noise(np.asarray(action, dtype=np.float32))


def load_agent(path: str, device: str = "cpu"):
    """The TD3 agent saved at ``path`` (``weights_only`` load; bad files raise one-line errors)."""
    from pipeline.train.td3 import TD3Agent

    return TD3Agent.load(path, map_location=device)


class CheckpointPolicy(AgentPolicy):
    """The actor of a saved TD3 agent for ``env``.

    The env must give the observation the agent was trained on (image shape, vector fields);
    the number of other vehicles may differ, since traffic only changes what the image shows and
    evaluating in other traffic is a fair test."""

    def __init__(self, path: str, env, noise: float = 0.0, seed: int = 0, device: str = "cpu"):
        agent = load_agent(path, device)
        env_spec = env.unwrapped.obs_spec
        dataclasses.replace(env_spec, traffic=agent.obs_spec.traffic).check_compatible(
            agent.obs_spec, f"checkpoint {path}")
        super().__init__(agent, noise=noise, seed=seed)
        self.path = str(path)
