"""Policies by name: the scripted drivers of :mod:`pipeline.envs.policies`, or a trained checkpoint.

Lives at the package top because it spans rooms: a checkpoint policy needs ``train`` while the
scripted ones need only ``envs``; ``collect`` and ``eval`` both pick policies through here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.envs.policies import SCRIPTED_POLICIES, make_scripted_policy


class CheckpointPolicy:
    """The deterministic actor of a saved TD3 agent (plus optional Gaussian noise)."""

    def __init__(self, path: str, env, noise: float = 0.0, device: str = "cpu"):
        from pipeline.train.td3 import TD3Agent

        self.agent = TD3Agent.load(path, map_location=device, expected_obs_spec=env.unwrapped.obs_spec)
        self.noise = noise

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            import torch

            torch.manual_seed(seed)

    def act(self, obs: dict, info: dict):
        return self.agent.select_action(obs, noise=self.noise)


def make_policy(name: str, env, noise: float = 0.0, seed: int = 0):
    """``"expert"``, ``"random"`` or the path of a ``.pt`` checkpoint."""
    if name in SCRIPTED_POLICIES:
        return make_scripted_policy(name, env, noise=noise, seed=seed)
    if Path(name).suffix == ".pt" or Path(name).exists():
        from pipeline.errors import PipelineError

        if not Path(name).is_file():
            raise PipelineError(f"checkpoint {name} does not exist")
        return CheckpointPolicy(name, env, noise=noise)
    return make_scripted_policy(name, env, noise=noise, seed=seed)  # raises the one-line error
