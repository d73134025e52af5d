"""What every policy is: ``reset(seed)`` between episodes, ``act(obs, info) -> float32 (2,)``.

``obs`` is the env's observation ``{'image': uint8 (4, 84, 84), 'vector': float32 (D,)}`` and
``info`` its last info dict (the scripted expert reads ``info["state_vector"]``). An action is
``[steer, throttle_brake]`` in [-1, 1].
"""

from __future__ import annotations

import numpy as np


class SeededPolicy:
    """A policy whose randomness comes from its own generator, reseeded by ``reset(seed)``, so an
    episode's actions depend only on the state and the episode seed, never on earlier episodes."""

    def __init__(self, seed: int = 0, noise: float = 0.0):
        self.rng = np.random.default_rng(seed)
        self.noise = float(noise)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def with_noise(self, action: np.ndarray) -> np.ndarray:
        """``action`` plus Gaussian noise of std ``self.noise`` (none when 0), clipped to [-1, 1],
        as float32."""
        if self.noise > 0:
            action = np.clip(action + self.rng.normal(0.0, self.noise, size=np.shape(action)), -1.0, 1.0)
        return np.asarray(action).astype(np.float32)
