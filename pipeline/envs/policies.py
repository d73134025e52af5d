"""Scripted drivers for collecting data and as evaluation baselines.

A policy is ``act(obs, info) -> action`` with ``reset(seed)`` between episodes. The expert is
privileged: it reads ``info["state_vector"]`` (the full 23-field vector, whatever the observation
spec hides), so it drives the same way on every backend and with any ``vector_fields``.
"""

from __future__ import annotations

import numpy as np

from pipeline.envs.spec import N_WAYPOINTS
from pipeline.errors import PipelineError

SCRIPTED_POLICIES = ("expert", "random", "autopilot")


class RandomPolicy:
    """Uniform random actions in [-1, 1]^2, seeded per episode."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: dict, info: dict) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=2).astype(np.float32)


class ExpertPolicy:
    """Pure pursuit on the route waypoints plus a proportional speed controller.

    Steering: aim at the route point ``lookahead`` metres ahead (in the ego frame) and turn with the
    bicycle-model angle ``atan(2 L sin(alpha) / lookahead)``, normalised by the backend's maximum
    steering angle. Speed: throttle/brake proportional to the error to ``target_speed``, easing off
    in curves. ``noise`` adds Gaussian action noise so datasets cover recoveries, not one line.
    """

    def __init__(self, vehicle_params: dict, target_speed: float = 10.0, noise: float = 0.0,
                 seed: int = 0, speed_gain: float = 0.5):
        # kept by reference: CARLA fills in the real car's steering limit and wheelbase at reset
        self.vehicle_params = vehicle_params
        self.target_speed, self.noise, self.speed_gain = target_speed, noise, speed_gain
        self.rng = np.random.default_rng(seed)

    def reset(self, seed: int | None = None) -> None:
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: dict, info: dict) -> np.ndarray:
        """The expert's action plus its Gaussian ``noise``, clipped to [-1, 1]."""
        action = self.expert_action(obs, info)
        if self.noise > 0:
            action = np.clip(action + self.rng.normal(0.0, self.noise, size=2), -1.0, 1.0)
        return action.astype(np.float32)

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

    def reset(self, seed: int | None = None) -> None:
        pass  # the env seeds the TrafficManager at reset

    def act(self, obs: dict, info: dict) -> np.ndarray:
        return self.env.autopilot_step()


def make_scripted_policy(name: str, env, noise: float = 0.0, seed: int = 0):
    """``"expert"``, ``"random"`` or ``"autopilot"`` (CARLA only) for ``env`` (reads the route's
    cruise speed and vehicle limits)."""
    if name == "autopilot":
        if noise > 0:
            raise PipelineError("--noise does not apply to the autopilot (CARLA chooses its controls)")
        return AutopilotPolicy(env)
    if name == "random":
        return RandomPolicy(seed)
    if name == "expert":
        base = env.unwrapped
        return ExpertPolicy(base.vehicle_params, target_speed=base.route.target_speed, noise=noise, seed=seed)
    raise PipelineError(f"unknown policy {name!r}; choose from {', '.join(SCRIPTED_POLICIES)} or a checkpoint path")
