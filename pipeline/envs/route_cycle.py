"""Several routes behind one env: each reset drives the next route in turn (``--route FILE.xml``
on ``train``, whose learner rolls out in one env).

Only one route's env exists at a time: a CARLA server runs one env, so the previous route's env is
closed (its actors destroyed, the server's settings restored) before the next one is built. With
a single route there is nothing to switch, and :func:`pipeline.envs.make_env` returns that route's
env itself.
"""

from __future__ import annotations

from typing import Callable

import gymnasium as gym

from pipeline.envs.routes import Route


class RouteCycleEnv(gym.Env):
    """Episode ``k`` drives ``routes[k % len(routes)]``; ``build(route)`` makes a route's env.

    ``unwrapped`` is the current route's env, so ``env.unwrapped.route`` and ``obs_spec`` describe
    the episode being driven. All routes must give the same observation and action spaces.
    """

    def __init__(self, routes: list[Route], build: Callable[[Route], gym.Env]):
        if not routes:
            raise ValueError("RouteCycleEnv needs at least one route")
        self.routes, self._build = list(routes), build
        self._env = build(self.routes[0])
        self._current, self._episodes = 0, 0
        self.observation_space, self.action_space = self._env.observation_space, self._env.action_space
        self.metadata = self._env.metadata

    @property
    def unwrapped(self):
        return self._env.unwrapped

    def _switch_to(self, index: int) -> None:
        if index == self._current:
            return
        self._env.close()
        self._env = self._build(self.routes[index])
        self._current = index
        if self._env.observation_space != self.observation_space:
            raise ValueError(f"route {self.routes[index].name} gives another observation space")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        self._switch_to(self._episodes % len(self.routes))
        self._episodes += 1
        return self._env.reset(seed=seed, options=options)

    def step(self, action):
        return self._env.step(action)

    def render(self):
        return self._env.render()

    def close(self) -> None:
        self._env.close()
