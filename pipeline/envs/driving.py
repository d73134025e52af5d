"""Backend-independent driving logic: route geometry, the state vector, reward and termination.

Both backends (embedded highway-env and CARLA) feed ego pose + events in and get the same vector,
reward and termination out, so datasets and policies mean the same thing on either simulator.
Coordinates are metres in the simulator's world frame; yaw in radians in that frame.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.envs.spec import N_WAYPOINTS, VECTOR_FIELDS

WAYPOINT_SPACING_M = 4.0
# A vehicle whose centre is this close to the route's centre line is in the ego's lane (lanes are
# 4-5 m wide on both backends; a car half-way into the lane counts), and one further ahead than
# the horizon does not matter yet (about 4 s at the racetrack's 10 m/s).
LEAD_CORRIDOR_M = 2.5
LEAD_HORIZON_M = 40.0


def wrap_angle(a: float) -> float:
    return float((a + np.pi) % (2 * np.pi) - np.pi)


def resample_polyline(points: np.ndarray, spacing: float) -> np.ndarray:
    """Points ``(M, D)`` (x, y, then any other columns) -> ``(K, D)`` evenly spaced by ``spacing``
    along the x-y path; repeated points are dropped."""
    points = np.asarray(points, dtype=np.float64)
    steps = np.linalg.norm(np.diff(points[:, :2], axis=0), axis=1)
    points = points[np.concatenate([[True], steps > 1e-6])]
    cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points[:, :2], axis=0), axis=1))])
    s = np.arange(0.0, cum[-1], spacing)
    if cum[-1] - s[-1] > 1e-6:
        s = np.append(s, cum[-1])
    return np.stack([np.interp(s, cum, points[:, k]) for k in range(points.shape[1])], axis=1)


@dataclass
class RouteState:
    progress_m: float  # distance driven along the route from its start
    lateral: float  # signed distance from the route centre line, + = left of travel direction
    route_heading: float  # direction of the route at the projection point
    completion: float  # progress / route length, clipped to [0, 1]


class RouteTracker:
    """Tracks an ego vehicle's progress along a route polyline.

    ``points`` is an ``(M, 2)`` array of route centre-line points from start to goal. A closed route
    (one lap of a loop) passes ``closed=True``: the polyline is then the lap followed by a second
    copy, so lookahead waypoints continue across the finish line. Projection searches a window
    around the last match so a loop's start and end, or crossing roads, never make progress jump.
    """

    def __init__(self, points: np.ndarray, closed: bool = False, spacing: float = 1.0,
                 search_window_m: float = 30.0):
        pts = resample_polyline(points, spacing)
        if closed:
            pts = np.concatenate([pts, pts[1:]], axis=0)
        self.points = pts
        seg = np.diff(pts, axis=0)
        self._seg = seg
        self._seg_len = np.maximum(np.linalg.norm(seg, axis=1), 1e-9)
        self._cum = np.concatenate([[0.0], np.cumsum(self._seg_len)])
        total = float(self._cum[-1])
        self.length = total / 2 if closed else total
        self._window = max(2, int(search_window_m / spacing))
        self._index = 0

    def _project(self, position: np.ndarray, lo: int, hi: int) -> tuple[int, float, float, float]:
        a = self.points[lo:hi]
        d = self._seg[lo:hi]
        rel = position[None, :] - a
        t = np.clip((rel * d).sum(1) / self._seg_len[lo:hi] ** 2, 0.0, 1.0)
        closest = a + t[:, None] * d
        dist = np.linalg.norm(position[None, :] - closest, axis=1)
        k = int(np.argmin(dist))
        cross = d[k, 0] * rel[k, 1] - d[k, 1] * rel[k, 0]
        lateral = float(np.sign(cross) * dist[k]) if cross != 0 else 0.0
        return lo + k, float(t[k]), lateral, float(np.arctan2(d[k, 1], d[k, 0]))

    def reset(self, position) -> RouteState:
        """Start tracking at the route's beginning (searches the first window only)."""
        self._index = 0
        return self.update(position)

    def update(self, position) -> RouteState:
        position = np.asarray(position, dtype=np.float64)
        lo = max(0, self._index - self._window)
        hi = min(len(self._seg), self._index + self._window)
        i, t, lateral, heading = self._project(position, lo, hi)
        self._index = i
        progress = float(self._cum[i] + t * self._seg_len[i])
        completion = float(np.clip(progress / self.length, 0.0, 1.0)) if self.length > 0 else 1.0
        return RouteState(progress, lateral, heading, completion)

    def lead_vehicle(self, progress_m: float, positions, speeds, corridor_m: float = LEAD_CORRIDOR_M,
                     horizon_m: float = LEAD_HORIZON_M) -> tuple[float, float]:
        """The nearest other vehicle in the ego's path: ``(distance along the route from the ego
        at ``progress_m`` to that vehicle's centre, its speed)``, or ``(inf, inf)`` when none is
        within ``horizon_m`` ahead and ``corridor_m`` of the route's centre line (nothing to
        follow; inf rather than NaN so that infos compare equal).

        ``positions`` ``(V, 2)`` world metres and ``speeds`` ``(V,)`` m/s of the *other*
        vehicles (privileged: what a scripted expert may read, never the learner's observation).
        """
        positions = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if len(positions) == 0:
            return float("inf"), float("inf")
        lo = min(max(int(np.searchsorted(self._cum, progress_m, side="right")) - 1, 0), len(self._seg) - 1)
        hi = min(len(self._seg), lo + int(np.ceil(horizon_m / float(self._seg_len[lo]))) + 2)
        # every vehicle against every segment of the stretch ahead, at once: (V, S)
        a, d, length = self.points[lo:hi], self._seg[lo:hi], self._seg_len[lo:hi]
        rel = positions[:, None, :] - a[None]
        t = np.clip((rel * d[None]).sum(2) / length**2, 0.0, 1.0)
        dist = np.linalg.norm(rel - t[..., None] * d[None], axis=2)
        k = dist.argmin(axis=1)
        rows = np.arange(len(positions))
        along = self._cum[lo + k] + t[rows, k] * length[k] - progress_m
        ahead = (dist[rows, k] <= corridor_m) & (along > 0.0) & (along <= horizon_m)
        if not ahead.any():
            return float("inf"), float("inf")
        nearest = int(np.flatnonzero(ahead)[np.argmin(along[ahead])])
        return float(along[nearest]), float(np.asarray(speeds, dtype=np.float64).reshape(-1)[nearest])

    def point_at(self, s: np.ndarray) -> np.ndarray:
        """Route points at arc lengths ``s`` (clamped to the polyline), ``(len(s), 2)``."""
        s = np.clip(s, 0.0, self._cum[-1])
        return np.stack(
            [np.interp(s, self._cum, self.points[:, 0]), np.interp(s, self._cum, self.points[:, 1])],
            axis=1,
        )

    def waypoints_ego(self, position, yaw: float, progress_m: float,
                      n: int = N_WAYPOINTS, spacing: float = WAYPOINT_SPACING_M) -> np.ndarray:
        """The next ``n`` route points ahead of ``progress_m``, in the ego frame (x fwd, y left), ``(n, 2)``."""
        world = self.point_at(progress_m + spacing * np.arange(1, n + 1))
        rel = world - np.asarray(position, dtype=np.float64)[None, :]
        c, s = np.cos(yaw), np.sin(yaw)
        return np.stack([c * rel[:, 0] + s * rel[:, 1], -s * rel[:, 0] + c * rel[:, 1]], axis=1)


