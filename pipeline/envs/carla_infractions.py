"""Red-light and stop-sign infractions of the ego on the CARLA backend, by the Leaderboard 1.0 rules.

The rules follow scenario_runner's ``RunningRedLightTest`` and ``RunningStopTest`` (the criteria the
Leaderboard 1.0 scores with; penalties 0.70 and 0.80 are applied in :mod:`pipeline.eval.metrics`):

- **Red light.** A light counts when it is red, its trigger volume's centre is within
  :data:`RED_LIGHT_DISTANCE_M` of the ego, and the ego's tail (the segment from 0.8 to 1.0 of the
  half length behind its centre, plus 1 m) crosses the light's stop line, a segment 1.2 lane widths
  wide across one of the light's stop waypoints (``carla.TrafficLight.get_stop_waypoints()``:
  where each affected lane meets the junction), while the tail is still on that lane and the ego
  heads along it. That is the moment the whole car has passed the line into the junction. The same
  light is not counted twice in a row.
- **Stop sign.** The ego is *affected* by a stop sign while its own location, or one of the next
  :data:`STOP_LOOKAHEAD_STEPS` lane waypoints :data:`STOP_WAYPOINT_STEP_M` apart, lies inside the
  sign's trigger volume. Once affected, a speed below :data:`STOP_SPEED_MS` counts as a stop; an
  infraction is counted when the ego stops being affected without having stopped.

The Leaderboard's stop test checks the trigger volume as an axis-aligned box; here the box turns
with the sign (as it is placed in the world), which only differs for signs not aligned with the
map axes. CARLA's world is left-handed; every computation here stays in CARLA's own frame.
"""

from __future__ import annotations

import fnmatch
import math

import carla
import numpy as np

RED_LIGHT_DISTANCE_M = 15.0  # RunningRedLightTest.DISTANCE_LIGHT
STOP_LINE_HALF_WIDTH = 0.6  # x lane width, either side of the stop waypoint
STOP_SPEED_MS = 0.1  # RunningStopTest.SPEED_THRESHOLD
STOP_WAYPOINT_STEP_M = 1.0  # RunningStopTest.WAYPOINT_STEP
STOP_LOOKAHEAD_STEPS = 20  # RunningStopTest.is_actor_affected_by_stop(multi_step=20)
STOP_PROXIMITY_M = 50.0  # RunningStopTest.PROXIMITY_THRESHOLD: the cheap test first


def _offset(transform, forward_m: float, right_m: float = 0.0) -> tuple[float, float]:
    """The point ``forward_m`` ahead and ``right_m`` to the right of ``transform`` (x, y)."""
    yaw = math.radians(transform.rotation.yaw)
    loc = transform.location
    # CARLA: forward = (cos yaw, sin yaw), right = (-sin yaw, cos yaw) in its left-handed x-y
    return (loc.x + forward_m * math.cos(yaw) - right_m * math.sin(yaw),
            loc.y + forward_m * math.sin(yaw) + right_m * math.cos(yaw))


def volume_centre(actor):
    """The world location of ``actor``'s trigger volume centre. (``carla.Transform.transform``
    overwrites the location it is given, so it gets a copy.)"""
    local = actor.trigger_volume.location
    return actor.get_transform().transform(carla.Location(local.x, local.y, local.z))


def segments_cross(p1, p2, q1, q2) -> bool:
    """Whether the closed segments p1-p2 and q1-q2 (x, y) intersect (touching counts)."""
    def side(a, b, c):
        return np.sign((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0]))

    def on_segment(a, b, c):  # c collinear with a-b: is it between them?
        return min(a[0], b[0]) <= c[0] <= max(a[0], b[0]) and min(a[1], b[1]) <= c[1] <= max(a[1], b[1])

    d1, d2, d3, d4 = side(q1, q2, p1), side(q1, q2, p2), side(p1, p2, q1), side(p1, p2, q2)
    if d1 * d2 < 0 and d3 * d4 < 0:
        return True
    return any(d == 0 and on_segment(a, b, c) for d, a, b, c in
               ((d1, q1, q2, p1), (d2, q1, q2, p2), (d3, p1, p2, q1), (d4, p1, p2, q2)))


def _in_volume(point, sign) -> bool:
    """Whether ``point`` (a carla.Location) lies inside ``sign``'s trigger volume, seen from above."""
    tf = sign.get_transform()
    centre = volume_centre(sign)
    extent = sign.trigger_volume.extent
    yaw = math.radians(tf.rotation.yaw + sign.trigger_volume.rotation.yaw)
    dx, dy = point.x - centre.x, point.y - centre.y
    along = dx * math.cos(yaw) + dy * math.sin(yaw)
    across = -dx * math.sin(yaw) + dy * math.cos(yaw)
    return abs(along) < extent.x and abs(across) < extent.y


