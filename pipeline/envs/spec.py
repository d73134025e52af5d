"""The Dict contract every driving backend meets.

Observation ``Dict(image=Box(0, 255, (4, 84, 84), uint8), vector=Box(-inf, inf, (D,), float32))``:
four stacked 84x84 grayscale frames, oldest first, and a vector of driving state whose fields are
named in :data:`VECTOR_FIELDS`. Action ``Box(-1, 1, (2,), float32)``: steer, and throttle (>0) /
brake (<0).

Specs are plain data: :meth:`ObsSpec.to_dict` is what stores and checkpoints record (as JSON), and
:meth:`ObsSpec.mismatch` names the fields that differ when a store, checkpoint and env meet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gymnasium import spaces

from pipeline.errors import SpecMismatchError

N_WAYPOINTS = 10
#: Full driving-state vector, in order. Waypoints are the next route points in the ego frame
#: (x forward, y left), metres.
VECTOR_FIELDS: tuple[str, ...] = ("speed", "lateral_offset", "heading_error") + tuple(
    f"wp{i}_{axis}" for i in range(N_WAYPOINTS) for axis in ("x", "y")
)
ACTION_FIELDS: tuple[str, ...] = ("steer", "throttle_brake")

#: ``info`` keys every backend returns from ``step``.
INFO_KEYS: tuple[str, ...] = ("route_completion", "collision", "off_route", "speed", "termination",
                              "red_light", "stop_sign")
#: Values of ``info["termination"]`` besides None.
TERMINATIONS: tuple[str, ...] = ("route_done", "collision", "off_route", "stuck", "timeout")

#: Cameras a backend can attach to the ego. ``bev``: the car-mounted, heading-up bird's-eye view
#: of :mod:`pipeline.envs.bev` (both backends); ``front``: an RGB camera above the bonnet (CARLA).
CAMERAS: tuple[str, ...] = ("bev", "front")
#: The camera of stores and checkpoints made before the camera was part of the spec. Their frames
#: were a world-aligned top-down map (embedded) or the front camera (CARLA), so they match neither.
UNRECORDED_CAMERA = "unrecorded"


def _named_vector_fields(names: tuple[str, ...] | list[str] | str | None) -> tuple[str, ...]:
    """Resolve a user's field list: None/'all' -> every field; 'speed' or 'speed,heading_error'."""
    if names is None or names == "all" or names == ("all",):
        return VECTOR_FIELDS
    if isinstance(names, str):
        names = tuple(n.strip() for n in names.split(",") if n.strip())
    names = tuple(names)
    unknown = [n for n in names if n not in VECTOR_FIELDS]
    if unknown or not names:
        raise SpecMismatchError(
            f"unknown vector field(s) {unknown or names!r}; known: all, {', '.join(VECTOR_FIELDS)}"
        )
    return tuple(n for n in VECTOR_FIELDS if n in names)  # canonical order


@dataclass(frozen=True)
class ObsSpec:
    """Observation contract.

    - ``image``: uint8 ``(frame_stack, image_size, image_size)``, grayscale, oldest frame first.
    - ``vector``: float32 ``(len(vector_fields),)``, a subset of :data:`VECTOR_FIELDS` in order.
    - ``traffic``: number of other vehicles; they appear only in the image.
    - ``camera``: what the frames show, one of :data:`CAMERAS`.
    """

    vector_fields: tuple[str, ...] = VECTOR_FIELDS
    traffic: int = 0
    frame_stack: int = 4
    image_size: int = 84
    camera: str = "bev"

    def __post_init__(self):
        object.__setattr__(self, "vector_fields", _named_vector_fields(self.vector_fields))
        if self.camera not in (*CAMERAS, UNRECORDED_CAMERA):
            raise SpecMismatchError(f"unknown camera {self.camera!r}; choose one of {', '.join(CAMERAS)}")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.frame_stack, self.image_size, self.image_size)

    @property
    def vector_dim(self) -> int:
        return len(self.vector_fields)

    @property
    def vector_index(self) -> np.ndarray:
        """Positions of ``vector_fields`` inside the full :data:`VECTOR_FIELDS` vector."""
        return np.array([VECTOR_FIELDS.index(n) for n in self.vector_fields], dtype=np.int64)

    def observation_space(self) -> spaces.Dict:
        return spaces.Dict(
            {
                "image": spaces.Box(0, 255, self.image_shape, np.uint8),
                "vector": spaces.Box(-np.inf, np.inf, (self.vector_dim,), np.float32),
            }
        )

    def frame_space(self) -> spaces.Dict:
        """What a backend emits per step, before the frame stack: one uint8 ``(H, W)`` frame and
        the float32 ``(D,)`` vector."""
        return spaces.Dict(
            {
                "frame": spaces.Box(0, 255, (self.image_size,) * 2, np.uint8),
                "vector": spaces.Box(-np.inf, np.inf, (self.vector_dim,), np.float32),
            }
        )

    def to_dict(self) -> dict:
        return {
            "vector_fields": list(self.vector_fields),
            "traffic": self.traffic,
            "frame_stack": self.frame_stack,
            "image_size": self.image_size,
            "camera": self.camera,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ObsSpec":
        return cls(
            vector_fields=tuple(d["vector_fields"]),
            traffic=int(d.get("traffic", 0)),
            frame_stack=int(d.get("frame_stack", 4)),
            image_size=int(d.get("image_size", 84)),
            camera=str(d.get("camera", UNRECORDED_CAMERA)),
        )

    def mismatch(self, other: "ObsSpec") -> list[str]:
        """Names of fields whose values differ (empty when compatible)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [k for k in mine if mine[k] != theirs[k]]

    def check_compatible(self, other: "ObsSpec", what: str) -> None:
        """Raise :class:`SpecMismatchError` naming each differing field of ``what`` vs ``self``."""
        diff = self.mismatch(other)
        if diff:
            details = "; ".join(
                f"{k}: {other.to_dict()[k]!r} != {self.to_dict()[k]!r}" for k in diff
            )
            if "camera" in diff and UNRECORDED_CAMERA in (self.camera, other.camera):
                details += (" - made before the camera was part of the spec, when frames were a "
                            "world-aligned map (embedded) or the front camera (CARLA); record it again")
            raise SpecMismatchError(f"{what} has a different observation spec ({details})")


@dataclass(frozen=True)
class ActionSpec:
    """Action contract: float32 ``(2,)`` in [-1, 1]: steer (+ = left), throttle (>0) / brake (<0)."""

    fields: tuple[str, ...] = field(default=ACTION_FIELDS)

    @property
    def dim(self) -> int:
        return len(self.fields)

    def action_space(self) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, (self.dim,), np.float32)

    def to_dict(self) -> dict:
        return {"fields": list(self.fields), "low": -1.0, "high": 1.0}

    @classmethod
    def from_dict(cls, d: dict) -> "ActionSpec":
        return cls(fields=tuple(d["fields"]))

    def check_compatible(self, other: "ActionSpec", what: str) -> None:
        """Raise :class:`SpecMismatchError` when ``what`` (a store, a checkpoint) acts otherwise."""
        if other != self:
            raise SpecMismatchError(f"{what} has a different action spec (fields: "
                                    f"{list(other.fields)!r} != {list(self.fields)!r})")
