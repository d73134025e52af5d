"""Driving metrics of one evaluation episode, and their summary over many.

Scoring follows the CARLA Leaderboard 1.0 conventions, pinned here:

- **Route completion** ``RC``: percent (0-100) of the route's length driven along it. On the
  embedded backend that is ``100 * info["route_completion"]`` at the last step.
- **Infraction penalty** ``P``: a product with one factor per infraction event,

  ==========================  =======
  collision with a pedestrian  0.50
  collision with a vehicle     0.60
  collision with static layout 0.65
  red light run                0.70
  stop sign run                0.80
  ==========================  =======

  and, for driving outside the route's lanes, the factor ``(1 - off-route share)``, where the
  off-route share is the fraction of steps with ``info["off_route"]`` set or the ego's centre more
  than :data:`LANE_HALF_WIDTH_M` from the route's centre line (``|lateral offset|``, the second
  field of ``info["state_vector"]``). The leaderboard measures that share by distance; we count
  steps, which is the same at constant speed and needs no extra geometry.
- **Driving score**: ``DS = RC * P`` per episode (0-100); a summary averages ``DS`` over episodes
  (the leaderboard averages per-route scores, it does not multiply averages).
- **Route ends early** when the agent deviates from the route (the env's ``off_route``
  termination: 7.5 m on the embedded backend, 30 m in CARLA) or is blocked (``stuck``: slower than
  0.1 m/s for a set number of steps). Those episodes keep the completion reached so far; each
  deviation also counts as one ``off_route_events`` infraction.
- **Per km**: every infraction count divided by the kilometres driven along the route
  (``info["progress_m"]``), floored at 1 m (0.001 km) as the leaderboard does, so an agent that
  never moves does not divide by zero. A summary divides total counts by total kilometres.
  ``infractions_per_km`` counts collisions, red lights, stop signs and route deviations.

Events are counted on rising edges: a flag that stays set for several steps (a CARLA collision
sensor often reports one crash over a few ticks) is one event.

Backend mapping: the embedded highway-env racetrack has no pedestrians, traffic lights or static
obstacles, so its ``collision`` is a vehicle collision and its red-light / stop-sign counts are 0.
The CARLA backend reports per step ``info["collision_kind"]`` ("pedestrian", "vehicle" or
"static"; default "vehicle"), and ``info["red_light"]`` / ``info["stop_sign"]`` (bools, True on the
tick of the infraction, judged by the Leaderboard 1.0 rules in :mod:`pipeline.envs.carla_infractions`).

Over several routes, :func:`leaderboard_summary` gives the Leaderboard's global figures: the mean
over routes of driving score, route completion and infraction penalty, and infractions per km by
the Leaderboard's kinds (:data:`LEADERBOARD_INFRACTIONS`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.envs.spec import VECTOR_FIELDS

#: Leaderboard 1.0 penalty factor per infraction event, keyed by the :class:`EpisodeMetrics` count.
PENALTY: dict[str, float] = {
    "collisions_pedestrian": 0.50,
    "collisions_vehicle": 0.60,
    "collisions_static": 0.65,
    "red_lights": 0.70,
    "stop_signs": 0.80,
}
COLLISION_KINDS: tuple[str, ...] = ("pedestrian", "vehicle", "static")
#: Infraction counts that enter ``infractions_per_km``.
INFRACTION_COUNTS: tuple[str, ...] = tuple(PENALTY) + ("off_route_events",)
#: Half a lane: the embedded racetrack's lanes are 5 m wide. Beyond it the ego's centre is over the
#: lane marking, i.e. outside the route's lane.
LANE_HALF_WIDTH_M = 2.5
#: Where the lateral offset (m) and heading error (rad) from the route sit in ``info["state_vector"]``.
LATERAL_INDEX, HEADING_INDEX = VECTOR_FIELDS.index("lateral_offset"), VECTOR_FIELDS.index("heading_error")
MIN_KM = 0.001


@dataclass
class EpisodeMetrics:
    """Raw counts of one episode; the scores are derived properties (see the module docstring)."""

    route: str
    seed: int
    length: int = 0  # steps
    episode_return: float = 0.0
    termination: str = ""  # one of envs.spec.TERMINATIONS
    route_completion: float = 0.0  # percent, 0-100
    distance_m: float = 0.0  # driven along the route
    mean_speed: float = 0.0  # m/s over the episode's steps
    collisions_pedestrian: int = 0
    collisions_vehicle: int = 0
    collisions_static: int = 0
    red_lights: int = 0
    stop_signs: int = 0
    off_route_events: int = 0
    off_route_share: float = 0.0  # fraction of steps outside the route's lanes, 0-1

    @property
    def collisions(self) -> int:
        return self.collisions_pedestrian + self.collisions_vehicle + self.collisions_static

    @property
    def infractions(self) -> int:
        return sum(getattr(self, name) for name in INFRACTION_COUNTS)

    @property
    def infraction_penalty(self) -> float:
        penalty = float(np.prod([factor ** getattr(self, name) for name, factor in PENALTY.items()]))
        return penalty * (1.0 - float(np.clip(self.off_route_share, 0.0, 1.0)))

    @property
    def driving_score(self) -> float:
        return self.route_completion * self.infraction_penalty

    @property
    def km(self) -> float:
        return max(self.distance_m / 1000.0, MIN_KM)

    @property
    def infractions_per_km(self) -> float:
        return self.infractions / self.km

    def to_dict(self) -> dict:
        """Counts and derived scores as one flat JSON/CSV-ready row."""
        return {
            **asdict(self),
            "collisions": self.collisions,
            "infractions": self.infractions,
            "infraction_penalty": self.infraction_penalty,
            "driving_score": self.driving_score,
            "infractions_per_km": self.infractions_per_km,
        }


class EpisodeTracker:
    """Builds :class:`EpisodeMetrics` from the ``info`` dicts an env returns.

    >>> tracker = EpisodeTracker("racetrack", seed=0)
    >>> obs, info = env.reset(seed=0); tracker.reset(info)
    >>> obs, reward, terminated, truncated, info = env.step(action); tracker.step(reward, info)
    >>> metrics = tracker.finish()
    """

    def __init__(self, route: str, seed: int, lane_half_width: float = LANE_HALF_WIDTH_M):
        self.route, self.seed, self.lane_half_width = route, int(seed), lane_half_width
        self.reset({})

    def reset(self, info: dict) -> None:
        self._start_m = float(info.get("progress_m", 0.0))
        self._steps = 0
        self._return = 0.0
        self._speed_sum = 0.0
        self._off_steps = 0
        self._counts: Counter[str] = Counter()
        self._flags: dict[str, bool] = {}
        self._last: dict = dict(info)

    def _rising(self, name: str, value) -> bool:
        was, now = self._flags.get(name, False), bool(value)
        self._flags[name] = now
        return now and not was

    def step(self, reward: float, info: dict) -> None:
        self._steps += 1
        self._return += float(reward)
        self._speed_sum += float(info.get("speed", 0.0))
        if self._rising("collision", info.get("collision", False)):
            kind = info.get("collision_kind") or "vehicle"
            if kind not in COLLISION_KINDS:
                raise ValueError(f"unknown collision kind {kind!r}; expected one of {COLLISION_KINDS}")
            self._counts[f"collisions_{kind}"] += 1
        if self._rising("red_light", info.get("red_light", False)):
            self._counts["red_lights"] += 1
        if self._rising("stop_sign", info.get("stop_sign", False)):
            self._counts["stop_signs"] += 1
        off_route = bool(info.get("off_route", False))
        if self._rising("off_route", off_route):
            self._counts["off_route_events"] += 1
        state = info.get("state_vector")
        lateral = abs(float(state[LATERAL_INDEX])) if state is not None else 0.0
        if off_route or lateral > self.lane_half_width:
            self._off_steps += 1
        self._last = info

    def finish(self) -> EpisodeMetrics:
        last, steps = self._last, self._steps
        return EpisodeMetrics(
            route=self.route,
            seed=self.seed,
            length=steps,
            episode_return=self._return,
            termination=str(last.get("termination") or ""),
            route_completion=100.0 * float(last.get("route_completion", 0.0)),
            distance_m=max(float(last.get("progress_m", self._start_m)) - self._start_m, 0.0),
            mean_speed=self._speed_sum / steps if steps else 0.0,
            off_route_share=self._off_steps / steps if steps else 0.0,
            **{name: self._counts[name] for name in INFRACTION_COUNTS},
        )


def summarize(episodes: list[EpisodeMetrics]) -> dict:
    """Summary of ``episodes`` (one route or several): means (and stds) of the per-episode scores,
    total infraction counts, per-km rates over the total distance, and the termination counts."""
    if not episodes:
        raise ValueError("summarize() needs at least one episode")

    def column(name):
        return np.array([getattr(e, name) for e in episodes], dtype=np.float64)

    km = max(sum(e.distance_m for e in episodes) / 1000.0, MIN_KM)
    out = {"episodes": len(episodes)}
    for name in ("route_completion", "driving_score", "infraction_penalty", "episode_return", "length",
                 "mean_speed", "off_route_share"):
        values = column(name)
        out[name] = float(values.mean())
        out[f"{name}_std"] = float(values.std())
    totals = {name: int(column(name).sum()) for name in ("collisions",) + INFRACTION_COUNTS}
    out.update(totals)
    out["distance_km"] = sum(e.distance_m for e in episodes) / 1000.0
    out["infractions_per_km"] = sum(totals[name] for name in INFRACTION_COUNTS) / km
    out.update({f"{name}_per_km": count / km for name, count in totals.items()})
    out["terminations"] = dict(sorted(Counter(e.termination for e in episodes).items()))
    return out


#: The Leaderboard's infraction kinds (its result files' names) -> how we count them: an
#: :class:`EpisodeMetrics` count, or an episode ending (``termination``) that the leaderboard
#: records as an infraction.
LEADERBOARD_INFRACTIONS: dict[str, str] = {
    "collisions_pedestrian": "collisions_pedestrian",
    "collisions_vehicle": "collisions_vehicle",
    "collisions_layout": "collisions_static",
    "red_light": "red_lights",
    "stop_infraction": "stop_signs",
    "route_dev": "off_route_events",
    "vehicle_blocked": "termination:stuck",
    "route_timeout": "termination:timeout",
}


def _count(episode: EpisodeMetrics, how: str) -> int:
    if how.startswith("termination:"):
        return int(episode.termination == how.split(":", 1)[1])
    return int(getattr(episode, how))


def leaderboard_summary(by_route: dict[str, list[EpisodeMetrics]]) -> dict:
    """The Leaderboard's global figures over several routes: driving score, route completion and
    infraction penalty are the mean over routes of each route's mean over its episodes (so a route
    with more repetitions does not weigh more); infractions per km, by kind, are total counts over
    the total kilometres driven, km floored at :data:`MIN_KM`."""
    if not by_route or not all(by_route.values()):
        raise ValueError("leaderboard_summary() needs at least one episode per route")
    episodes = [e for es in by_route.values() for e in es]

    def route_mean(name: str) -> float:
        return float(np.mean([np.mean([getattr(e, name) for e in es]) for es in by_route.values()]))

    km = max(sum(e.distance_m for e in episodes) / 1000.0, MIN_KM)
    counts = {kind: sum(_count(e, how) for e in episodes) for kind, how in LEADERBOARD_INFRACTIONS.items()}
    return {
        "routes": len(by_route),
        "episodes": len(episodes),
        "driving_score": route_mean("driving_score"),
        "route_completion": route_mean("route_completion"),
        "infraction_penalty": route_mean("infraction_penalty"),
        "distance_km": sum(e.distance_m for e in episodes) / 1000.0,
        "infractions": counts,
        "infractions_per_km": {kind: count / km for kind, count in counts.items()},
    }
