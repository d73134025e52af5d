"""Everything that talks to a simulator. Other rooms only call :func:`make_env`."""

from __future__ import annotations

import gymnasium as gym

from pipeline.envs.routes import Route, get_route, list_routes
from pipeline.envs.spec import CAMERAS, ActionSpec, ObsSpec
from pipeline.errors import PipelineError

__all__ = ["make_env", "get_route", "list_routes", "Route", "ObsSpec", "ActionSpec", "obs_spec_for"]


def obs_spec_for(route: str | Route, vector_fields=None, traffic: int | None = None,
                 camera: str | None = None) -> ObsSpec:
    """The observation spec a route gives with these options (traffic defaults to the route's,
    the camera to ``bev``, the only one the embedded backend draws)."""
    route = get_route(route) if isinstance(route, str) else route
    camera = camera or "bev"
    if camera not in CAMERAS:
        raise PipelineError(f"unknown camera {camera!r}; choose one of {', '.join(CAMERAS)}")
    if route.backend == "embedded" and camera != "bev":
        raise PipelineError(f"the embedded backend draws only the bev camera; --camera {camera} needs a CARLA route")
    return ObsSpec(vector_fields=vector_fields, traffic=route.traffic if traffic is None else int(traffic),
                   camera=camera)


def make_env(route: str | Route = "racetrack", backend: str | None = None, seed: int | None = None,
             vector_fields=None, traffic: int | None = None, max_steps: int | None = None,
             camera: str | None = None, **backend_options) -> gym.Env:
    """Build the driving env for a named route.

    Returns a gymnasium env with observation ``Dict(image=uint8 (4, 84, 84), vector=float32 (D,))``
    and action float32 ``(2,)`` in [-1, 1]. ``env.unwrapped.obs_spec`` and ``env.unwrapped.route``
    describe it. ``seed`` seeds the action space (``reset(seed=...)`` seeds the episode).
    ``camera``: ``bev`` (default, both backends) or ``front`` (CARLA). ``backend_options`` go to
    the backend (CARLA: ``host``, ``port``, ``timeout``).
    """
    from pipeline.envs.wrappers import FrameStack

    route = get_route(route) if isinstance(route, str) else route
    if backend is not None and backend != route.backend:
        raise PipelineError(f"route {route.name!r} belongs to the {route.backend} backend, not {backend}")
    if traffic is not None and int(traffic) < 0:
        raise PipelineError(f"traffic must be >= 0, got {traffic}")
    spec = obs_spec_for(route, vector_fields, traffic, camera)
    if route.backend == "embedded":
        from pipeline.envs.embedded import EmbeddedDrivingEnv

        env = EmbeddedDrivingEnv(route, spec, max_steps=max_steps, **backend_options)
    else:
        from pipeline.envs.carla_env import CarlaDrivingEnv

        env = CarlaDrivingEnv(route, spec, max_steps=max_steps, **backend_options)
    env = FrameStack(env, spec.frame_stack)
    if seed is not None:
        env.action_space.seed(int(seed))
    return env
