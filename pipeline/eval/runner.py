"""Fixed-route evaluation: drive policies on named routes and seeds, score every episode.

Two entry points:

- :func:`evaluate` is ``pipeline eval``. It checks everything a user can get wrong (routes,
  policies and checkpoints, the simulator server, the output folder) before the first episode and
  before writing anything, runs every (policy, route, seed) episode here or on dask, and writes
  ``report.json``, ``episodes.csv``, ``summary.png``, optional videos and an optional per-step
  ``steps.csv`` (:mod:`.report`).
- :func:`evaluate_policy` runs an in-memory policy or agent in this process and returns the summary
  dict; the training loop calls it every ``--eval-every`` updates.

Policies act without exploration noise, and every episode resets env and policy with its seed, so
the same policy, route and seed give the same numbers, here or on any worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline import __version__
from pipeline.cluster import dask_client, local_workers_for, probe_servers, run_on_servers
from pipeline.envs import Route, carla_render_fps, get_route, list_routes, make_env, resolve_routes
from pipeline.envs.spec import CAMERAS
from pipeline.errors import PipelineError, SimulatorUnavailableError
from pipeline.eval.metrics import (HEADING_INDEX, LANE_HALF_WIDTH_M, LATERAL_INDEX, LEADERBOARD_INFRACTIONS, MIN_KM,
                                   PENALTY, EpisodeMetrics, EpisodeTracker, leaderboard_summary, summarize)
from pipeline.policies import SCRIPTED_POLICIES
from pipeline.progress import ProgressBar

REPORT_FORMAT = "pipeline.eval"
REPORT_VERSION = 1


@dataclass(frozen=True)
class EvalConfig:
    """What ``pipeline eval`` runs. ``policies`` holds "expert", "random" or checkpoint paths."""

    out: str
    policies: tuple[str, ...] = ("expert",)
    routes: tuple[str, ...] = ("racetrack",)
    episodes: int = 5
    seed: int | None = None  # None: the route's own evaluation seeds
    max_steps: int | None = None  # None: the route's step limit
    traffic: int | None = None  # None: the route's traffic
    camera: str | None = None  # scripted policies' camera (None: bev); a checkpoint gets its own
    workers: int = 0  # 0: in this process; N: a local dask cluster of N worker processes
    scheduler: str | None = None  # address of an existing dask scheduler
    video: bool = False  # record the first episode of each policy
    trace: bool = False  # write steps.csv: one row per step of every episode
    simulator: dict = field(default_factory=dict)  # CARLA host/port, used by CARLA routes only
    carla_servers: tuple[tuple[str, int], ...] = ()  # one CARLA server per dask worker (host, port)
    overwrite: bool = False  # replace a report already in ``out``


@dataclass(frozen=True)
class EpisodeTask:
    """One episode to drive; plain data so it travels to dask workers."""

    policy: str
    route: str
    seed: int
    vector_fields: tuple[str, ...] | None = None  # None: all fields (what scripted policies use)
    traffic: int | None = None
    max_steps: int | None = None
    simulator: tuple[tuple[str, object], ...] = ()
    camera: str | None = None
    record_video: bool = False
    record_trace: bool = False

    @property
    def env_key(self) -> tuple:
        """The :func:`_env_for` arguments: episodes with equal keys share one env per process."""
        return (self.route, self.vector_fields, self.traffic, self.max_steps, self.simulator, self.camera)


def episode_seeds(route: Route, episodes: int, seed: int | None = None) -> list[int]:
    """Reset seeds of the ``episodes`` episodes on ``route``: ``seed, seed + 1, ...``, or with
    ``seed=None`` the route's evaluation seeds, continued one by one past the last when more are asked."""
    if seed is not None:
        return [int(seed) + i for i in range(episodes)]
    seeds = list(route.seeds)[:episodes]
    nxt = (max(seeds) + 1) if seeds else 0
    return seeds + list(range(nxt, nxt + episodes - len(seeds)))


# ---------------------------------------------------------------------------------------------
# Envs and policies, built once per process (the driver, or each dask worker) and reused.

_ENVS: dict[tuple, object] = {}
_ENVS_LOCK = threading.Lock()
_POLICIES: dict[tuple, object] = {}


def _simulator_options(route: Route, simulator) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(dict(simulator or {}).items())) if route.backend == "carla" else ()


