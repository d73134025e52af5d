"""Named routes, loaded from the JSON files in ``envs/routes/`` (one file per route).

A route is data: which backend drives it, the scenario (embedded) or town (CARLA), start and goal
or waypoints, the evaluation seeds, traffic, the step limit and a cruise speed for the expert.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

from pipeline.envs import route_files
from pipeline.envs.route_files import FileRoute
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
    if route_files.is_route_file(name):
        found = _file_routes(name)
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
    return _file_routes(spec) if route_files.is_route_file(spec) else [get_route(spec)]


def _file_routes(spec: str) -> list[Route]:
    """``FILE.xml`` -> every route of the file; ``FILE.xml#ID`` -> that one."""
    path, route_id = route_files.split_spec(spec)
    file_routes = route_files.read_route_file(path)
    if route_id is None:
        return [_from_file(path, r) for r in file_routes]
    for r in file_routes:
        if r.id == route_id:
            return [_from_file(path, r)]
    raise UnknownRouteError(f"route file {path} has no route {route_id!r}; its routes: "
                            f"{', '.join(r.id for r in file_routes)}")


def _from_file(path: str, file_route: FileRoute) -> Route:
    """The route that drives ``file_route`` of the file at ``path``: CARLA, the Leaderboard 1.0
    timeout as its step limit, the first waypoint as start, the last as goal."""
    rf = route_files
    first, last = file_route.waypoints[0], file_route.waypoints[-1]
    length = file_route.length_m
    return Route(
        name=rf.route_name(path, file_route.id), backend="carla", town=file_route.town,
        description=f"Leaderboard {file_route.format} route {file_route.id} of {os.path.basename(path)}: "
                    f"{len(file_route.waypoints)} waypoints",
        length_m=length, max_steps=int(math.ceil((rf.TIMEOUT_START_S + rf.TIMEOUT_S_PER_M * length) / rf.TICK_S)),
        target_speed=rf.TARGET_SPEED_MS, traffic=0, start=first, goal=last[:2],
        waypoints=tuple(p[:2] for p in file_route.waypoints[1:-1]),
        extra={"weather_parameters": dict(file_route.weather), "source": path,
               "route_file_format": file_route.format},
    )
