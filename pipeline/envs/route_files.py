"""CARLA Leaderboard route files (XML), parsed into :class:`FileRoute` records (``envs/routes.py``
turns them into the :class:`~pipeline.envs.routes.Route` objects every stage drives).

Two formats, told apart by what a ``<route>`` holds:

- Leaderboard 1.0: ``<routes><route id town><waypoint x y z pitch roll yaw/>...</route></routes>``,
  optionally with one ``<weather cloudiness=... .../>`` per route;
- Leaderboard 2.x: ``<routes><route id town><weathers><weather route_percentage ... />...</weathers>
  <waypoints><position x y z/>...</waypoints><scenarios>...</scenarios></route></routes>`` (a file
  holding a single ``<route>`` as its root parses too).

Coordinates stay in CARLA's map frame exactly as the file gives them, like the JSON routes; the
CARLA env mirrors them into its right-handed frame where it always does. The first waypoint is
the start (with its yaw in 1.0 files, which picks the lane direction), the last the goal, and every
one in between a via point the planner goes through in order.

A route from a file is named ``FILE.xml#ID`` (the path as the user gave it), so datasets, reports
and dask tasks carry it as a plain string and any process can read it back from the file.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache

from pipeline.errors import PipelineError

SUFFIX = ".xml"
#: Leaderboard 1.0 route timeout: 8 s to start plus 0.4 s per metre (2.5 m/s), in 0.05 s ticks.
TIMEOUT_START_S, TIMEOUT_S_PER_M, TICK_S = 8.0, 0.4, 0.05
TARGET_SPEED_MS = 8.0  # the scripted expert's cruise speed on file routes, as on the named towns
#: attributes of a <weather> element that are not carla.WeatherParameters fields
_NOT_WEATHER = ("route_percentage", "id")


class RouteFileError(PipelineError):
    """A Leaderboard route file that cannot be read or has no usable routes."""


@dataclass(frozen=True)
class FileRoute:
    """One ``<route>`` of a file, as the file gives it."""

    id: str
    town: str
    waypoints: tuple[tuple[float, ...], ...]  # (x, y, z) or (x, y, z, yaw_deg), CARLA map frame
    weather: dict  # carla.WeatherParameters field -> value; empty when the file has none
    scenarios: int  # <scenario> elements (ignored: pipeline drives the route only)
    format: str  # "1.0" | "2.x"

    @property
    def length_m(self) -> float:
        """Length of the straight segments between consecutive waypoints (x-y), metres."""
        return sum(math.dist(a[:2], b[:2]) for a, b in zip(self.waypoints, self.waypoints[1:]))


def is_route_file(spec: str) -> bool:
    """``FILE.xml`` or ``FILE.xml#ID``."""
    return split_spec(spec)[0].lower().endswith(SUFFIX)


def split_spec(spec: str) -> tuple[str, str | None]:
    """``"a.xml#3"`` -> ``("a.xml", "3")``; ``"a.xml"`` -> ``("a.xml", None)``."""
    path, sep, route_id = spec.partition("#")
    return path, (route_id if sep else None)


def route_name(path: str, route_id: str) -> str:
    return f"{path}#{route_id}"


def read_route_file(path: str) -> list[FileRoute]:
    """Every route of the Leaderboard file at ``path``, in file order (cached until the file changes)."""
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise RouteFileError(f"cannot read route file {path}: {exc.strerror or exc}") from None
    return _parse_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size, path)


@lru_cache(maxsize=32)
def _parse_cached(abspath: str, mtime_ns: int, size: int, shown: str) -> list[FileRoute]:
    try:
        root = ET.parse(abspath).getroot()
    except ET.ParseError as exc:
        raise RouteFileError(f"route file {shown} is not valid XML: {exc}") from None
    except OSError as exc:
        raise RouteFileError(f"cannot read route file {shown}: {exc.strerror or exc}") from None
    elements = [root] if root.tag == "route" else root.findall("route")
    if root.tag not in ("route", "routes") or not elements:
        raise RouteFileError(f"{shown} is not a Leaderboard route file: expected <routes><route ...> "
                             f"elements, found <{root.tag}>")
    routes = [_parse_route(element, shown) for element in elements]
    ids = [r.id for r in routes]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    if duplicated:
        raise RouteFileError(f"route file {shown} has more than one route with id {', '.join(duplicated)}")
    return routes


def _parse_route(element: ET.Element, shown: str) -> FileRoute:
    route_id, town = element.get("id"), element.get("town")
    if not route_id or not town:
        raise RouteFileError(f"route file {shown}: every <route> needs id and town attributes")
    where = f"route file {shown}, route {route_id}"
    if element.find("waypoints") is not None:  # Leaderboard 2.x
        points = [_point(p, ("x", "y", "z"), where) for p in element.find("waypoints").findall("position")]
        weathers = element.find("weathers")
        weather_elements = weathers.findall("weather") if weathers is not None else []
        fmt = "2.x"
    else:  # Leaderboard 1.0
        points = [_point(w, ("x", "y", "z", "yaw"), where) for w in element.findall("waypoint")]
        weather_elements = element.findall("weather")
        fmt = "1.0"
    if len(points) < 2:
        raise RouteFileError(f"{where}: needs at least two waypoints, found {len(points)}")
    return FileRoute(id=route_id, town=town, waypoints=tuple(points), weather=_weather(weather_elements, where),
                     scenarios=len(list(element.iter("scenario"))), format=fmt)


