"""The embedded default backend: highway-env's racetrack family, rendered offscreen.

highway-env provides the track (a lane graph) and the vehicles; everything that defines the task
(route, state vector, reward, termination) comes from :mod:`pipeline.envs.driving`, shared with the
CARLA backend. The camera is the car-mounted, heading-up bird's-eye view of :mod:`pipeline.envs.bev`
(84x84 grey, 48 m across, the ego in the lower part looking 38 m ahead), drawn by
:class:`BevCamera`.
"""

from __future__ import annotations

import functools
import os

# highway-env disables drawing entirely under SDL's "dummy" driver; "offscreen" draws to memory
# without a display (and avoids pygame's XDG_RUNTIME_DIR warning on headless machines).
if os.environ.get("SDL_VIDEODRIVER", "dummy") == "dummy":
    os.environ["SDL_VIDEODRIVER"] = "offscreen"
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import highway_env  # noqa: E402,F401  (registers the racetrack envs)
import numpy as np  # noqa: E402
from gymnasium.envs.registration import load_env_creator  # noqa: E402
import pygame  # noqa: E402
from highway_env.road.lane import LineType  # noqa: E402
from highway_env.vehicle.behavior import IDMVehicle  # noqa: E402

from pipeline.envs import bev  # noqa: E402

from pipeline.envs.driving import (  # noqa: E402
    RewardConfig,
    RouteTracker,
    TerminationRule,
    driving_reward,
    driving_vector,
)
from pipeline.envs.lanes import NearestLaneIndex, lap_centre_line  # noqa: E402
from pipeline.envs.routes import Route  # noqa: E402
from pipeline.envs.spec import ActionSpec, ObsSpec  # noqa: E402

MAX_STEER_RAD = np.pi / 4  # highway-env ContinuousAction steering range
MAX_ACCEL = 5.0  # highway-env ContinuousAction acceleration range, m/s^2
WHEELBASE_M = 5.0  # highway-env's kinematic bicycle turns like a 5 m wheelbase
STEP_SECONDS = 0.2  # policy frequency 5 Hz
OFF_ROUTE_M = 7.5  # beyond the adjacent lane
SUPERSAMPLE = 2  # samples per pixel side: lane lines and car edges are anti-aliased
MARKING_WIDTH_M = 0.5
STRIPE_LENGTH_M, STRIPE_PERIOD_M = 3.0, 7.5  # dashed lane lines
_STRIPED, _CONTINUOUS = LineType.STRIPED, (LineType.CONTINUOUS, LineType.CONTINUOUS_LINE)