def driving_vector(speed: float, state: RouteState, yaw: float, waypoints_ego: np.ndarray) -> np.ndarray:
    """The full state vector in :data:`VECTOR_FIELDS` order, float32 ``(23,)``."""
    v = np.empty(len(VECTOR_FIELDS), dtype=np.float32)
    v[0] = speed
    v[1] = state.lateral
    v[2] = wrap_angle(yaw - state.route_heading)
    v[3:] = waypoints_ego.reshape(-1)
    return v


#: Bumped whenever the reward's definition changes; stores record it (``attrs["reward"]``).
#: Version 1 (stores without the attribute): uncapped progress, and ``stuck`` truncated with no
#: penalty, so braking to a stop and waiting out the clock beat every honest attempt that failed.
REWARD_VERSION = 2


@dataclass(frozen=True)
class RewardConfig:
    """Per-step reward, the same on both backends:

    ``progress_weight * min(metres gained along the route, target_speed * step_seconds)``
    ``- lateral_weight * min((lateral offset / lane_half_width)^2, 4)``, minus a one-off penalty
    when the episode ends in a failure: ``collision``, ``off_route`` or ``stuck``.

    Progress is capped at what the route's target speed covers in a step (as CARLA-Roach's speed
    term, which peaks at the desired speed), so driving faster than the route asks earns nothing:
    about +0.2 per step at 10 m/s on the centre line, and no more at 30. ``stuck`` (the
    leaderboard's "agent blocked") is a failure, as the leaderboard scores it, with a penalty at
    least as large as any other: otherwise stopping and waiting is worth more than trying.
    """

    progress_weight: float = 0.1
    lateral_weight: float = 0.05
    lane_half_width: float = 2.5
    collision_penalty: float = 10.0
    off_route_penalty: float = 5.0
    stuck_penalty: float = 10.0

    def penalty(self, termination: str | None) -> float:
        return {"collision": self.collision_penalty, "off_route": self.off_route_penalty,
                "stuck": self.stuck_penalty}.get(termination, 0.0)

    def to_dict(self) -> dict:
        """What a store records as ``attrs["reward"]``: the version and every weight."""
        return {"version": REWARD_VERSION, **asdict(self),
                "progress_cap": "route target_speed x step seconds", "stuck": "terminates"}


