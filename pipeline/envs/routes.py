"""Named routes, loaded from the JSON files in ``envs/routes/`` (one file per route).

A route is data: which backend drives it, the scenario (embedded) or town (CARLA), start and goal
or waypoints, the evaluation seeds, traffic, the step limit and a cruise speed for the expert.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from pipeline.errors import UnknownRouteError

BACKENDS = ("embedded", "carla")


@dataclass(frozen=True)
class Route:
    name: str
    backend: str  # "embedded" | "carla"
    description: str = ""
    length_m: float = 0.0  # approximate route length, for listings and per-km figures
    max_steps: int = 500  # step limit (0.2 s per embedded step, 0.05 s per CARLA tick)
    target_speed: float = 10.0  # m/s, the scripted expert's cruise speed
    traffic: int = 0  # default number of other vehicles
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # evaluation seeds
    scenario: str = ""  # embedded: highway-env env id
    town: str = ""  # carla: map name, e.g. "Town03"
    start: tuple[float, ...] = ()  # carla: (x, y, z, yaw_deg) in map coordinates
    goal: tuple[float, ...] = ()  # carla: (x, y) in map coordinates
    waypoints: tuple[tuple[float, float], ...] = ()  # carla: optional via points
    weather: str = ""  # carla: WeatherParameters preset name
    extra: dict = field(default_factory=dict, hash=False, compare=False)  # anything else in the file

    @classmethod
    def from_dict(cls, d: dict) -> "Route":
        known = set(cls.__dataclass_fields__) - {"extra"}
        kw = {k: v for k, v in d.items() if k in known}
        for k in ("seeds", "start", "goal"):
            if k in kw:
                kw[k] = tuple(kw[k])
        if "waypoints" in kw:
            kw["waypoints"] = tuple(tuple(p) for p in kw["waypoints"])
        return cls(**kw, extra={k: v for k, v in d.items() if k not in known})


@lru_cache(maxsize=1)
def _load_routes() -> dict[str, Route]:
    routes = {}
    for entry in sorted(resources.files("pipeline.envs").joinpath("routes").iterdir(),
                        key=lambda p: p.name):
        if entry.name.endswith(".json"):
            route = Route.from_dict(json.loads(entry.read_text()))
            routes[route.name] = route
    return routes


def list_routes(backend: str | None = None) -> list[Route]:
    return [r for r in _load_routes().values() if backend is None or r.backend == backend]


def get_route(name: str) -> Route:
    """The route called ``name``: a named route, or one route of a Leaderboard file (``FILE.xml#ID``,
    or ``FILE.xml`` when the file holds a single route)."""
    from pipeline.envs import route_files

    if route_files.is_route_file(name):
        found = route_files.routes_in(name)
        if len(found) > 1:
            raise UnknownRouteError(f"{name} holds {len(found)} routes; name one as {name}#ID "
                                    f"({', '.join(r.name for r in found[:3])}, ...)")
        return found[0]
    routes = _load_routes()
    if name not in routes:
        by_backend = "; ".join(
            f"{b}: {', '.join(r.name for r in list_routes(b)) or '-'}" for b in BACKENDS
        )
        raise UnknownRouteError(f"unknown route {name!r}; known routes ({by_backend})")
    return routes[name]


def resolve_routes(spec: str) -> list[Route]:
    """What ``--route SPEC`` drives: a named route, every route of ``FILE.xml``, or ``FILE.xml#ID``."""
    from pipeline.envs import route_files

    return route_files.routes_in(spec) if route_files.is_route_file(spec) else [get_route(spec)]