class BevCamera:
    """The car-mounted, heading-up bird's-eye view of :mod:`pipeline.envs.bev` for a highway-env road.

    The track never changes, so its lanes are rasterised once (road surface, then lane lines) into
    a world-aligned grey map at ``SUPERSAMPLE`` times the view's resolution. A frame is then one
    gather: each sub-pixel of the view is rotated by the ego's heading into that map (nearest
    sample), the vehicles are filled in as rotated rectangles, and each ``SUPERSAMPLE`` x
    ``SUPERSAMPLE`` block is averaged. ``render`` returns uint8 ``(size, size)``.
    """

    def __init__(self, road, size: int):
        self.size = size
        self.scale = bev.pixels_per_m(size) * SUPERSAMPLE  # map pixels per metre
        lanes = [lane for frm in road.network.graph.values() for to in frm.values() for lane in to]
        edges = np.asarray([lane.position(s, lat) for lane in lanes for s in np.linspace(0, lane.length, 32)
                            for lat in (-lane.width_at(s) / 2, lane.width_at(s) / 2)])
        margin = 2.0  # metres of off-road around the track: samples beyond the map clamp onto it
        self.origin = edges.min(0) - margin
        width, height = (np.ceil((edges.max(0) + margin - self.origin) * self.scale) + 1).astype(int)
        surface = pygame.Surface((int(width), int(height)))
        surface.fill((bev.OFF_ROAD,) * 3)
        for lane in lanes:
            self._draw_lane(surface, lane)
        self.map = pygame.surfarray.array3d(surface)[:, :, 0].copy()  # indexed [x, y]
        self._flat_map = self.map.astype(np.uint16).ravel()  # uint16: four samples sum without overflow
        self.forward, self.left = bev.ego_frame_grid(size, SUPERSAMPLE)
        self._forward_px = (self.forward * self.scale).astype(np.float32)
        self._left_px = (self.left * self.scale).astype(np.float32)
        self._ego_footprint = None
        # a frame's working arrays, (sub-pixel rows, columns), reused: each frame overwrites them
        grid = (len(self.forward), len(self.left))
        self._x, self._y = np.empty(grid, np.float32), np.empty(grid, np.float32)
        self._index, self._column = np.empty(grid, np.int32), np.empty(grid, np.int32)
        self._view = np.empty(grid, np.uint16)

    def _pixels(self, lane, s: np.ndarray, lateral: float) -> list[tuple[float, float]]:
        return [tuple((lane.position(si, lateral) - self.origin) * self.scale) for si in s]

    def _draw_lane(self, surface, lane) -> None:
        s = np.linspace(0.0, lane.length, max(2, int(np.ceil(lane.length / 0.5)) + 1))
        half = lane.width_at(0) / 2
        edges = [self._pixels(lane, s, lateral) for lateral in (-half, half)]
        for i in range(len(s) - 1):  # quads, not one polygon: a long arc's outline is concave
            quad = [edges[0][i], edges[0][i + 1], edges[1][i + 1], edges[1][i]]
            pygame.draw.polygon(surface, (bev.ROAD,) * 3, quad)
        line_width = max(1, int(round(MARKING_WIDTH_M * self.scale)))
        for kind, lateral, points in zip(lane.line_types, (-half, half), edges):  # highway-env's order
            if kind in _CONTINUOUS:
                pygame.draw.lines(surface, (bev.LANE_MARKING,) * 3, False, points, line_width)
            elif kind == _STRIPED:
                for s0 in np.arange(0.0, lane.length, STRIPE_PERIOD_M):
                    stripe = np.linspace(s0, min(s0 + STRIPE_LENGTH_M, lane.length), 4)
                    pygame.draw.lines(surface, (bev.LANE_MARKING,) * 3, False,
                                      self._pixels(lane, stripe, lateral), line_width)

    def render(self, ego, vehicles) -> np.ndarray:
        """uint8 ``(size, size)`` view from ``ego`` (``.position``, ``.heading``), with ``vehicles``
        (each ``.position``, ``.heading``, ``.LENGTH``, ``.WIDTH``; the ego among them)."""
        c, s = np.cos(ego.heading), np.sin(ego.heading)
        x0, y0 = (np.asarray(ego.position) - self.origin) * self.scale
        # the map pixel under every sub-pixel; separable in rows and columns, so two outer sums.
        # float32, in place, into arrays kept from frame to frame: this is most of a frame's cost
        x, y, index, column, view = self._x, self._y, self._index, self._column, self._view
        np.add((np.float32(x0) + self._forward_px * np.float32(c))[:, None], -self._left_px * np.float32(s), out=x)
        np.add((np.float32(y0) + self._forward_px * np.float32(s))[:, None], self._left_px * np.float32(c), out=y)
        np.clip(x, 0, self.map.shape[0] - 1, out=x)
        np.clip(y, 0, self.map.shape[1] - 1, out=y)
        index[...] = x  # float32 -> int32 truncates, as astype does
        index *= self.map.shape[1]
        column[...] = y
        index += column
        np.take(self._flat_map, index, out=view, mode="clip")  # in range by construction; "raise" would buffer out
        if self._ego_footprint is None:  # the ego never moves in its own view: compute it once
            self._ego_footprint = self._footprint(0.0, 0.0, 0.0, ego.LENGTH, ego.WIDTH)
        rows, cols, inside = self._ego_footprint
        view[rows, cols][inside] = bev.VEHICLE
        for vehicle in vehicles:
            if vehicle is not ego:
                self._fill_vehicle(view, ego, vehicle, c, s)
        # each SUPERSAMPLE x SUPERSAMPLE block's mean, rounded: its rows summed, then its columns
        rows = functools.reduce(np.add, (view[i::SUPERSAMPLE] for i in range(SUPERSAMPLE)))
        blocks = functools.reduce(np.add, (rows[:, j::SUPERSAMPLE] for j in range(SUPERSAMPLE)))
        blocks += SUPERSAMPLE**2 // 2
        blocks //= SUPERSAMPLE**2
        return blocks.astype(np.uint8)

    def _fill_vehicle(self, view: np.ndarray, ego, vehicle, c: float, s: float) -> None:
        """Paint ``vehicle``'s footprint into the sub-pixel ``view`` (``c, s``: the ego's heading)."""
        d = np.asarray(vehicle.position, dtype=np.float64) - ego.position
        fwd, lft = c * d[0] + s * d[1], -s * d[0] + c * d[1]  # its centre in the ego frame
        if max(abs(fwd), abs(lft)) > bev.VIEW_SIZE_M:
            return
        footprint = self._footprint(fwd, lft, vehicle.heading - ego.heading, vehicle.LENGTH, vehicle.WIDTH)
        if footprint is not None:
            rows, cols, inside = footprint
            view[rows, cols][inside] = bev.VEHICLE

    def _footprint(self, fwd: float, lft: float, heading: float, length: float, width: float):
        """The sub-pixels a ``length`` x ``width`` rectangle centred at (``fwd``, ``lft``) m in the
        ego frame covers: ``(rows, cols, inside)``, slices of its bounding box and a bool mask of
        that box; None when it lies outside the view."""
        radius = 0.5 * np.hypot(length, width)
        rows = np.flatnonzero(np.abs(self.forward - fwd) <= radius)
        cols = np.flatnonzero(np.abs(self.left - lft) <= radius)
        if rows.size == 0 or cols.size == 0:
            return None
        rc, rs = np.cos(heading), np.sin(heading)
        df, dl = self.forward[rows, None] - fwd, self.left[None, cols] - lft
        along, across = rc * df + rs * dl, -rs * df + rc * dl
        inside = (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1), inside