def _is_carla(route_name: str) -> bool:
    return get_route(route_name).backend == "carla"


def _env_for(route: str, vector_fields, traffic, max_steps, simulator: tuple = (), camera: str | None = None):
    key = (route, vector_fields, traffic, max_steps, simulator, camera)
    with _ENVS_LOCK:  # dask workers may be threads of one process, each with its own server
        if key not in _ENVS:
            if _is_carla(route):  # a CARLA server runs one env at a time: hand it over
                for other in [k for k in _ENVS if k[4] == simulator and _is_carla(k[0])]:
                    with contextlib.suppress(Exception):
                        _ENVS.pop(other).close()
            try:
                _ENVS[key] = make_env(route, vector_fields=vector_fields, traffic=traffic, max_steps=max_steps,
                                      camera=camera, **dict(simulator))
            except SimulatorUnavailableError as exc:
                raise _with_embedded_routes(exc) from None
        return _ENVS[key]


def _with_embedded_routes(exc: SimulatorUnavailableError) -> SimulatorUnavailableError:
    """The backend's message on one line, naming the routes that work without any server."""
    message = " ".join(str(exc).split())
    embedded = [r.name for r in list_routes("embedded")]
    if not all(name in message for name in embedded):
        message += f"; embedded routes that work without a server: {', '.join(embedded)}"
    return SimulatorUnavailableError(message)


def close_envs() -> None:
    """Close every env this process built for evaluation (and forget their policies)."""
    while _ENVS:
        _, env = _ENVS.popitem()
        with contextlib.suppress(Exception):  # closing must never hide the error that got us here
            env.close()
    _POLICIES.clear()


class EpisodeRun(NamedTuple):
    """What driving one episode gives: its metrics, and what was asked to be recorded."""

    metrics: EpisodeMetrics
    frames: np.ndarray | None = None  # uint8 (T + 1, H, W): the newest camera frame of every observation
    steps: list[dict] | None = None  # one TRACE_FIELDS row per step


#: Columns of ``steps.csv`` (``pipeline eval --trace``), one row per step: the action taken, the
#: step's reward, and the state after it (speed m/s, route completion %, lateral offset m and
#: heading error rad from the route, distance m to the car ahead in the lane (empty when none), the
#: infraction flags, and the ending on the last step).
TRACE_FIELDS = ("step", "steer", "throttle_brake", "reward", "speed", "route_completion", "lateral_offset",
                "heading_error", "lead_distance_m", "collision", "off_route", "red_light", "stop_sign", "termination")


def trace_row(step: int, action, reward: float, info: dict) -> dict:
    """One ``steps.csv`` row (:data:`TRACE_FIELDS`) from a step's action, reward and info."""
    state = info.get("state_vector")
    lead = info.get("lead_distance_m")
    return {
        "step": step, "steer": float(action[0]), "throttle_brake": float(action[1]), "reward": float(reward),
        "speed": float(info["speed"]), "route_completion": 100.0 * float(info["route_completion"]),
        "lateral_offset": None if state is None else float(state[LATERAL_INDEX]),
        "heading_error": None if state is None else float(state[HEADING_INDEX]),
        "lead_distance_m": float(lead) if lead is not None and np.isfinite(lead) else None,
        "collision": bool(info["collision"]), "off_route": bool(info["off_route"]),
        "red_light": bool(info.get("red_light", False)), "stop_sign": bool(info.get("stop_sign", False)),
        "termination": info.get("termination") or "",
    }


def drive_episode(env, policy, seed: int, record_video: bool = False, record_trace: bool = False) -> EpisodeRun:
    """Drive one episode of ``env`` with ``policy`` (``reset(seed)`` + ``act(obs, info)``).

    Returns the episode's metrics, with ``record_video`` the newest camera frame of every
    observation, and with ``record_trace`` one :func:`trace_row` per step."""
    if hasattr(policy, "reset"):
        policy.reset(seed)
    obs, info = env.reset(seed=int(seed))
    tracker = EpisodeTracker(env.unwrapped.route.name, seed)
    tracker.reset(info)
    frames = [obs["image"][-1]] if record_video else None
    steps = [] if record_trace else None
    while True:
        action = policy.act(obs, info)
        obs, reward, terminated, truncated, info = env.step(action)
        tracker.step(reward, info)
        if frames is not None:
            frames.append(obs["image"][-1])
        if steps is not None:
            steps.append(trace_row(len(steps), action, reward, info))
        if terminated or truncated:
            return EpisodeRun(tracker.finish(), None if frames is None else np.stack(frames), steps)


