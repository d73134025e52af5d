"""A global route planner over ``carla.Map.get_topology()``: dense waypoints from start to goal.

The ``carla`` wheel ships no ``agents`` package, so this is our own, in the spirit of CARLA's
``GlobalRoutePlanner``. The graph's nodes are lanes (one lane of one lane section of one road,
keyed ``(road_id, section_id, lane_id)``), always entered at their start. Edges:

- follow: lane -> each successor lane (through junctions too), weight = the lane's length;
- change: lane -> each successor of a same-direction neighbour lane that the road markings let us
  change into, weight = the lane's length + ``lane_change_cost_m`` per lane crossed. The polyline
  drives the first part of the lane, crosses over diagonally and ends on the neighbour.

Start and goal snap to the nearest driving lane and join the graph as two extra nodes, so a goal
behind the start on the same lane is reached by going around the block. Coordinates are CARLA map
coordinates (left-handed: x forward on the map, y to the right), metres.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import carla
import networkx as nx
import numpy as np

from pipeline.envs.driving import resample_polyline
from pipeline.errors import PipelineError

LaneKey = tuple[int, int, int]


class UnplannableRouteError(PipelineError):
    """No route through the given points; ``index`` is the point that could not be reached."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index

    def __reduce__(self):  # errors cross to the dask driver; the default would drop ``index``
        return type(self), (self.index, str(self))

_START, _GOAL = "start", "goal"


def lane_key(waypoint) -> LaneKey:
    return (waypoint.road_id, waypoint.section_id, waypoint.lane_id)


@dataclass
class _Lane:
    key: LaneKey
    middle: object  # carla.Waypoint halfway along: its markings decide lane changes
    points: np.ndarray  # (M, 3) float64 lane centre from start to end, about `resolution` apart
    length: float
    in_junction: bool

    def index_of(self, location) -> int:
        """Index of the lane point nearest to ``location`` (x, y)."""
        d = np.hypot(self.points[:, 0] - location[0], self.points[:, 1] - location[1])
        return int(np.argmin(d))


def _trace(start, resolution: float) -> list:
    """Waypoints from ``start`` to the end of its lane, ``resolution`` apart.

    (``Waypoint.next_until_lane_end`` fails on dead-end lanes, hence our own walk.)"""
    key, wps = lane_key(start), [start]
    while True:
        ahead = [w for w in wps[-1].next(resolution) if lane_key(w) == key]
        if not ahead or ahead[0].s == wps[-1].s:
            return wps
        wps.append(ahead[0])


def _xyz(waypoints) -> np.ndarray:
    return np.array([[w.transform.location.x, w.transform.location.y, w.transform.location.z]
                     for w in waypoints], dtype=np.float64)


def _heading_deg(waypoint) -> float:
    return waypoint.transform.rotation.yaw