def _number(element: ET.Element, key: str, where: str) -> float:
    text = element.get(key)
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise RouteFileError(f"{where}: <{element.tag}> {key}={text!r} is not a number") from None
    if not math.isfinite(value):
        raise RouteFileError(f"{where}: <{element.tag}> {key}={text!r} is not a finite number")
    return value


def _point(element: ET.Element, keys: tuple[str, ...], where: str) -> tuple[float, ...]:
    """x, y, z (0 when missing), then yaw where the format has one and the element gives it: a
    guessed yaw could turn the start onto the opposite lane."""
    x, y = _number(element, "x", where), _number(element, "y", where)
    z = _number(element, "z", where) if element.get("z") is not None else 0.0
    has_yaw = "yaw" in keys and element.get("yaw") is not None
    return (x, y, z, _number(element, "yaw", where)) if has_yaw else (x, y, z)


def _weather(elements: list[ET.Element], where: str) -> dict:
    """The route's weather as ``carla.WeatherParameters`` fields. A 2.x route may give several
    weathers along the route (``route_percentage``); the env applies the first (the start's)."""
    if not elements:
        return {}
    first = min(elements, key=lambda e: _number(e, "route_percentage", where) if e.get("route_percentage") else 0.0)
    return {key: _number(first, key, where) for key in first.attrib if key not in _NOT_WEATHER}


# -- what the command line says about a file ----------------------------------------------------
def scenario_note(spec: str) -> str | None:
    """One line saying that a file's scenarios are not run, or None when it has none."""
    path, route_id = split_spec(spec)
    chosen = [r for r in read_route_file(path) if route_id is None or r.id == route_id]
    count = sum(r.scenarios for r in chosen)
    if not count:
        return None
    return (f"note: {path}: {count} Leaderboard scenario(s) ignored; pipeline drives the routes' "
            f"waypoints, weather and --traffic only")


# -- `pipeline routes --file FILE.xml [--xodr MAP.xodr]` -----------------------------------------
def describe_route_file(path: str, xodr: str | None = None) -> dict:
    """Each route of ``path``: id, town, format, waypoint count, length along the waypoints and
    scenario count. With ``xodr`` (an OpenDRIVE file; no server needed) every route of that town is
    also planned offline, adding ``planned_m``, or ``unplannable`` (one line naming the waypoint) and
    ``unplannable_waypoint``."""
    file_routes = read_route_file(path)
    planner, town = _offline_planner(xodr) if xodr else (None, None)
    rows = []
    for r in file_routes:
        row = {"id": r.id, "town": r.town, "format": r.format, "waypoints": len(r.waypoints),
               "length_m": round(r.length_m, 1), "scenarios": r.scenarios, "weather": bool(r.weather)}
        if planner is not None and r.town.lower() == town.lower():
            row.update(_plan_offline(planner, r))
        rows.append(row)
    return {"file": path, "xodr": xodr, "xodr_town": town, "routes": rows}


def _offline_planner(xodr: str):
    """A route planner on the ``carla.Map`` built from the OpenDRIVE file (named after the file: a
    CARLA town's OpenDRIVE file is ``TownNN.xodr``), and that town's name."""
    import carla

    from pipeline.envs.carla_planner import RoutePlanner

    town = os.path.splitext(os.path.basename(xodr))[0]
    try:
        with open(xodr, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise RouteFileError(f"cannot read OpenDRIVE file {xodr}: {getattr(exc, 'strerror', None) or exc}") from None
    # checked here first: CARLA's own parser prints to stderr before it fails
    try:
        is_opendrive = ET.fromstring(text).tag == "OpenDRIVE"
    except ET.ParseError:
        is_opendrive = False
    if not is_opendrive:
        raise RouteFileError(f"{xodr} is not an OpenDRIVE map (no <OpenDRIVE> XML document)")
    try:
        carla_map = carla.Map(town, text)
    except RuntimeError as exc:
        raise RouteFileError(f"{xodr} is not an OpenDRIVE map CARLA can load ({exc})") from None
    if not carla_map.get_topology():
        raise RouteFileError(f"{xodr} holds no drivable roads")
    return RoutePlanner(carla_map), town


def _plan_offline(planner, file_route: FileRoute) -> dict:
    from pipeline.envs.carla_planner import UnplannableRouteError

    first = file_route.waypoints[0]
    try:
        points = planner.plan_through([p[:3] for p in file_route.waypoints],
                                      start_yaw_deg=first[3] if len(first) > 3 else None)
    except UnplannableRouteError as exc:
        return {"planned_m": None, "unplannable": str(exc), "unplannable_waypoint": exc.index}
    steps = [math.dist(a[:2], b[:2]) for a, b in zip(points, points[1:])]
    return {"planned_m": round(sum(steps), 1)}


def route_file_lines(description: dict) -> list[str]:
    """The text listing of :func:`describe_route_file`: a header and one line per route."""
    planned = description["xodr"] is not None
    lines = [f"{'id':>6s}  {'town':12s} {'format':6s} {'waypoints':>9s} {'length m':>9s}"
             + (f" {'planned m':>9s}" if planned else "")]
    for row in description["routes"]:
        line = (f"{row['id']:>6s}  {row['town']:12s} {row['format']:6s} {row['waypoints']:9d} "
                f"{row['length_m']:9.1f}")
        if planned:
            if "unplannable" in row:
                line += f" {'-':>9s}  unplannable: {row['unplannable']}"
            elif "planned_m" in row:
                line += f" {row['planned_m']:9.1f}"
            else:
                line += f" {'-':>9s}  (not {description['xodr_town']})"
        lines.append(line)
    return lines
