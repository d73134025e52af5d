"""One recorded episode in the frame-deduplicated layout shared by the store and the replay ring.

An episode of ``T`` steps with a frame stack of ``K`` (4) holds ``K - 1 + T + 1`` frames: the first
observation's whole stack, then the newest frame of every following observation. Observation ``t``
is ``frames[t : t + K]``; this works because our frame-stack wrapper guarantees
``obs[t + 1].image[:-1] == obs[t].image[1:]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

_NO_LABEL = np.full(2, np.nan, dtype=np.float32)


@dataclass
class Episode:
    """Arrays of one episode. Shapes for ``T`` steps, stack ``K``, vector size ``D``:

    - ``frames``     uint8   ``(K - 1 + T + 1, H, W)``
    - ``vector``     float32 ``(T + 1, D)``
    - ``action``     float32 ``(T, 2)``
    - ``reward``     float32 ``(T,)``
    - ``terminated`` bool    ``(T,)``  (true only possibly at the last step)
    - ``truncated``  bool    ``(T,)``
    - ``expert_action`` float32 ``(T, 2)``: the scripted expert's own action in each state, the
      label for behaviour cloning when ``action`` had noise added (DART); NaN rows where the
      collecting policy gave none. None for stores recorded before labels were kept.
    """

    frames: np.ndarray
    vector: np.ndarray
    action: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    expert_action: np.ndarray | None = None
    route: str = ""
    seed: int = -1
    termination: str = ""
    info: dict = field(default_factory=dict)  # JSON-able extras (e.g. route_completion)

    @property
    def length(self) -> int:
        return int(len(self.action))

    @property
    def frame_stack(self) -> int:
        return int(len(self.frames) - self.length)

    @property
    def episode_return(self) -> float:
        return float(self.reward.sum(dtype=np.float64))

    def summary(self) -> "EpisodeSummary":
        """What is said of the episode once it is stored, without its arrays."""
        return EpisodeSummary(route=self.route, seed=self.seed, length=self.length,
                              episode_return=self.episode_return, termination=self.termination, info=self.info)

    def observation(self, t: int) -> dict[str, np.ndarray]:
        """The dict observation at step ``t`` (0..T), rebuilt from the deduplicated frames."""
        k = self.frame_stack
        return {"image": self.frames[t : t + k], "vector": self.vector[t]}


@dataclass(frozen=True)
class EpisodeSummary:
    """An :class:`Episode`'s description without its arrays (what a progress line reports)."""

    route: str
    seed: int
    length: int
    episode_return: float
    termination: str
    info: dict


class EpisodeRecorder:
    """Accumulates env steps into an :class:`Episode` without copying whole stacks.

    >>> rec = EpisodeRecorder(route="racetrack", seed=0)
    >>> rec.start(obs)                                # obs from env.reset()
    >>> rec.add(action, reward, next_obs, terminated, truncated)   # once per env.step()
    >>> episode = rec.finish(termination="route_done")
    """

    def __init__(self, route: str = "", seed: int = -1):
        self.route, self.seed = route, seed
        # The frames go into one buffer, grown by doubling, never as views of the observations: a
        # view of each step's newest frame kept that step's whole stack alive, and that memory
        # churn held expert laps at 0.92 of the raw env rate (0.98 with the buffer; 2026-12-06).
        self._frames = np.empty((0, 0, 0), np.uint8)
        self._num_frames = 0
        self._vector: list[np.ndarray] = []
        self._action: list[np.ndarray] = []
        self._reward: list[float] = []
        self._terminated: list[bool] = []
        self._truncated: list[bool] = []
        self._expert_action: list[np.ndarray] = []

    def start(self, obs: dict) -> None:
        stack = np.asarray(obs["image"], dtype=np.uint8)
        self._frames = np.empty((max(64, 2 * len(stack)), *stack.shape[1:]), np.uint8)
        self._frames[: len(stack)] = stack
        self._num_frames = len(stack)
        self._vector = [np.asarray(obs["vector"], dtype=np.float32)]
        self._action, self._reward, self._terminated, self._truncated = [], [], [], []
        self._expert_action = []

    def add(self, action, reward: float, next_obs: dict, terminated: bool, truncated: bool,
            expert_action=None) -> None:
        """One ``env.step``; ``expert_action`` is the expert's label for the state acted in, if any."""
        if self._num_frames == len(self._frames):
            self._frames = np.concatenate([self._frames, np.empty_like(self._frames)])
        self._frames[self._num_frames] = next_obs["image"][-1]
        self._num_frames += 1
        self._vector.append(np.asarray(next_obs["vector"], dtype=np.float32))
        self._action.append(np.asarray(action, dtype=np.float32))
        self._reward.append(float(reward))
        self._terminated.append(bool(terminated))
        self._truncated.append(bool(truncated))
        self._expert_action.append(_NO_LABEL if expert_action is None
                                   else np.asarray(expert_action, dtype=np.float32).reshape(2))

    @property
    def length(self) -> int:
        return len(self._action)

    def finish(self, termination: str | None = None, **info) -> Episode:
        def pairs(rows: list[np.ndarray]) -> np.ndarray:
            return np.stack(rows).reshape(-1, 2) if rows else np.zeros((0, 2), np.float32)

        return Episode(
            frames=self._frames[: self._num_frames],
            vector=np.stack(self._vector),
            action=pairs(self._action),
            expert_action=pairs(self._expert_action),
            reward=np.asarray(self._reward, dtype=np.float32),
            terminated=np.asarray(self._terminated, dtype=bool),
            truncated=np.asarray(self._truncated, dtype=bool),
            route=self.route,
            seed=int(self.seed),
            termination=termination or "",
            info=info,
        )