def run_task(task: EpisodeTask) -> EpisodeRun:
    """Drive one :class:`EpisodeTask` on whatever process runs it."""
    from pipeline.policies import make_policy

    env = _env_for(*task.env_key)
    policy_key = (task.policy, task.env_key)
    if policy_key not in _POLICIES:
        _POLICIES[policy_key] = make_policy(task.policy, env)
    return drive_episode(env, _POLICIES[policy_key], task.seed, task.record_video, task.record_trace)


def run_task_on(task: EpisodeTask, server: dict) -> EpisodeRun:
    """:func:`run_task` on one server of ``--carla-servers`` (``server``: host, port, tm_port)."""
    simulator = tuple(sorted({**dict(task.simulator), **server}.items()))
    return run_task(replace(task, simulator=simulator))


def _describe(task: EpisodeTask) -> str:
    return f"the episode of {task.policy} on {task.route} seed {task.seed}"


# ---------------------------------------------------------------------------------------------
# In-process evaluation for the training loop.

def evaluate_policy(policy, routes=("racetrack",), episodes: int = 1, seed: int | None = 0,
                    max_steps: int | None = None, traffic: int | None = None,
                    simulator: dict | None = None) -> dict:
    """Evaluate ``policy`` on ``routes`` in this process and return its summary.

    ``policy`` is a TD3 agent (anything with ``select_action(obs, noise)`` and ``obs_spec``; it acts
    without noise, and the env gives it the vector fields and traffic it was trained with, so the
    numbers track training conditions) or a policy with ``act(obs, info)`` and ``reset(seed)``.
    Envs are built once per process and reused across calls. ``traffic`` (when the policy has no
    ``obs_spec``) and ``max_steps`` default to each route's own.

    Returns :func:`~pipeline.eval.metrics.summarize` over all episodes (float keys such as
    ``route_completion``, ``driving_score``, ``infractions_per_km``, ``episode_return``, ready to
    log), plus ``by_route``: route name -> the same summary for that route's episodes.
    """
    from pipeline.policies import AgentPolicy

    if not hasattr(policy, "act"):
        policy = AgentPolicy(policy)
    spec = getattr(policy, "obs_spec", None)
    vector_fields = tuple(spec.vector_fields) if spec is not None else None
    camera = _camera_of(spec)
    if traffic is None and spec is not None:
        traffic = spec.traffic
    by_route: dict[str, list[EpisodeMetrics]] = {}
    for name in ([routes] if isinstance(routes, str) else routes):
        route = get_route(name)
        env = _env_for(route.name, vector_fields, traffic, max_steps, _simulator_options(route, simulator), camera)
        by_route[route.name] = [drive_episode(env, policy, s).metrics for s in episode_seeds(route, episodes, seed)]
    summary = summarize([m for ms in by_route.values() for m in ms])
    summary["by_route"] = {name: summarize(ms) for name, ms in by_route.items()}
    return summary


evaluate_agent = evaluate_policy  # the name the training loop imports


# ---------------------------------------------------------------------------------------------
# `pipeline eval`

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _camera_of(spec) -> str | None:
    """The camera an agent of ``spec`` needs; None (the default) for one made before cameras were
    recorded, which the checkpoint policy then refuses naming both cameras."""
    return spec.camera if spec is not None and spec.camera in CAMERAS else None


def describe_policy(name: str) -> dict:
    """Report metadata of a policy; a checkpoint is loaded once here so a bad file fails early.

    ``vector_fields`` is what the policy's env must give (None: all fields)."""
    if name in SCRIPTED_POLICIES:
        return {"label": name, "kind": "scripted", "name": name, "vector_fields": None, "camera": None}
    from pipeline.policies import load_agent

    agent = load_agent(name)
    return {
        "label": name,
        "kind": "checkpoint",
        "path": str(Path(name).resolve()),
        "sha256": _sha256(Path(name)),
        "num_updates": agent.num_updates,
        "obs_spec": agent.obs_spec.to_dict(),
        "td3_config": asdict(agent.config),
        "vector_fields": tuple(agent.obs_spec.vector_fields),
        "camera": _camera_of(agent.obs_spec),
    }