def _no_sim_observation():
    return None


def _advance(sim, action: np.ndarray) -> None:
    """highway-env's ``AbstractEnv.step`` without what we never use: its reward (computed twice,
    the second time for its info dict), its termination flags and its info, ~6% of an env step.
    The simulation itself is the same call, so the episodes are too."""
    sim.time += 1 / sim.config["policy_frequency"]
    sim._simulate(action)


def _define_spaces_without_observation(sim) -> None:
    """highway-env's ``define_spaces``, with the observation it would compute on every step and
    reset switched off: we never use it (see BevCamera). Its reset computed one (with pandas)
    after building the spaces, which took ~30% of a reset: ~13% of the env loop with the random
    policy's ~11-step episodes."""
    type(sim).define_spaces(sim)
    sim.observation_type.observe = _no_sim_observation


def _highway_config(image_size: int) -> dict:
    return {
        # the observation highway-env computes is discarded (see BevCamera): ask for a small one
        "observation": {"type": "Kinematics", "vehicles_count": 1, "features": ["x"]},
        "action": {"type": "ContinuousAction", "longitudinal": True, "lateral": True},
        "other_vehicles": 0,  # we place traffic ourselves: highway-env spawns a random count
        "offscreen_rendering": True,
        "duration": 10**9,  # our TerminationRule decides when episodes end
        "terminate_off_road": False,
        "policy_frequency": int(round(1 / STEP_SECONDS)),
    }


