"""Policies by name: the scripted drivers of :mod:`pipeline.envs.policies`, or a trained checkpoint.

Lives at the package top because it spans rooms: a checkpoint policy needs ``train`` while the
scripted ones need only ``envs``; ``collect`` and ``eval`` both pick policies through here.
Every policy has ``reset(seed)`` between episodes and ``act(obs, info) -> float32 (2,)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pipeline.envs.policies import SCRIPTED_POLICIES, make_scripted_policy
from pipeline.errors import PipelineError


class AgentPolicy:
    """Drives with an agent's deterministic actor (``agent.select_action(obs, noise=0)``), plus
    optional Gaussian action noise of std ``noise`` drawn from a generator reseeded every episode,
    so an episode's actions depend only on the weights, the observations and the episode seed."""

    def __init__(self, agent, noise: float = 0.0, seed: int = 0):
        self.agent, self.noise = agent, float(noise)
        self.rng = np.random.default_rng(seed)

    @property
    def obs_spec(self):
        return self.agent.obs_spec

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: dict, info: dict) -> np.ndarray:
        action = np.asarray(self.agent.select_action(obs, noise=0.0), dtype=np.float32)
        if self.noise > 0:
            action = np.clip(action + self.rng.normal(0.0, self.noise, size=action.shape), -1.0, 1.0)
        return action.astype(np.float32)


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


def make_policy(name: str, env, noise: float = 0.0, seed: int = 0):
    """``"expert"``, ``"random"`` or the path of a ``.pt`` checkpoint."""
    if name in SCRIPTED_POLICIES:
        return make_scripted_policy(name, env, noise=noise, seed=seed)
    if Path(name).suffix == ".pt" or Path(name).exists():
        if not Path(name).is_file():
            raise PipelineError(f"checkpoint {name} does not exist")
        return CheckpointPolicy(name, env, noise=noise, seed=seed)
    return make_scripted_policy(name, env, noise=noise, seed=seed)  # raises the one-line error
