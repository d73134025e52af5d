"""Our own frame-stack wrapper: backends emit one grayscale frame per step, this stacks K of them.

Stacking here (not in the simulator) is what makes ``obs[t+1].image[:-1] == obs[t].image[1:]``
true by construction, and the dataset store relies on that to keep each frame once.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class FrameStack(gym.Wrapper):
    """``Dict(frame=(H, W) uint8, vector)`` -> ``Dict(image=(K, H, W) uint8, vector)``, oldest first.

    On reset the first frame is repeated K times.
    """

    def __init__(self, env: gym.Env, k: int = 4):
        super().__init__(env)
        self.k = k
        frame_space = env.observation_space["frame"]
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, (k, *frame_space.shape), np.uint8),
                "vector": env.observation_space["vector"],
            }
        )
        self._frames: deque[np.ndarray] = deque(maxlen=k)

    def _observation(self, obs: dict) -> dict:
        return {"image": np.stack(self._frames), "vector": obs["vector"]}

    def reset(self, *, seed=None, options=None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._frames.clear()
        self._frames.extend([obs["frame"]] * self.k)
        return self._observation(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._frames.append(obs["frame"])
        return self._observation(obs), reward, terminated, truncated, info