class EmbeddedDrivingEnv(gym.Env):
    """One lap of a highway-env racetrack as a single-frame driving env.

    Observation ``Dict(frame=uint8 (84, 84), vector=float32 (D,))`` (wrap in
    :class:`~pipeline.envs.wrappers.FrameStack` for the stacked contract; :func:`pipeline.envs.make_env`
    does). Action float32 ``(2,)`` in [-1, 1]: steer (+ turns toward the ego frame's +y),
    throttle (>0) / brake (<0).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": int(1 / STEP_SECONDS)}
    vehicle_params = {"max_steer_rad": MAX_STEER_RAD, "wheelbase_m": WHEELBASE_M,
                      "max_accel": MAX_ACCEL, "step_seconds": STEP_SECONDS}

    def __init__(self, route: Route, obs_spec: ObsSpec = ObsSpec(), max_steps: int | None = None,
                 reward_config: RewardConfig = RewardConfig(), render_mode: str | None = None):
        self.route, self.obs_spec, self.reward_config = route, obs_spec, reward_config
        self.render_mode = render_mode
        self.action_spec = ActionSpec()
        # instantiate the class behind the id: gym.make's checker wrappers cost time on every step
        # and highway-env's v0 ids print a deprecation warning
        sim_class = load_env_creator(gym.spec(route.scenario).entry_point)
        self._sim = sim_class(config=_highway_config(obs_spec.image_size))
        self._sim.define_spaces = functools.partial(_define_spaces_without_observation, self._sim)
        self.observation_space = obs_spec.frame_space()
        self.action_space = self.action_spec.action_space()
        self._termination = TerminationRule(max_steps or route.max_steps)
        self._frame = np.zeros((obs_spec.image_size,) * 2, np.uint8)
        self._camera: BevCamera | None = None  # built at the first reset, from the track
        self._vector_index = obs_spec.vector_index

    # -- helpers ---------------------------------------------------------------------------
    @property
    def _ego(self):
        return self._sim.vehicle

    def _lap_polyline(self) -> np.ndarray:
        """Centre line of the ego's lane for one whole lap, starting where the ego stands."""
        points = lap_centre_line(self._sim.road.network, self._ego.lane_index[2])
        start = int(np.argmin(np.linalg.norm(points - self._ego.position, axis=1)))
        points = np.roll(points, -start, axis=0)
        return np.concatenate([points, points[:1]], axis=0)

    def _spawn_traffic(self, n: int) -> None:
        """Place exactly ``n`` IDM vehicles at random lane positions, not on top of the ego."""
        road, rng = self._sim.road, self._sim.np_random
        placed = 0
        for _ in range(50 * max(n, 1)):
            if placed >= n:
                break
            lane_index = road.network.random_lane_index(rng)
            lane = road.network.get_lane(lane_index)
            s = rng.uniform(0, lane.length)
            position = lane.position(s, 0)
            if min(np.linalg.norm(v.position - position) for v in road.vehicles) < 12.0:
                continue
            road.vehicles.append(
                IDMVehicle.make_on_lane(road, lane_index, longitudinal=s, speed=6.0 + 3.0 * rng.uniform())
            )
            placed += 1

    def _observe(self, state) -> tuple[dict, np.ndarray]:
        ego = self._ego
        waypoints = self._tracker.waypoints_ego(ego.position, ego.heading, state.progress_m)
        full = driving_vector(ego.speed, state, ego.heading, waypoints)
        return {"frame": self._frame, "vector": full[self._vector_index]}, full

    def _info(self, state, full_vector, collision=False, off_route=False, termination=None) -> dict:
        others = [v for v in self._sim.road.vehicles if v is not self._ego]
        lead_m, lead_speed = self._tracker.lead_vehicle(
            state.progress_m, [v.position for v in others], [v.speed for v in others])
        return {
            "route_completion": state.completion,
            "collision": bool(collision),
            "collision_kind": "vehicle" if collision else None,  # the track holds only vehicles
            "off_route": bool(off_route),
            "red_light": False,  # the racetrack has no traffic lights or stop signs
            "stop_sign": False,
            "speed": float(self._ego.speed),
            "termination": termination,
            "progress_m": state.progress_m,
            "state_vector": full_vector,
            # privileged, for the scripted expert: the nearest vehicle ahead in the ego's lane
            "lead_distance_m": lead_m,
            "lead_speed": lead_speed,
        }

    # -- gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        sim_seed = None if seed is None else int(seed)
        self._sim.reset(seed=sim_seed)
        NearestLaneIndex.install(self._sim.road.network)  # same lanes, a third of the step less
        self._spawn_traffic(self.obs_spec.traffic)
        if self._camera is None:
            self._camera = BevCamera(self._sim.road, self.obs_spec.image_size)
        self._frame = self._camera.render(self._ego, self._sim.road.vehicles)
        self._tracker = RouteTracker(self._lap_polyline(), closed=True)
        self._termination.reset()
        state = self._tracker.reset(self._ego.position)
        self._progress = state.progress_m
        obs, full = self._observe(state)
        return obs, self._info(state, full)

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1.0, 1.0)
        # highway-env's ContinuousAction takes [acceleration, steering]
        _advance(self._sim, np.array([self._brake_without_reversing(action[1]), action[0]], dtype=np.float32))
        self._frame = self._camera.render(self._ego, self._sim.road.vehicles)
        state = self._tracker.update(self._ego.position)
        collision = bool(self._ego.crashed)
        off_route = (not self._ego.on_road) or abs(state.lateral) > OFF_ROUTE_M
        terminated, truncated, reason = self._termination(
            state.completion, collision, off_route, float(self._ego.speed))
        reward = driving_reward(state.progress_m - self._progress, state.lateral, reason,
                                self.route.target_speed * STEP_SECONDS, self.reward_config)
        self._progress = state.progress_m
        obs, full = self._observe(state)
        return obs, reward, terminated, truncated, self._info(state, full, collision, off_route, reason)

    def _brake_without_reversing(self, throttle: float) -> float:
        """Throttle/brake in [-1, 1] as highway-env's acceleration command, with CARLA's brake: it
        stops the car and holds it, where highway-env would drive on backwards. The strongest
        braking allowed ends the step at exactly 0 m/s."""
        if throttle >= 0:
            return throttle
        speed = max(float(self._ego.speed), 0.0)
        return max(throttle, -speed / (MAX_ACCEL * STEP_SECONDS))

    def render(self):
        return np.repeat(self._frame[:, :, None], 3, axis=2)

    def close(self):
        self._sim.close()