def _prepare_out(out: str) -> Path:
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise PipelineError(f"cannot write the evaluation report to {path}: {exc.strerror or exc}") from None
    return path


def _run_tasks(tasks: list[EpisodeTask], config: EvalConfig, progress: bool, events: list[str]) -> list:
    """Results of ``tasks`` in task order, whatever order they finish in. Lines about CARLA servers
    lost on the way are printed and added to ``events``."""
    results: list = [None] * len(tasks)
    with _progress(progress, len(tasks)) as advance:
        if config.carla_servers:
            def notify(line: str) -> None:
                events.append(line)
                print(f"warning: {line}", file=sys.stderr, flush=True)

            servers = list(config.carla_servers)
            with dask_client(local_workers_for(servers, config.workers, config.scheduler), config.scheduler) as client:
                try:
                    for i, result in run_on_servers(
                            client, servers, tasks, run_task_on, describe=_describe, notify=notify,
                            is_lost_server=lambda exc: isinstance(exc, SimulatorUnavailableError)):
                        results[i] = result
                        advance(result.metrics)
                finally:
                    with contextlib.suppress(Exception):  # a worker that died has nothing left to close
                        client.run(close_envs)  # every worker hands its server back
        elif config.workers or config.scheduler:
            from dask.distributed import as_completed

            with dask_client(config.workers, config.scheduler) as client:
                futures = client.map(run_task, tasks, pure=False)
                index = {future.key: i for i, future in enumerate(futures)}
                for future in as_completed(futures):
                    results[index[future.key]] = future.result()
                    advance(results[index[future.key]].metrics)
        else:
            for i, task in enumerate(tasks):
                results[i] = run_task(task)
                advance(results[i].metrics)
    return results


@contextlib.contextmanager
def _progress(enabled: bool, total: int):
    """Yields ``advance(metrics)``: a rich progress bar of episodes, or a no-op."""
    with ProgressBar(enabled, "[bold]eval", total, unit="episodes", fields={"last": ""},
                     template="{task.fields[last]}") as bar:

        def advance(m: EpisodeMetrics) -> None:
            bar.advance(1, last=f"{m.route} seed {m.seed}: RC {m.route_completion:.0f}%, "
                                f"DS {m.driving_score:.1f}, {m.termination}")

        yield advance


def _check_simulators(tasks: list[EpisodeTask], config: EvalConfig) -> dict[str, float]:
    """Fail before anything is written when a simulator is missing; returns each route's video fps.

    Embedded envs are built here (cheap, and reused), and without ``--carla-servers`` the first
    CARLA route's env too (which also checks the server); with them, each server is only asked
    whether it answers: the workers build the envs."""
    if config.carla_servers:
        probe_servers(list(config.carla_servers), config.simulator)
    fps = {}
    for task in tasks:
        if _is_carla(task.route):
            # one env per server: the first CARLA route's env is built here, the others in turn
            if not config.carla_servers and not any(_is_carla(route) for route in fps):
                _env_for(*task.env_key)
            fps[task.route] = carla_render_fps()
        else:
            fps[task.route] = float(_env_for(*task.env_key).unwrapped.metadata.get("render_fps", 10))
    return fps


def route_list(specs) -> list[Route]:
    """The routes that ``--route`` options name (a route file gives all its routes), each once.
    Unknown names fail with the list of known ones."""
    routes: dict[str, Route] = {}
    for spec in dict.fromkeys(specs):
        for route in resolve_routes(spec):
            routes.setdefault(route.name, route)
    return list(routes.values())


def scoring_conventions() -> dict:
    """The pinned scoring rules, stored in every report so numbers stay interpretable."""
    return {
        "standard": "CARLA Leaderboard 1.0",
        "driving_score": "route_completion (0-100) x infraction_penalty, averaged over episodes",
        "penalty_per_event": PENALTY,
        "off_route": "penalty x (1 - off_route_share); share = fraction of steps off route or "
                     f"|lateral offset| > {LANE_HALF_WIDTH_M} m",
        "per_km": f"counts / km driven along the route (progress), km floored at {MIN_KM}",
        "leaderboard": "summary[policy]['leaderboard']: driving score, route completion and penalty are "
                       "means over routes of per-route means; infractions per km by Leaderboard kind "
                       f"({', '.join(LEADERBOARD_INFRACTIONS)}) are totals / total km",
    }


