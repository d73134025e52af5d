"""Scripted drivers for collecting data and as evaluation baselines (see ``policies/base.py``
for what a policy is).

The expert is privileged: it reads ``info["state_vector"]`` (the full 23-field vector, whatever
the observation spec hides), so it drives the same way on every backend and with any
``vector_fields``. Each class's ``for_env(env, noise, seed)`` builds it for an env: the registry in
``policies/__init__.py`` calls it by name.
"""

from __future__ import annotations

import numpy as np

from pipeline.envs.spec import N_WAYPOINTS
from pipeline.errors import PipelineError
from pipeline.policies.base import SeededPolicy


class RandomPolicy(SeededPolicy):
    """Uniform random actions in [-1, 1]^2, seeded per episode."""

    @classmethod
    def for_env(cls, env, noise: float = 0.0, seed: int = 0) -> "RandomPolicy":
        return cls(seed)  # noise on uniform noise changes nothing worth having

    def act(self, obs: dict, info: dict) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=2).astype(np.float32)


class ExpertPolicy(SeededPolicy):
    """Pure pursuit on the route waypoints plus a proportional speed controller that keeps its
    distance to the vehicle ahead.

    Steering: aim at the route point ``lookahead`` metres ahead (in the ego frame) and turn with the
    bicycle-model angle ``atan(2 L sin(alpha) / lookahead)``, normalised by the backend's maximum
    steering angle. Speed: throttle/brake proportional to the error to ``target_speed``, easing off
    in curves, and never faster than the speed that keeps a time gap to the vehicle ahead in its
    lane (the env's privileged ``info["lead_distance_m"]`` / ``info["lead_speed"]``): without it the
    expert drove into slower traffic, and datasets recorded with traffic taught crashing into it.
    ``noise`` adds Gaussian action noise so datasets cover recoveries, not one line.
    """

    # Car following: the wanted gap is MIN_GAP_M plus HEADWAY_S of the ego's speed between bumpers
    # (centres CAR_LENGTH_M apart, as both backends' cars are about that long); each metre short
    # of it (or beyond it) takes GAP_GAIN m/s off the lead vehicle's speed (or adds it).
    CAR_LENGTH_M = 5.0
    MIN_GAP_M = 3.0
    HEADWAY_S = 1.0
    GAP_GAIN = 0.5

    def __init__(self, vehicle_params: dict, target_speed: float = 10.0, noise: float = 0.0,
                 seed: int = 0, speed_gain: float = 0.5):
        super().__init__(seed, noise)
        # kept by reference: CARLA fills in the real car's steering limit and wheelbase at reset
        self.vehicle_params = vehicle_params
        self.target_speed, self.speed_gain = target_speed, speed_gain
        self.last_expert_action: np.ndarray | None = None

    @classmethod
    def for_env(cls, env, noise: float = 0.0, seed: int = 0) -> "ExpertPolicy":
        """The expert at the route's cruise speed, with the backend's vehicle limits."""
        base = env.unwrapped
        return cls(base.vehicle_params, target_speed=base.route.target_speed, noise=noise, seed=seed)

    def act(self, obs: dict, info: dict) -> np.ndarray:
        """The expert's action plus its Gaussian ``noise``, clipped to [-1, 1]. The noise-free
        action stays in ``last_expert_action``: the label collect records for this step."""
        self.last_expert_action = self.expert_action(obs, info)
        return self.with_noise(self.last_expert_action)

    def expert_action(self, obs: dict, info: dict) -> np.ndarray:
        """The noise-free action in this state, float32 ``(2,)``: the label collect records."""
        state = np.asarray(info["state_vector"], dtype=np.float64)
        speed = state[0]
        path = np.concatenate([[[0.0, 0.0]], state[3:3 + 2 * N_WAYPOINTS].reshape(N_WAYPOINTS, 2)])
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(path, axis=0), axis=1))])
        lookahead = float(np.clip(0.6 * abs(speed) + 4.0, 5.0, arc[-1]))
        target = np.array([np.interp(lookahead, arc, path[:, 0]), np.interp(lookahead, arc, path[:, 1])])
        alpha = np.arctan2(target[1], target[0])
        wheelbase = float(self.vehicle_params["wheelbase_m"])
        steer_angle = np.arctan2(2.0 * wheelbase * np.sin(alpha), np.linalg.norm(target))
        steer = steer_angle / float(self.vehicle_params["max_steer_rad"])
        # slow down ahead of sharp bends: the far waypoints' bearing says how much the road turns
        bend = abs(np.arctan2(path[-1, 1], path[-1, 0]))
        wanted = self.target_speed * float(np.clip(1.2 - bend, 0.6, 1.0))
        lead_m = float(info.get("lead_distance_m", np.inf))
        if np.isfinite(lead_m):
            gap = lead_m - self.CAR_LENGTH_M
            wanted_gap = self.MIN_GAP_M + self.HEADWAY_S * max(speed, 0.0)
            following = float(info["lead_speed"]) + self.GAP_GAIN * (gap - wanted_gap)
            wanted = min(wanted, max(following, 0.0))
        throttle = self.speed_gain * (wanted - speed)
        return np.clip([steer, throttle], -1.0, 1.0).astype(np.float32)


class AutopilotPolicy:
    """CARLA's TrafficManager drives the planned route; ``act`` returns the control it applied.

    The TrafficManager decides inside the world tick, so ``act`` runs that tick
    (``env.autopilot_step()``) and the env's next ``step`` returns its transition and ignores the
    action: the dataset records the control that actually moved the car, step for step.
    """

    def __init__(self, env):
        base = env.unwrapped
        if not hasattr(base, "enable_autopilot"):
            raise PipelineError(
                f"--policy autopilot is CARLA's TrafficManager and needs a CARLA route; "
                f"on {base.route.name} use --policy expert")
        base.enable_autopilot()
        self.env = base

    @classmethod
    def for_env(cls, env, noise: float = 0.0, seed: int = 0) -> "AutopilotPolicy":
        if noise > 0:
            raise PipelineError("--noise does not apply to the autopilot (CARLA chooses its controls)")
        return cls(env)

    def reset(self, seed: int | None = None) -> None:
        pass  # the env seeds the TrafficManager at reset

    def act(self, obs: dict, info: dict) -> np.ndarray:
        return self.env.autopilot_step()
