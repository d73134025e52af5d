"""An in-process stand-in for the small part of the CARLA client API that ``CarlaDrivingEnv`` uses.

Not a simulator: the maps are real ``carla.Map`` objects built from OpenDRIVE text (so waypoints,
lanes and the planner are CARLA's own), vehicles move with a kinematic bicycle model in CARLA's
left-handed frame (+steer turns right, yaw grows clockwise), sensors call their callbacks inside
``tick``, and a TrafficManager drives autopilot vehicles by pure pursuit. It keeps enough state for
tests to check what the adapter left behind: live actors, world settings, TrafficManager mode.

Failure injection: ``server.crash()`` makes every call time out like a dead server,
``server.restart()`` starts a fresh world (new id, no actors), ``world.fail_next_tick = exc`` raises
``exc`` from the next ``tick`` (e.g. ``KeyboardInterrupt()`` for Ctrl-C).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import dataclass, replace

import carla
import numpy as np

VEHICLES = {"vehicle.lincoln.mkz_2020": 4, "vehicle.tesla.model3": 4, "vehicle.yamaha.yzf": 2}
SENSORS = ("sensor.camera.rgb", "sensor.camera.semantic_segmentation", "sensor.other.collision",
           "sensor.other.lane_invasion")
# the semantic camera's picture: a road (tag 1) with a lane line (tag 24) down the middle, a car
# (tag 14) ahead on it, and unlabelled ground (tag 0) either side, in CARLA's red channel
SEMANTIC_ROAD, SEMANTIC_LINE, SEMANTIC_CAR = 1, 24, 14
WALKERS = ("walker.pedestrian.0001", "walker.pedestrian.0002")
WALKER_CONTROLLER = "controller.ai.walker"
# deliberately not the adapter's defaults, so tests see them read from the physics control
WHEELBASE_M = 2.8
MAX_STEER_DEG = 60.0
COLLISION_DISTANCE_M = 3.0
TIMEOUT_MESSAGE = "time-out of 5000ms while waiting for the simulator, make sure the simulator is ready and connected"


@dataclass
class Settings:
    """Same field names as ``carla.WorldSettings`` (the subset the adapter touches)."""

    synchronous_mode: bool = False
    fixed_delta_seconds: float | None = None
    no_rendering_mode: bool = False


class StandInServer:
    """Towns by name (``{"Loop": xodr_text}``); ``client_factory`` is what the env is given."""

    def __init__(self, towns: dict[str, str], town: str | None = None):
        self.towns = towns
        self.crashed = False
        self.clients: list[tuple[str, int]] = []
        self._ids = itertools.count(1)
        self._world_ids = itertools.count(1)
        self.traffic_managers: dict[int, StandInTrafficManager] = {}
        self.world = StandInWorld(self, town or next(iter(towns)))

    def client_factory(self, host: str, port: int, timeout: float) -> "StandInClient":
        self.clients.append((host, port))
        return StandInClient(self)

    def check(self) -> None:
        if self.crashed:
            raise RuntimeError(TIMEOUT_MESSAGE)

    def crash(self) -> None:
        self.crashed = True

    def restart(self) -> None:
        self.world = StandInWorld(self, self.world.town)
        self.traffic_managers.clear()

    def next_id(self) -> int:
        return next(self._ids)


class StandInClient:
    def __init__(self, server: StandInServer):
        self.server = server
        self.timeout = None

    def set_timeout(self, seconds: float) -> None:
        self.timeout = seconds

    def get_server_version(self) -> str:
        self.server.check()
        return "0.9.16"

    def get_world(self) -> "StandInWorld":
        self.server.check()
        return self.server.world

    def load_world(self, town: str) -> "StandInWorld":
        self.server.check()
        if town not in self.server.towns:
            raise RuntimeError(f"map '{town}' not found")
        self.server.world = StandInWorld(self.server, town)
        return self.server.world

    def get_trafficmanager(self, port: int = 8000) -> "StandInTrafficManager":
        self.server.check()
        return self.server.traffic_managers.setdefault(port, StandInTrafficManager(port))

    def apply_batch_sync(self, commands, due_tick_cue: bool = False):
        self.server.check()
        for command in commands:
            actor = self.server.world.actors.get(command.actor_id)
            if actor is not None:
                actor.destroy()
        return []


class StandInMap:
    """A real ``carla.Map`` plus the spawn points and name that a server map has."""

    def __init__(self, town: str, xodr: str):
        self._map = carla.Map(town, xodr)
        self.name = f"Carla/Maps/{town}"
        self._spawn_points = [
            carla.Transform(carla.Location(w.transform.location.x, w.transform.location.y, 0.3), w.transform.rotation)
            for w in self._map.generate_waypoints(25.0) if not w.is_junction]

    def get_spawn_points(self):
        return list(self._spawn_points)

    def __getattr__(self, name):
        return getattr(self._map, name)


class StandInWorld:
    def __init__(self, server: StandInServer, town: str):
        self.server, self.town = server, town
        self.id = next(server._world_ids)
        self.map = StandInMap(town, server.towns[town])
        self.settings = Settings()
        self.settings_applied: list[Settings] = []
        self.actors: dict[int, StandInActor] = {}
        self.frame = 0
        self.weather = None
        self.fail_next_tick: BaseException | None = None
        self.rng = np.random.default_rng(0)

    # -- the API the adapter calls -----------------------------------------------------------
    def get_map(self) -> StandInMap:
        self.server.check()
        return self.map

    def get_settings(self) -> Settings:
        return replace(self.settings)

    def apply_settings(self, settings: Settings) -> int:
        self.server.check()
        self.settings = replace(settings)
        self.settings_applied.append(replace(settings))
        return self.frame

    def set_weather(self, weather) -> None:
        self.weather = weather

    def get_blueprint_library(self) -> "StandInBlueprintLibrary":
        return StandInBlueprintLibrary()

    def set_pedestrians_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def get_random_location_from_navigation(self):
        points = self.map.get_spawn_points()
        p = points[int(self.rng.integers(len(points)))].location
        return carla.Location(p.x + 6.0, p.y + 6.0, 0.0)  # off the lane, like a sidewalk

    def try_spawn_actor(self, blueprint, transform, attach_to=None):
        self.server.check()
        kind = blueprint.id.split(".")[0]
        if kind == "vehicle" and any(
                isinstance(a, StandInVehicle) and _distance(a.transform.location, transform.location) < 2.0
                for a in self.actors.values()):
            return None
        cls = {"vehicle": StandInVehicle, "sensor": StandInSensor, "walker": StandInWalker,
               "controller": StandInWalkerController}[kind]
        actor = cls(self, blueprint, transform, attach_to)
        self.actors[actor.id] = actor
        return actor

    def spawn_actor(self, blueprint, transform, attach_to=None):
        actor = self.try_spawn_actor(blueprint, transform, attach_to)
        if actor is None:
            raise RuntimeError("Spawn failed because of collision at spawn position")
        return actor

    def tick(self, seconds: float | None = None) -> int:
        self.server.check()
        if self.fail_next_tick is not None:
            exc, self.fail_next_tick = self.fail_next_tick, None
            raise exc
        dt = self.settings.fixed_delta_seconds or 0.05
        vehicles = [a for a in self.actors.values() if isinstance(a, StandInVehicle)]
        for tm in self.server.traffic_managers.values():
            tm.drive([v for v in vehicles if v.autopilot_port == tm.port], self.map)
        for vehicle in vehicles:
            vehicle.move(dt)
        self.frame += 1
        for sensor in [a for a in self.actors.values() if isinstance(a, StandInSensor)]:
            sensor.sense(self.frame, vehicles)
        return self.frame

    # -- for tests -------------------------------------------------------------------------------
    def alive(self, kind: str = "") -> list:
        return [a for a in self.actors.values() if a.type_id.startswith(kind)]

    @property
    def hero(self) -> "StandInVehicle":
        return next(a for a in self.alive("vehicle") if a.attributes.get("role_name") == "hero")


def _distance(a, b) -> float:
    return math.hypot(a.x - b.x, a.y - b.y)


class StandInBlueprint:
    def __init__(self, blueprint_id: str):
        self.id = blueprint_id
        self.attributes: dict[str, str] = {}
        if blueprint_id in VEHICLES:
            self.attributes["number_of_wheels"] = str(VEHICLES[blueprint_id])

    def has_attribute(self, key: str) -> bool:
        return key in self.attributes

    def get_attribute(self, key: str) -> str:
        return self.attributes[key]

    def set_attribute(self, key: str, value: str) -> None:
        self.attributes[key] = str(value)


class StandInBlueprintLibrary:
    IDS = (*VEHICLES, *SENSORS, *WALKERS, WALKER_CONTROLLER)

    def find(self, blueprint_id: str) -> StandInBlueprint:
        if blueprint_id not in self.IDS:
            raise IndexError(f"blueprint '{blueprint_id}' not found")
        return StandInBlueprint(blueprint_id)

    def filter(self, pattern: str) -> list[StandInBlueprint]:
        return [StandInBlueprint(i) for i in self.IDS if fnmatch.fnmatch(i, pattern)]


class StandInActor:
    def __init__(self, world: StandInWorld, blueprint: StandInBlueprint, transform, parent):
        self.world, self.id, self.type_id = world, world.server.next_id(), blueprint.id
        self.attributes = dict(blueprint.attributes)
        self.transform = carla.Transform(transform.location, transform.rotation)
        self.parent = parent
        self.is_alive = True

    def get_transform(self):
        return carla.Transform(self.transform.location, self.transform.rotation)

    def destroy(self) -> bool:
        self.world.server.check()
        self.is_alive = False
        self.world.actors.pop(self.id, None)
        return True


@dataclass
class _Wheel:
    max_steer_angle: float
    position: carla.Vector3D


@dataclass
class _Physics:
    wheels: list


class StandInVehicle(StandInActor):
    def __init__(self, *args):
        super().__init__(*args)
        self.speed = 0.0
        self.control = carla.VehicleControl()
        self.autopilot_port: int | None = None

    def get_location(self):
        return self.transform.location

    def get_velocity(self):
        yaw = math.radians(self.transform.rotation.yaw)
        return carla.Vector3D(self.speed * math.cos(yaw), self.speed * math.sin(yaw), 0.0)

    def apply_control(self, control) -> None:
        self.control = control

    def get_control(self):
        return self.control

    def set_autopilot(self, enabled: bool = True, port: int = 8000) -> None:
        self.autopilot_port = port if enabled else None

    def get_physics_control(self) -> _Physics:
        loc, yaw = self.transform.location, math.radians(self.transform.rotation.yaw)
        fwd, right = np.array([math.cos(yaw), math.sin(yaw)]), np.array([-math.sin(yaw), math.cos(yaw)])

        def wheel(along, side, steer):
            p = (np.array([loc.x, loc.y]) + along * fwd + side * right) * 100.0  # CARLA reports centimetres
            return _Wheel(steer, carla.Vector3D(float(p[0]), float(p[1]), 30.0))

        half = WHEELBASE_M / 2
        return _Physics([wheel(half, -0.8, MAX_STEER_DEG), wheel(half, 0.8, MAX_STEER_DEG),
                         wheel(-half, -0.8, 0.0), wheel(-half, 0.8, 0.0)])

    def move(self, dt: float) -> None:
        """Kinematic bicycle in CARLA's frame: +steer turns right, i.e. yaw grows."""
        c = self.control
        accel = 4.0 * c.throttle - 8.0 * c.brake - 0.05 * self.speed
        self.speed = max(0.0, self.speed + accel * dt)
        yaw = math.radians(self.transform.rotation.yaw)
        delta = c.steer * math.radians(MAX_STEER_DEG)
        loc = self.transform.location
        x = loc.x + self.speed * math.cos(yaw) * dt
        y = loc.y + self.speed * math.sin(yaw) * dt
        yaw += self.speed / WHEELBASE_M * math.tan(delta) * dt
        self.transform = carla.Transform(carla.Location(x, y, loc.z), carla.Rotation(yaw=math.degrees(yaw)))