def _same_lane(a, b) -> bool:
    return a is not None and b is not None and (a.road_id, a.lane_id) == (b.road_id, b.lane_id)


class _StopLine:
    """One lane's stop line of a traffic light: the waypoint, and the segment across the lane."""

    def __init__(self, waypoint):
        self.waypoint = waypoint
        half = STOP_LINE_HALF_WIDTH * waypoint.lane_width
        self.left = _offset(waypoint.transform, 0.0, -half)
        self.right = _offset(waypoint.transform, 0.0, half)
        yaw = math.radians(waypoint.transform.rotation.yaw)
        self.direction = (math.cos(yaw), math.sin(yaw))


class TrafficRules:
    """Watches one ego for red lights and stop signs; call :meth:`update` once per world tick.

    Lights and signs are read from the world once (they are part of the map). ``update`` returns
    ``(ran_red_light, ran_stop_sign)``, each True on the tick the infraction happens.
    """

    def __init__(self, world, carla_map):
        self.map = carla_map
        actors = list(world.get_actors())
        self.lights = [(light, carla.Location(volume_centre(light)),
                        [_StopLine(wp) for wp in light.get_stop_waypoints()])
                       for light in actors if fnmatch.fnmatch(light.type_id, "traffic.traffic_light*")]
        self.stop_signs = [a for a in actors if fnmatch.fnmatch(a.type_id, "traffic.stop*")]
        self.reset()

    def reset(self) -> None:
        """Forget the previous episode's lights and signs."""
        self._last_red_light = None
        self._stop_sign = None  # the sign the ego is dealing with now
        self._stopped = False

    def update(self, ego) -> tuple[bool, bool]:
        transform = ego.get_transform()
        return self._ran_red_light(ego, transform), self._ran_stop_sign(ego, transform)

    # -- red lights ------------------------------------------------------------------------------
    def _ran_red_light(self, ego, transform) -> bool:
        if not self.lights:
            return False
        half_length = ego.bounding_box.extent.x
        tail_near = _offset(transform, -0.8 * half_length)
        tail_far = _offset(transform, -half_length - 1.0)
        tail_waypoint = self.map.get_waypoint(carla.Location(tail_far[0], tail_far[1], transform.location.z))
        heading = (math.cos(math.radians(transform.rotation.yaw)), math.sin(math.radians(transform.rotation.yaw)))
        for light, centre, stop_lines in self.lights:
            if (light.id == self._last_red_light or light.state != carla.TrafficLightState.Red
                    or centre.distance(transform.location) > RED_LIGHT_DISTANCE_M):
                continue
            for line in stop_lines:
                along_lane = heading[0] * line.direction[0] + heading[1] * line.direction[1] > 0
                if (along_lane and _same_lane(tail_waypoint, line.waypoint)
                        and segments_cross(tail_near, tail_far, line.left, line.right)):
                    self._last_red_light = light.id
                    return True
        return False

    # -- stop signs ------------------------------------------------------------------------------
    def _lane_ahead(self, location) -> list:
        """The ego's location and the lane waypoints ahead of it that the stop test looks at."""
        points, waypoint = [location], self.map.get_waypoint(location)
        for _ in range(STOP_LOOKAHEAD_STEPS):
            ahead = waypoint.next(STOP_WAYPOINT_STEP_M) if waypoint is not None else []
            if not ahead:
                break
            waypoint = ahead[0]
            points.append(waypoint.transform.location)
        return points

    def _affected_by(self, sign, location, ahead) -> bool:
        if sign.get_transform().location.distance(location) > STOP_PROXIMITY_M:
            return False
        return any(_in_volume(point, sign) for point in ahead)

    def _ran_stop_sign(self, ego, transform) -> bool:
        if not self.stop_signs:
            return False
        location = transform.location
        ahead = self._lane_ahead(location)
        if self._stop_sign is None:
            self._stop_sign = next((s for s in self.stop_signs if self._affected_by(s, location, ahead)), None)
            self._stopped = False
        elif not self._affected_by(self._stop_sign, location, ahead):
            ran = not self._stopped
            self._stop_sign, self._stopped = None, False
            return ran
        if self._stop_sign is not None:
            v = ego.get_velocity()
            if math.sqrt(v.x ** 2 + v.y ** 2 + v.z ** 2) < STOP_SPEED_MS:
                self._stopped = True
        return False