def reward_difference(a: dict | None, b: dict | None) -> str | None:
    """None when two recorded reward definitions (``RewardConfig.to_dict()``; None = a store from
    before rewards were recorded, version 1) agree, else a short description of how they differ."""
    a, b = a or {"version": 1}, b or {"version": 1}
    if a == b:
        return None
    keys = [k for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    return ", ".join(f"{k} {a.get(k)!r} vs {b.get(k)!r}" for k in keys)


def driving_reward(progress_delta_m: float, lateral: float, termination: str | None,
                   max_progress_m: float, cfg: RewardConfig = RewardConfig()) -> float:
    """One step's reward (see :class:`RewardConfig`); ``termination`` is the step's ending reason
    (:class:`TerminationRule`), ``max_progress_m`` the route's target speed times the step length."""
    r = cfg.progress_weight * min(progress_delta_m, max_progress_m)
    r -= cfg.lateral_weight * min((lateral / cfg.lane_half_width) ** 2, 4.0)
    return float(r - cfg.penalty(termination))


class TerminationRule:
    """Decides when an episode ends and why (one of ``TERMINATIONS``).

    ``route_done``, ``collision``, ``off_route`` and ``stuck`` (slower than ``stuck_speed`` for
    ``stuck_steps`` in a row: the leaderboard's "agent blocked", which ends the route as a failure)
    terminate; only ``timeout`` (``max_steps``) truncates and bootstraps. ``stuck`` used to
    truncate, which made parking a safe harbour for an online learner (see :data:`REWARD_VERSION`).
    """

    def __init__(self, max_steps: int, stuck_steps: int = 50, stuck_speed: float = 0.1):
        self.max_steps, self.stuck_steps, self.stuck_speed = max_steps, stuck_steps, stuck_speed
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._slow = 0

    def __call__(self, completion: float, collision: bool, off_route: bool,
                 speed: float) -> tuple[bool, bool, str | None]:
        """Returns ``(terminated, truncated, reason)`` after one step."""
        self.steps += 1
        self._slow = self._slow + 1 if abs(speed) < self.stuck_speed else 0
        if collision:
            return True, False, "collision"
        if off_route:
            return True, False, "off_route"
        if completion >= 1.0:
            return True, False, "route_done"
        if self._slow >= self.stuck_steps:
            return True, False, "stuck"
        if self.steps >= self.max_steps:
            return False, True, "timeout"
        return False, False, None
