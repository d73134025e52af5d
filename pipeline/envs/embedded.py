"""The embedded default backend: highway-env's racetrack family, rendered offscreen.

highway-env provides the track (a lane graph), the vehicles and a top-down renderer; everything
that defines the task (route, state vector, reward, termination) comes from
:mod:`pipeline.envs.driving`, shared with the CARLA backend. The camera is a top-down 84x84
grayscale view centred on the ego car, about 52 m across.
"""

from __future__ import annotations

import os

# highway-env disables drawing entirely under SDL's "dummy" driver; "offscreen" draws to memory
# without a display (and avoids pygame's XDG_RUNTIME_DIR warning on headless machines).
if os.environ.get("SDL_VIDEODRIVER", "dummy") == "dummy":
    os.environ["SDL_VIDEODRIVER"] = "offscreen"
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import gymnasium as gym  # noqa: E402
import highway_env  # noqa: E402,F401  (registers the racetrack envs)
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402
from gymnasium.envs.registration import load_env_creator  # noqa: E402
import pygame  # noqa: E402
from highway_env.road.graphics import RoadGraphics, WorldSurface  # noqa: E402
from highway_env.vehicle.behavior import IDMVehicle  # noqa: E402
from highway_env.vehicle.graphics import VehicleGraphics  # noqa: E402

from pipeline.envs.driving import (  # noqa: E402
    RewardConfig,
    RouteTracker,
    TerminationRule,
    driving_reward,
    driving_vector,
)
from pipeline.envs.routes import Route  # noqa: E402
from pipeline.envs.spec import ActionSpec, ObsSpec  # noqa: E402

CAMERA_PIXELS_PER_M = 1.6
MAX_STEER_RAD = np.pi / 4  # highway-env ContinuousAction steering range
MAX_ACCEL = 5.0  # highway-env ContinuousAction acceleration range, m/s^2
WHEELBASE_M = 5.0  # highway-env's kinematic bicycle turns like a 5 m wheelbase
STEP_SECONDS = 0.2  # policy frequency 5 Hz
OFF_ROUTE_M = 7.5  # beyond the adjacent lane


GRAY_WEIGHTS = np.array([0.2989, 0.5870, 0.1140])


class TopDownCamera:
    """An ego-centred top-down grayscale camera that draws the track once.

    highway-env's own image observation redraws every lane stripe of the whole track each frame,
    which is most of a step's time. The track never changes, so we draw it once onto a large
    surface and per frame only blit the window around the ego car and draw the vehicles. Frames
    look like highway-env's ``GrayscaleObservation`` (same colours, scale and centring) but are
    in image orientation (rows = world y).
    """

    def __init__(self, road, size: int, pixels_per_m: float = CAMERA_PIXELS_PER_M):
        corners = []
        for lanes in (to for frm in road.network.graph.values() for to in frm.values()):
            for lane in lanes:
                for s in np.linspace(0.0, lane.length, 64):
                    for lat in (-lane.width_at(s), lane.width_at(s)):
                        corners.append(lane.position(s, lat))
        corners = np.asarray(corners)
        margin = size / pixels_per_m
        lo, hi = corners.min(0) - margin, corners.max(0) + margin
        width, height = (np.ceil((hi - lo) * pixels_per_m) + 1).astype(int)
        self.track = WorldSurface((int(width), int(height)), 0, pygame.Surface((int(width), int(height))))
        self.track.scaling, self.track.origin = pixels_per_m, lo
        RoadGraphics.display(road, self.track)
        self.view = WorldSurface((size, size), 0, pygame.Surface((size, size)))
        self.view.scaling = pixels_per_m

    def render(self, road, ego) -> np.ndarray:
        """uint8 ``(size, size)`` grayscale frame centred on ``ego``."""
        view = self.view
        view.move_display_window_to(ego.position)
        view.fill(view.GREY)
        dx, dy = self.track.pos2pix(*view.origin)
        view.blit(self.track, (-dx, -dy))
        for vehicle in road.vehicles:
            VehicleGraphics.display(vehicle, view, offscreen=True)
        # array3d copies (x, y, 3); a pixels3d view would keep the surface locked, and a locked
        # surface cannot be blitted onto at the next frame
        rgb = pygame.surfarray.array3d(view)
        gray = np.tensordot(rgb, GRAY_WEIGHTS, axes=([2], [0])).clip(0, 255).astype(np.uint8)
        return np.ascontiguousarray(gray.T)


def _no_sim_observation():
    return None


def _highway_config(image_size: int) -> dict:
    return {
        # the observation highway-env computes is discarded (see TopDownCamera): ask for a small one
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
        self.observation_space = spaces.Dict(
            {
                "frame": spaces.Box(0, 255, (obs_spec.image_size,) * 2, np.uint8),
                "vector": spaces.Box(-np.inf, np.inf, (obs_spec.vector_dim,), np.float32),
            }
        )
        self.action_space = self.action_spec.action_space()
        self._termination = TerminationRule(max_steps or route.max_steps)
        self._frame = np.zeros((obs_spec.image_size,) * 2, np.uint8)
        self._camera: TopDownCamera | None = None  # built at the first reset, from the track
        self._vector_index = obs_spec.vector_index

    # -- helpers ---------------------------------------------------------------------------
    @property
    def _ego(self):
        return self._sim.vehicle

    def _lap_polyline(self) -> np.ndarray:
        """Centre line of the ego's lane for one whole lap, starting where the ego stands."""
        network = self._sim.road.network
        lane_id = self._ego.lane_index[2]
        points, node = [], "a"
        for _ in range(len(network.graph)):
            nxt = next(iter(network.graph[node]))
            lane = network.graph[node][nxt][min(lane_id, len(network.graph[node][nxt]) - 1)]
            for s in np.arange(0.0, lane.length, 1.0):
                points.append(lane.position(s, 0.0))
            node = nxt
            if node == "a":
                break
        points = np.asarray(points)
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
        }

    # -- gymnasium API ---------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        sim_seed = None if seed is None else int(seed)
        self._sim.reset(seed=sim_seed)
        # the sim's own observation is never used: skip computing it on every step
        self._sim.observation_type.observe = _no_sim_observation
        self._spawn_traffic(self.obs_spec.traffic)
        if self._camera is None:
            self._camera = TopDownCamera(self._sim.road, self.obs_spec.image_size)
        self._frame = self._camera.render(self._sim.road, self._ego)
        self._tracker = RouteTracker(self._lap_polyline(), closed=True)
        self._termination.reset()
        state = self._tracker.reset(self._ego.position)
        self._progress = state.progress_m
        obs, full = self._observe(state)
        return obs, self._info(state, full)

    def step(self, action):
        action = np.clip(np.asarray(action, dtype=np.float32).reshape(2), -1.0, 1.0)
        # highway-env's ContinuousAction takes [acceleration, steering]
        self._sim.step(np.array([action[1], action[0]], dtype=np.float32))
        self._frame = self._camera.render(self._sim.road, self._ego)
        state = self._tracker.update(self._ego.position)
        collision = bool(self._ego.crashed)
        off_route = (not self._ego.on_road) or abs(state.lateral) > OFF_ROUTE_M
        reward = driving_reward(state.progress_m - self._progress, state.lateral, collision, off_route,
                                self.reward_config)
        self._progress = state.progress_m
        terminated, truncated, reason = self._termination(
            state.completion, collision, off_route, float(self._ego.speed))
        obs, full = self._observe(state)
        return obs, reward, terminated, truncated, self._info(state, full, collision, off_route, reason)

    def render(self):
        return np.repeat(self._frame[:, :, None], 3, axis=2)

    def close(self):
        self._sim.close()
