"""Policies by name, for ``collect``, ``eval`` and the benchmarks: one registry, one
:func:`make_policy`.

A policy has ``reset(seed)`` between episodes and ``act(obs, info) -> float32 (2,)`` (see
``base.py``). Names are the scripted drivers of ``scripted.py`` (``expert``, ``random``,
``autopilot``) or the path of a ``.pt`` checkpoint (``checkpoint.py``, the only module here that
imports the learner, and only when a checkpoint is asked for).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.policies.scripted import AutopilotPolicy, ExpertPolicy, RandomPolicy

#: name -> ``factory(env, noise=, seed=)``: the scripted policies, in the order help lists them.
SCRIPTED_POLICIES = {
    "expert": ExpertPolicy.for_env,
    "random": RandomPolicy.for_env,
    "autopilot": AutopilotPolicy.for_env,  # CARLA only
}

# Loaded on first use: importing the registry must not import torch and the learner.
_CHECKPOINT_NAMES = ("AgentPolicy", "CheckpointPolicy", "load_agent")


def __getattr__(name):
    if name in _CHECKPOINT_NAMES:
        from pipeline.policies import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_checkpoint(name: str) -> bool:
    """True when ``name`` names a checkpoint (a ``.pt`` path, or any existing file)."""
    return name not in SCRIPTED_POLICIES and (Path(name).suffix == ".pt" or Path(name).exists())


def make_policy(name: str, env, noise: float = 0.0, seed: int = 0):
    """The policy called ``name`` for ``env``: ``"expert"``, ``"random"``, ``"autopilot"`` (CARLA
    only) or the path of a ``.pt`` checkpoint. ``noise``: std of Gaussian action noise (none for
    ``random``; refused for ``autopilot``); ``seed``: the noise generator's first seed."""
    if name in SCRIPTED_POLICIES:
        return SCRIPTED_POLICIES[name](env, noise=noise, seed=seed)
    if is_checkpoint(name):
        if not Path(name).is_file():
            raise PipelineError(f"checkpoint {name} does not exist")
        from pipeline.policies.checkpoint import CheckpointPolicy

        return CheckpointPolicy(name, env, noise=noise, seed=seed)
    raise PipelineError(f"unknown policy {name!r}; choose from {', '.join(SCRIPTED_POLICIES)} or a checkpoint path")