def _angle_between_deg(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


class RoutePlanner:
    """Plans routes on one ``carla.Map``. Build once per map (it traces every lane).

    ``resolution``: spacing of the returned waypoints in metres. ``lane_change_cost_m``: extra
    cost of crossing one lane, so routes change lanes only when it saves that much driving.
    """

    def __init__(self, carla_map, resolution: float = 1.0, lane_change_cost_m: float = 30.0,
                 lane_change_length_m: float = 12.0):
        self.map, self.resolution = carla_map, resolution
        self.lane_change_cost_m, self.lane_change_length_m = lane_change_cost_m, lane_change_length_m
        starts: dict[LaneKey, object] = {}
        successors: dict[LaneKey, set[LaneKey]] = {}
        for entry, exit_ in carla_map.get_topology():
            # each pair is (start of a lane, start of a lane that follows it); a dead-end lane is
            # listed with its own end, and some dead-end lanes only ever appear as an exit
            k_in, k_out = lane_key(entry), lane_key(exit_)
            starts.setdefault(k_in, entry)
            starts.setdefault(k_out, exit_)
            successors.setdefault(k_in, set())
            successors.setdefault(k_out, set())
            if k_out != k_in:
                successors[k_in].add(k_out)
        self.lanes: dict[LaneKey, _Lane] = {}
        for key, wp in starts.items():
            wps = _trace(wp, min(resolution, 2.0))
            pts = _xyz(wps)
            length = float(np.linalg.norm(np.diff(pts[:, :2], axis=0), axis=1).sum())
            self.lanes[key] = _Lane(key, wps[len(wps) // 2], pts, length, bool(wp.is_junction))
        self.successors = successors
        self.chains = {key: self._change_chains(key) for key in self.lanes}
        self.graph = nx.DiGraph()
        self.graph.add_nodes_from(self.lanes)
        for key, lane in self.lanes.items():
            for chain in [()] + self.chains[key]:
                last = chain[-1] if chain else key
                for nxt in successors.get(last, ()):
                    self._add_edge(key, nxt, lane.length + self.lane_change_cost_m * len(chain), chain)

    # -- graph construction ----------------------------------------------------------------
    def _add_edge(self, u, v, weight: float, chain: tuple) -> None:
        if not self.graph.has_edge(u, v) or self.graph[u][v]["weight"] > weight:
            self.graph.add_edge(u, v, weight=weight, chain=chain)

    def _change_chains(self, key: LaneKey) -> list[tuple[LaneKey, ...]]:
        """Sequences of same-direction lanes reachable by changing lanes left (or right) from ``key``."""
        lane = self.lanes[key]
        if lane.in_junction or len(lane.points) < 3:
            return []
        chains = []
        for side, allowed in (("left", carla.LaneChange.Left), ("right", carla.LaneChange.Right)):
            chain, wp = (), lane.middle
            while wp is not None and wp.lane_change in (allowed, carla.LaneChange.Both):
                wp = wp.get_left_lane() if side == "left" else wp.get_right_lane()
                if (wp is None or wp.lane_type != carla.LaneType.Driving
                        or np.sign(wp.lane_id) != np.sign(key[2]) or lane_key(wp) not in self.lanes):
                    break
                chain = chain + (lane_key(wp),)
                chains.append(chain)
        return chains

    # -- planning --------------------------------------------------------------------------
    def snap(self, location, yaw_deg: float | None = None):
        """The driving-lane waypoint nearest ``location`` (x, y[, z]); with ``yaw_deg``, the lane
        whose direction agrees with it (the nearest lane may run the other way)."""
        loc = carla.Location(*(float(v) for v in location))
        wp = self.map.get_waypoint(loc, project_to_road=True, lane_type=carla.LaneType.Driving)
        if wp is None:
            raise PipelineError(f"no drivable lane near ({loc.x:.1f}, {loc.y:.1f}) on map {self.map.name}")
        if yaw_deg is not None and _angle_between_deg(_heading_deg(wp), yaw_deg) > 90.0:
            for other in (wp.get_left_lane(), wp.get_right_lane()):
                if (other is not None and other.lane_type == carla.LaneType.Driving
                        and _angle_between_deg(_heading_deg(other), yaw_deg) <= 90.0):
                    return other
        return wp

    def plan(self, start, goal, via=(), start_yaw_deg: float | None = None) -> np.ndarray:
        """Dense route ``(N, 3)`` float64 (x, y, z), ``resolution`` apart, from ``start`` through
        each ``via`` point to ``goal``; points are (x, y[, z]) in map coordinates."""
        return self.plan_through([start, *via, goal], start_yaw_deg)

    def plan_through(self, points, start_yaw_deg: float | None = None) -> np.ndarray:
        """Like :meth:`plan`, through ``points`` in order (the first is the start). A point with no
        lane near it, or a leg with no drivable path, raises :class:`UnplannableRouteError` naming
        that point by its index."""
        stops = []
        for index, point in enumerate(points):
            try:
                stops.append(self.snap(point, start_yaw_deg if index == 0 else None))
            except PipelineError as exc:
                raise UnplannableRouteError(index, f"waypoint {index}: {exc}") from None
        legs = []
        for index, (a, b) in enumerate(zip(stops, stops[1:])):
            try:
                legs.append(self._leg(a, b))
            except PipelineError as exc:
                raise UnplannableRouteError(
                    index + 1, f"waypoint {index + 1} cannot be reached from waypoint {index}: {exc}") from None
        return resample_polyline(np.concatenate(legs, axis=0), self.resolution)

    def _leg(self, a, b) -> np.ndarray:
        ka, kb = lane_key(a), lane_key(b)
        for key, wp in ((ka, a), (kb, b)):
            if key not in self.lanes:
                raise PipelineError(
                    f"the lane at ({wp.transform.location.x:.1f}, {wp.transform.location.y:.1f}) on "
                    f"map {self.map.name} is not in the road topology (a dead end?); pick another point")
        ia = self.lanes[ka].index_of((a.transform.location.x, a.transform.location.y))
        ib = self.lanes[kb].index_of((b.transform.location.x, b.transform.location.y))
        graph = self.graph
        try:
            self._add_endpoints(ka, ia, kb, ib)
            try:
                nodes = nx.shortest_path(graph, _START, _GOAL, weight="weight")
            except (nx.NetworkXNoPath, nx.NodeNotFound):  # NodeNotFound: a dead-end start lane adds no edges
                loc_a, loc_b = a.transform.location, b.transform.location
                raise PipelineError(
                    f"no drivable route from ({loc_a.x:.1f}, {loc_a.y:.1f}) to ({loc_b.x:.1f}, {loc_b.y:.1f}) "
                    f"on map {self.map.name}") from None
            return self._polyline(nodes, ka, ia, kb, ib)
        finally:
            graph.remove_nodes_from([_START, _GOAL])

    def _fraction(self, key: LaneKey, index: int) -> float:
        return index / max(len(self.lanes[key].points) - 1, 1)

    def _add_endpoints(self, ka: LaneKey, ia: int, kb: LaneKey, ib: int) -> None:
        """Join the start (lane ``ka`` at point ``ia``) and goal (``kb`` at ``ib``) to the graph."""
        g, step = self.graph, self.resolution
        lane_a = self.lanes[ka]
        remaining = lane_a.length * (1.0 - self._fraction(ka, ia))
        for chain in [()] + self.chains[ka]:
            last = chain[-1] if chain else ka
            for nxt in self.successors.get(last, ()):
                w = remaining + self.lane_change_cost_m * len(chain)
                if not g.has_edge(_START, nxt) or g[_START][nxt]["weight"] > w:
                    g.add_edge(_START, nxt, weight=w, chain=chain)
            # the goal further along this lane (or a neighbour), no junction in between
            ahead = self._fraction(kb, ib) - self._fraction(ka, ia)
            if last == kb and ahead > step / max(lane_a.length, step):
                w = lane_a.length * ahead + self.lane_change_cost_m * len(chain)
                if not g.has_edge(_START, _GOAL) or g[_START][_GOAL]["weight"] > w:
                    g.add_edge(_START, _GOAL, weight=w, chain=chain)
        # reach the goal lane from its own start, or from a neighbour by changing lanes
        g.add_edge(kb, _GOAL, weight=self.lanes[kb].length * self._fraction(kb, ib), chain=())
        for key in self.lanes:
            for chain in self.chains[key]:
                if chain[-1] == kb:
                    w = self.lanes[key].length * self._fraction(kb, ib) + self.lane_change_cost_m * len(chain)
                    if not g.has_edge(key, _GOAL) or g[key][_GOAL]["weight"] > w:
                        g.add_edge(key, _GOAL, weight=w, chain=chain)

    def _polyline(self, nodes: list, ka: LaneKey, ia: int, kb: LaneKey, ib: int) -> np.ndarray:
        """Lane points along the node sequence ``start, lane, ..., goal``."""
        parts, key, frac = [], ka, self._fraction(ka, ia)
        for u, v in zip(nodes, nodes[1:]):
            chain = self.graph[u][v]["chain"]
            end_frac = self._fraction(kb, ib) if v == _GOAL else 1.0
            parts.append(self._drive(key, frac, end_frac, chain))
            key, frac = v, 0.0
        return np.concatenate(parts, axis=0)

    def _drive(self, key: LaneKey, f0: float, f1: float, chain: tuple) -> np.ndarray:
        """Points of lane ``key`` between fractions ``f0`` and ``f1`` of its length, crossing into
        each lane of ``chain`` in turn at evenly spaced places, each crossing a straight diagonal."""
        lanes = [key, *chain]
        cuts = np.linspace(f0, f1, len(lanes) + 1)
        half_gap = 0.5 * self.lane_change_length_m / max(self.lanes[key].length, 1e-6)
        out, last = [], len(lanes) - 1
        for i, k in enumerate(lanes):
            lo = cuts[i] + (half_gap if i > 0 else 0.0)
            hi = cuts[i + 1] - (half_gap if i < last else 0.0)
            pts = self.lanes[k].points
            n = len(pts) - 1
            i0 = min(max(int(math.floor(lo * n + 1e-9)), 0), n)
            i1 = min(max(int(math.ceil(hi * n - 1e-9)), 0), n)
            # the first lane keeps at least its starting point and the last its end point
            if i == 0:
                i1 = max(i1, i0)
            if i == last:
                i0 = min(i0, i1)
            out.append(pts[i0:i1 + 1])  # empty when a lane is too short to hold its share
        return np.concatenate(out, axis=0)
