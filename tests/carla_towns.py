"""Small OpenDRIVE towns for the CARLA tests, built as text so ``carla.Map(name, xodr)`` needs no server.

OpenDRIVE is right-handed (y up); CARLA flips y when it loads a map, so a road drawn heading +y here
runs toward CARLA's -y. Lane -1 drives along a road's reference line (s increasing), lane 1 against
it. Every lane that continues is linked both ways, because CARLA's topology drops a right-hand lane
with neither predecessor nor successor.

- :func:`straight_town`: two chained 150 m roads (300 m), two lanes each way, broken line between
  same-direction lanes (lane changes allowed). Lane -1 centre is CARLA y = +1.75, lane -2 y = +5.25.
- :func:`junction_town`: a four-way junction (half size 10 m) with four 60 m arms, one lane each way,
  and connecting roads for straight, left and right through the junction.
- :func:`loop_town`: a rounded rectangle of eight chained roads (no junction), one lane each way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LANE_WIDTH = 3.5


@dataclass
class Road:
    id: int
    x: float
    y: float
    hdg: float
    pieces: list[tuple[float, float]]  # (length, curvature) in order; curvature 0 = line
    left: int = 1  # lanes 1..left drive against s
    right: int = 1  # lanes -1..-right drive along s
    predecessor: tuple[str, int, str] | None = None  # (elementType, elementId, contactPoint)
    successor: tuple[str, int, str] | None = None
    junction: int = -1
    # lane id -> (predecessor lane id, successor lane id); None = no link at that end
    lane_links: dict[int, tuple[int | None, int | None]] = field(default_factory=dict)

    @property
    def length(self) -> float:
        return sum(length for length, _ in self.pieces)

    def end_pose(self) -> tuple[float, float, float]:
        x, y, h = self.x, self.y, self.hdg
        for length, k in self.pieces:
            x, y, h = _advance(x, y, h, length, k)
        return x, y, h


def _advance(x, y, h, length, k):
    if abs(k) < 1e-12:
        return x + length * math.cos(h), y + length * math.sin(h), h
    h2 = h + k * length
    return x + (math.sin(h2) - math.sin(h)) / k, y - (math.cos(h2) - math.cos(h)) / k, h2


def _lane_xml(lane_id: int, links: tuple[int | None, int | None], mark: str) -> str:
    pred, succ = links
    link = (f'<predecessor id="{pred}"/>' if pred is not None else "") + (
        f'<successor id="{succ}"/>' if succ is not None else "")
    return (f'<lane id="{lane_id}" type="driving" level="false"><link>{link}</link>'
            f'<width sOffset="0" a="{LANE_WIDTH}" b="0" c="0" d="0"/>'
            f'<roadMark sOffset="0" type="{mark}" weight="standard" color="standard" width="0.15"/></lane>')


def _road_xml(road: Road) -> str:
    link = ""
    for tag, target in (("predecessor", road.predecessor), ("successor", road.successor)):
        if target is not None:
            kind, ident, contact = target
            contact_attr = f' contactPoint="{contact}"' if kind == "road" else ""
            link += f'<{tag} elementType="{kind}" elementId="{ident}"{contact_attr}/>'
    geometry, s, (x, y, h) = "", 0.0, (road.x, road.y, road.hdg)
    for length, k in road.pieces:
        shape = "<line/>" if abs(k) < 1e-12 else f'<arc curvature="{k:.9f}"/>'
        geometry += (f'<geometry s="{s:.6f}" x="{x:.6f}" y="{y:.6f}" hdg="{h:.9f}" length="{length:.6f}">'
                     f"{shape}</geometry>")
        x, y, h = _advance(x, y, h, length, k)
        s += length

    def side(ids):
        # the outermost lane borders the kerb (solid); inner lanes share a broken line
        return "".join(_lane_xml(i, road.lane_links.get(i, (None, None)),
                                 "solid" if abs(i) == len(ids) else "broken") for i in ids)

    left = f"<left>{side(range(road.left, 0, -1))}</left>" if road.left else ""
    right = f"<right>{side([-i for i in range(1, road.right + 1)])}</right>" if road.right else ""
    center = ('<center><lane id="0" type="none" level="false"><roadMark sOffset="0" type="solid" '
              'weight="standard" color="standard" width="0.15"/></lane></center>')
    return (f'<road name="road{road.id}" length="{road.length:.6f}" id="{road.id}" junction="{road.junction}">'
            f"<link>{link}</link><planView>{geometry}</planView><elevationProfile/><lateralProfile/>"
            f'<lanes><laneSection s="0">{left}{center}{right}</laneSection></lanes></road>')


def to_xodr(name: str, roads: list[Road], junctions: str = "") -> str:
    body = "".join(_road_xml(r) for r in roads)
    return (f'<?xml version="1.0" standalone="yes"?><OpenDRIVE><header revMajor="1" revMinor="4" name="{name}" '
            f'version="1.00" north="0" south="0" east="0" west="0"><geoReference><![CDATA[+proj=tmerc]]>'
            f"</geoReference></header>{body}{junctions}</OpenDRIVE>")


def _chain(roads: list[Road], lanes: int, closed: bool) -> None:
    """Link consecutive roads end-to-start (and the last to the first when ``closed``)."""
    n = len(roads)
    for i, road in enumerate(roads):
        prev = roads[i - 1] if (i > 0 or closed) else None
        nxt = roads[(i + 1) % n] if (i < n - 1 or closed) else None
        road.predecessor = ("road", prev.id, "end") if prev else None
        road.successor = ("road", nxt.id, "start") if nxt else None
        for k in range(1, lanes + 1):
            for lane in (k, -k):
                road.lane_links[lane] = (lane if prev else None, lane if nxt else None)


def straight_town() -> str:
    roads = [Road(0, 0.0, 0.0, 0.0, [(150.0, 0.0)], 2, 2), Road(1, 150.0, 0.0, 0.0, [(150.0, 0.0)], 2, 2)]
    _chain(roads, lanes=2, closed=False)
    return to_xodr("straight", roads)


JUNCTION_HALF = 10.0
# CARLA tells a junction link from a road link by whether a road has that id: keep them apart
JUNCTION_ID = 1000
ARM_LENGTH = 60.0
#: arm road id -> outward heading (OpenDRIVE frame): east, north, west, south
ARMS = {1: 0.0, 2: math.pi / 2, 3: math.pi, 4: -math.pi / 2}


def junction_town() -> str:
    """Arms start at the junction edge and point outward: lane -1 leaves the junction, lane 1 enters."""
    h, roads, connections, next_id = JUNCTION_HALF, [], [], 100
    for rid, hdg in ARMS.items():
        roads.append(Road(rid, h * math.cos(hdg), h * math.sin(hdg), hdg, [(ARM_LENGTH, 0.0)],
                          predecessor=("junction", JUNCTION_ID, ""), lane_links={1: (None, None), -1: (None, None)}))
    for src, src_hdg in ARMS.items():
        for dst, dst_hdg in ARMS.items():
            if src == dst:
                continue
            turn = (dst_hdg - (src_hdg + math.pi) + math.pi) % (2 * math.pi) - math.pi  # heading change
            if abs(turn) < 1e-6:
                pieces = [(2 * h, 0.0)]
            else:  # a quarter circle of radius h around the junction corner between the two arms
                pieces = [(math.pi / 2 * h, math.copysign(1.0 / h, turn))]
            start_hdg = src_hdg + math.pi
            roads.append(Road(next_id, h * math.cos(src_hdg), h * math.sin(src_hdg), start_hdg, pieces,
                              left=0, right=1, junction=JUNCTION_ID, predecessor=("road", src, "start"),
                              successor=("road", dst, "start"), lane_links={-1: (1, -1)}))
            connections.append(
                f'<connection id="{len(connections)}" incomingRoad="{src}" connectingRoad="{next_id}" '
                f'contactPoint="start"><laneLink from="1" to="-1"/></connection>')
            next_id += 1
    junction = f'<junction id="{JUNCTION_ID}" name="crossing">{"".join(connections)}</junction>'
    return to_xodr("junction", roads, junction)


LOOP_STRAIGHTS = (80.0, 40.0)
LOOP_RADIUS = 15.0


def loop_town() -> str:
    """Counter-clockwise (OpenDRIVE frame) rounded rectangle starting at (0, 0) heading east."""
    roads, (x, y, h) = [], (0.0, 0.0, 0.0)
    for i in range(8):
        pieces = ([(LOOP_STRAIGHTS[(i // 2) % 2], 0.0)] if i % 2 == 0
                  else [(math.pi / 2 * LOOP_RADIUS, 1.0 / LOOP_RADIUS)])
        road = Road(i + 1, x, y, h, pieces)
        x, y, h = road.end_pose()
        roads.append(road)
    _chain(roads, lanes=1, closed=True)
    return to_xodr("loop", roads)


def loop_length() -> float:
    """Length of the loop's reference line (lanes are 1.75 m either side of it)."""
    return 2 * sum(LOOP_STRAIGHTS) + 2 * math.pi * LOOP_RADIUS
