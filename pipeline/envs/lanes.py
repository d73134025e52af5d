"""The racetrack's lanes, with highway-env's answers computed once or from fewer lanes.

:func:`lap_centre_line`: the points along one lap of a lane, which every reset rebuilt in Python.

:class:`NearestLaneIndex`: highway-env's nearest-lane query, with the same answers from fewer lanes
measured.

Every vehicle asks its road network for the lane nearest its position and heading at every
simulation step (three per env step): ``RoadNetwork.get_closest_lane_index`` measures
``distance_with_heading`` to every lane (18 on the racetrack, ~77 us a call), a third of an env
step. That distance is ``|lateral| + the longitudinal overshoot past either end + |heading error|``,
and is never less than the Euclidean distance from the position to the lane's centre line: inside
the lane's length the lateral offset is that distance, past an end the overshoot is at least the
chord to the end. So it is never less than the distance to a box around the centre line.
:class:`NearestLaneIndex` measures the lane whose box is nearest, then only the lanes whose box is
no farther than that lane's distance: the others cannot be nearer. Among equal distances the first
lane in the network's order wins, as in highway-env.
"""

from __future__ import annotations

import numpy as np
from highway_env.road.lane import CircularLane, StraightLane
from highway_env.road.road import RoadNetwork

#: Lanes whose box lies within this much (m) of the best distance are measured as well: rounding
#: in the box bound must not skip a lane that ties.
MARGIN_M = 1e-6
#: Points along each centre line from which its box is built.
BOX_SAMPLES = 64


def _geometry(lane) -> tuple:
    """What places a lane's centre line (its box depends on nothing else)."""
    if type(lane) is StraightLane:
        return ("straight", *lane.start, *lane.end)
    if type(lane) is CircularLane:
        return ("circular", *lane.center, lane.radius, lane.start_phase, lane.end_phase, lane.direction)
    raise TypeError(type(lane).__name__)


def _box(lane) -> tuple[np.ndarray, np.ndarray]:
    """Corners (lo, hi) of a box holding the lane's whole centre line."""
    s = np.linspace(0.0, lane.length, BOX_SAMPLES)
    points = np.array([lane.position(x, 0.0) for x in s])
    pad = 0.0
    if type(lane) is CircularLane:  # the arc bulges past the chord between two samples by its sagitta
        step = lane.length / lane.radius / (BOX_SAMPLES - 1)
        pad = lane.radius * (1.0 - np.cos(step / 2.0)) + 1e-9
    return points.min(axis=0) - pad, points.max(axis=0) + pad


class NearestLaneIndex:
    """``network.get_closest_lane_index(position, heading=None)`` with the same answers, measuring
    only the lanes that can be nearest. Install it on a network with :meth:`install`.

    ``indexes``: the network's lane indexes ``(from, to, id)`` in its own order; ``lo`` / ``hi``:
    float64 ``(L, 2)`` box corners of each lane's centre line."""

    _boxes: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}  # per track geometry, built once

    def __init__(self, network: RoadNetwork):
        self.indexes, self.lanes = [], []
        for _from, to_dict in network.graph.items():
            for _to, lanes in to_dict.items():
                for _id, lane in enumerate(lanes):
                    self.indexes.append((_from, _to, _id))
                    self.lanes.append(lane)
        key = tuple(_geometry(lane) for lane in self.lanes)
        if key not in self._boxes:
            boxes = [_box(lane) for lane in self.lanes]
            self._boxes[key] = (np.array([lo for lo, _ in boxes]), np.array([hi for _, hi in boxes]))
        self.lo, self.hi = self._boxes[key]

    @classmethod
    def install(cls, network: RoadNetwork) -> bool:
        """Answer ``network``'s nearest-lane queries from now on; False (nothing changed) if it
        has lanes of other shapes than straight and circular."""
        try:
            network.get_closest_lane_index = cls(network)
        except TypeError:
            return False
        return True

    def __call__(self, position: np.ndarray, heading: float | None = None):
        x, y = float(position[0]), float(position[1])
        dx = np.maximum(np.maximum(self.lo[:, 0] - x, x - self.hi[:, 0]), 0.0)
        dy = np.maximum(np.maximum(self.lo[:, 1] - y, y - self.hi[:, 1]), 0.0)
        bound = np.sqrt(dx * dx + dy * dy)
        first = int(np.argmin(bound))
        best = self.lanes[first].distance_with_heading(position, heading)
        if not np.isfinite(best):  # a position nothing can place: measure every lane, as highway-env does
            return self.indexes[int(np.argmin([lane.distance_with_heading(position, heading)
                                               for lane in self.lanes]))]
        near = bound <= best + MARGIN_M
        near[first] = True
        candidates = np.flatnonzero(near)
        distances = [best if i == first else self.lanes[i].distance_with_heading(position, heading)
                     for i in candidates]
        return self.indexes[int(candidates[int(np.argmin(distances))])]


#: Lap centre lines already sampled: (lane geometries along the lap) -> points (read-only).
_laps: dict[tuple, np.ndarray] = {}


def lap_centre_line(network: RoadNetwork, lane_id: int) -> np.ndarray:
    """Points every metre along the centre line of lane ``lane_id`` (or the highest lane a road
    has, if fewer) for one lap of a loop network, from node ``"a"`` round to it: float64
    ``(N, 2)``, read-only.

    highway-env's racetrack builds the same lanes at every reset, and sampling them was ~1,800
    ``lane.position`` calls in Python, about half of a reset and a quarter of the time of short
    random episodes. So the points are kept per geometry of the lanes along the lap (lanes of
    other shapes than straight and circular are sampled every time) and are the same numbers.
    """
    lanes, node = [], "a"
    for _ in range(len(network.graph)):
        following = next(iter(network.graph[node]))
        parallel = network.graph[node][following]
        lanes.append(parallel[min(lane_id, len(parallel) - 1)])
        node = following
        if node == "a":
            break
    try:
        key = tuple(_geometry(lane) for lane in lanes)
    except TypeError:
        key = None
    if key in _laps:
        return _laps[key]
    points = np.asarray([lane.position(s, 0.0) for lane in lanes for s in np.arange(0.0, lane.length, 1.0)])
    points.flags.writeable = False
    if key is not None:
        _laps[key] = points
    return points