def _checked_routes(config: EvalConfig) -> list[Route]:
    """The routes ``config`` drives, once its options are known to make a run (else one line)."""
    if config.episodes <= 0:
        raise PipelineError(f"--episodes must be a positive number, got {config.episodes}")
    if config.workers < 0:
        raise PipelineError(f"--workers must be >= 0, got {config.workers}")
    if config.max_steps is not None and config.max_steps <= 0:
        raise PipelineError(f"--max-steps must be a positive number, got {config.max_steps}")
    if not config.policies:
        raise PipelineError("nothing to evaluate: give --checkpoint PATH or --policy expert|random")
    routes = route_list(config.routes)
    if config.carla_servers and any(r.backend != "carla" for r in routes):
        raise PipelineError("--carla-servers is for CARLA routes; evaluate embedded routes in another run")
    if (config.workers > 1 or config.scheduler) and any(r.backend == "carla" for r in routes) \
            and not config.carla_servers:
        raise PipelineError("CARLA routes run one episode at a time on one server; drop --workers/--scheduler "
                            "or give one server per worker with --carla-servers")
    return routes


def evaluate(config: EvalConfig, progress: bool = True) -> dict:
    """Run ``pipeline eval``: returns the report dict (also written to ``config.out``)."""
    from pipeline.eval import report as report_files

    routes = _checked_routes(config)
    policies = [describe_policy(name) for name in dict.fromkeys(config.policies)]
    if (Path(config.out) / "report.json").exists() and not config.overwrite:
        raise PipelineError(f"{config.out} already holds an evaluation report; pass --overwrite to "
                            "replace it, or choose another --out")

    tasks = []
    for p in policies:
        for r_index, route in enumerate(routes):
            for s_index, seed in enumerate(episode_seeds(route, config.episodes, config.seed)):
                tasks.append(EpisodeTask(
                    policy=p["label"], route=route.name, seed=seed, vector_fields=p["vector_fields"],
                    camera=p["camera"] if p["kind"] == "checkpoint" else config.camera,
                    traffic=config.traffic, max_steps=config.max_steps,
                    simulator=_simulator_options(route, config.simulator),
                    record_video=config.video and r_index == 0 and s_index == 0, record_trace=config.trace))
    started = time.perf_counter()
    try:
        fps = _check_simulators(tasks, config)
        out = _prepare_out(config.out)
        server_events: list[str] = []
        results = _run_tasks(tasks, config, progress, server_events)
    finally:
        close_envs()

    report = {
        "format": REPORT_FORMAT,
        "format_version": REPORT_VERSION,
        "software_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "elapsed_s": time.perf_counter() - started,
        # not asdict(config): it would deep-copy the simulator options (a test's client factory)
        "config": {**{f.name: getattr(config, f.name) for f in fields(config) if f.name != "simulator"},
                   "seeds": {r.name: episode_seeds(r, config.episodes, config.seed) for r in routes}},
        "scoring": scoring_conventions(),
        "routes": {r.name: asdict(r) for r in routes},
        "policies": [{k: v for k, v in p.items() if k not in ("vector_fields", "camera")} for p in policies],
        "carla_servers": [f"{host}:{port}" for host, port in config.carla_servers],
        "server_events": server_events,  # CARLA servers lost during the run; their episodes ran again
        "summary": {},
        "episodes": [],
    }
    for p in policies:
        mine = [r.metrics for t, r in zip(tasks, results) if t.policy == p["label"]]
        by_route = {r.name: [m for m in mine if m.route == r.name] for r in routes}
        report["summary"][p["label"]] = {
            "overall": summarize(mine),
            "by_route": {name: summarize(ms) for name, ms in by_route.items()},
            "leaderboard": leaderboard_summary(by_route),
        }
        report["episodes"] += [{"policy": p["label"], **m.to_dict()} for m in mine]
    videos = {t.policy: (r.frames, fps[t.route]) for t, r in zip(tasks, results) if r.frames is not None}
    steps = [{"policy": t.policy, "route": t.route, "seed": t.seed, **row}
             for t, r in zip(tasks, results) for row in r.steps] if config.trace else None
    report["files"] = report_files.write_all(report, out, videos, steps)
    return report