@dataclass
class StandInImage:
    frame: int
    width: int
    height: int
    raw_data: bytes


@dataclass
class _Marking:
    type: object


@dataclass
class _Event:
    frame: int
    other_actor: object = None
    crossed_lane_markings: tuple = ()


class StandInSensor(StandInActor):
    def __init__(self, *args):
        super().__init__(*args)
        self.callback = None
        self._was_on_road = True

    @property
    def is_listening(self) -> bool:
        return self.callback is not None

    def listen(self, callback) -> None:
        self.callback = callback

    def stop(self) -> None:
        self.callback = None

    def sense(self, frame: int, vehicles: list) -> None:
        if self.callback is None or self.parent is None:
            return
        me = self.parent
        if self.type_id == "sensor.camera.rgb":
            self.callback(self._render(frame, me))
        elif self.type_id == "sensor.camera.semantic_segmentation":
            self.callback(self._render_semantic(frame))
        elif self.type_id == "sensor.other.collision":
            for other in vehicles:
                gap = _distance(other.transform.location, me.transform.location)
                if other is not me and gap < COLLISION_DISTANCE_M:
                    self.callback(_Event(frame, other_actor=other))
        elif self.type_id == "sensor.other.lane_invasion":
            on_road = me.world.map.get_waypoint(me.transform.location, project_to_road=False,
                                                lane_type=carla.LaneType.Driving) is not None
            if self._was_on_road and not on_road:
                self.callback(_Event(frame, crossed_lane_markings=(_Marking(carla.LaneMarkingType.Curb),)))
            self._was_on_road = on_road

    def _render(self, frame: int, me: StandInVehicle) -> StandInImage:
        """Stripes that slide with the car's position and heading, so consecutive frames differ."""
        if not hasattr(self, "_stripes"):
            w, h = int(self.attributes["image_size_x"]), int(self.attributes["image_size_y"])
            rows, cols = np.mgrid[0:h, 0:w]
            gray = (96 + 80 * np.sin(cols / 6.0) + rows * 0.3).astype(np.uint8)
            self._stripes = np.stack([gray, gray, gray, np.full_like(gray, 255)], axis=-1)
        loc, yaw = me.transform.location, me.transform.rotation.yaw
        shift = int(8.0 * (loc.x + loc.y) + yaw)
        bgra = np.roll(self._stripes, shift, axis=1)
        return StandInImage(frame, bgra.shape[1], bgra.shape[0], bgra.tobytes())


    def _render_semantic(self, frame: int) -> StandInImage:
        """A fixed semantic picture (see ``SEMANTIC_*``): columns 1/4 to 3/4 road, a two-column
        lane line in the middle, a car block in the upper half, the rest tag 0."""
        w, h = int(self.attributes["image_size_x"]), int(self.attributes["image_size_y"])
        tags = np.zeros((h, w), np.uint8)
        tags[:, w // 4 : 3 * w // 4] = SEMANTIC_ROAD
        tags[:, w // 2 : w // 2 + 2] = SEMANTIC_LINE
        tags[h // 4 : h // 4 + 8, w // 2 + 4 : w // 2 + 12] = SEMANTIC_CAR
        bgra = np.zeros((h, w, 4), np.uint8)
        bgra[:, :, 2] = tags
        return StandInImage(frame, w, h, bgra.tobytes())


class StandInWalker(StandInActor):
    pass


class StandInWalkerController(StandInActor):
    def __init__(self, *args):
        super().__init__(*args)
        self.started, self.destination, self.max_speed = False, None, None

    def start(self) -> None:
        self.started = True

    def go_to_location(self, location) -> None:
        self.destination = location

    def set_max_speed(self, speed: float) -> None:
        self.max_speed = speed

    def stop(self) -> None:
        self.started = False


class StandInTrafficManager:
    """Drives its autopilot vehicles in sync mode: pure pursuit toward ``set_path`` points, or
    along the lane when a vehicle has no path, at its desired speed (default 30 km/h)."""

    def __init__(self, port: int):
        self.port = port
        self.synchronous = False
        self.seed = None
        self.paths: dict[int, list] = {}
        self.desired_speed_kmh: dict[int, float] = {}
        self.lane_changes: dict[int, bool] = {}

    def get_port(self) -> int:
        return self.port

    def set_synchronous_mode(self, enabled: bool) -> None:
        self.synchronous = enabled

    def set_random_device_seed(self, seed: int) -> None:
        self.seed = seed

    def set_path(self, actor, locations) -> None:
        self.paths[actor.id] = list(locations)

    def set_desired_speed(self, actor, kmh: float) -> None:
        self.desired_speed_kmh[actor.id] = kmh

    def auto_lane_change(self, actor, enabled: bool) -> None:
        self.lane_changes[actor.id] = enabled

    def drive(self, vehicles: list, carla_map) -> None:
        for v in vehicles:
            loc, yaw = v.transform.location, math.radians(v.transform.rotation.yaw)
            path = self.paths.get(v.id)
            # drop path points reached, or passed (the next one is already closer)
            while path and (_distance(path[0], loc) < 6.0
                            or len(path) > 1 and _distance(path[1], loc) < _distance(path[0], loc)):
                path.pop(0)
            if path:
                target = path[0]
            else:
                ahead = carla_map.get_waypoint(loc).next(6.0)
                target = ahead[0].transform.location if ahead else loc
            dx, dy = target.x - loc.x, target.y - loc.y
            # ego-frame in CARLA's convention: +local_y is to the right
            local_x = math.cos(yaw) * dx + math.sin(yaw) * dy
            local_y = -math.sin(yaw) * dx + math.cos(yaw) * dy
            alpha = math.atan2(local_y, local_x)
            angle = math.atan2(2.0 * WHEELBASE_M * math.sin(alpha), max(math.hypot(dx, dy), 1e-3))
            error = self.desired_speed_kmh.get(v.id, 30.0) / 3.6 - v.speed
            v.apply_control(carla.VehicleControl(
                throttle=float(np.clip(0.5 * error, 0.0, 1.0)), brake=float(np.clip(-0.5 * error, 0.0, 1.0)),
                steer=float(np.clip(angle / math.radians(MAX_STEER_DEG), -1.0, 1.0))))
