"""``pipeline train``: end-to-end TD3 from a dataset on disk, mixed with fresh online rollouts.

The whole loop, top to bottom:

1. open the dataset (if any), rebuild the env from its recorded route and observation spec;
2. build the TD3 agent (vector normalisation from the dataset, or from warm-up steps) and the
   :class:`~pipeline.datasets.replay.DictReplayBuffer` (offline store + online ring, written to
   ``<out>/online.zarr`` so fresh rollouts become data too);
3. repeat: every ``online_every`` updates the current actor (with exploration noise) drives
   ``online_steps`` env steps into the online source; sample a batch; ``agent.update(batch)``;
   log; checkpoint every ``checkpoint_every``; evaluate on fixed seeds every ``eval_every``.

Checkpoint selection: with ``eval_every`` the deterministic policy is scored on validation seeds
(``eval_seed``, :data:`~pipeline.eval.seeds.VALIDATION_SEED` and up), and ``best.pt`` is the
checkpoint that scored best there so far (mean route completion, then driving score; a tie goes to
the later one). Those seeds are kept apart from ``pipeline eval``'s (0 and up), so that choosing a
checkpoint does not see the test.

Checkpoints (``last.pt``, ``best.pt``, ``step_<n>.pt``) hold the agent's state dict plus the loop's
counters and RNG states, written atomically and read with ``weights_only=True``; ``resume`` continues the run.
Ctrl-C writes ``last.pt`` before exiting.

Resume: the online ring is refilled from ``<out>/online.zarr``, the rollouts continue on the
``online_every`` schedule from the saved counters, and metrics logged after the checkpoint's update
(by a run killed later) are dropped. Learner options (:data:`LEARNER_OPTIONS`) not given take the run's
values; given ones that differ are refused, all named in one line: a run is one experiment. ``steps``, logging, checkpoint,
evaluation, device and replay-memory options may change. A run folder without a checkpoint (a run
killed before its first) is reused by a new run; stale checkpoint temp files are removed on start.

Defaults by device (:data:`DEVICE_DEFAULTS`): ``steps``, ``batch_size`` and ``bf16`` left ``None`` take
the device's values, sized so the README's quick start finishes in minutes on a 2-core CPU.
``bc_alpha`` left ``None`` is :data:`DATA_BC_ALPHA` (TD3+BC) when batches hold dataset rows, else 0.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.eval.seeds import VALIDATION_SEED
from pipeline.interrupts import save_despite_an_interrupt
from pipeline.progress import ProgressBar

if TYPE_CHECKING:  # for annotations only; the functions import them where they are used
    from pipeline.datasets.replay import DictReplayBuffer
    from pipeline.train.td3 import TD3Agent


@dataclass
class TrainConfig:
    out: str
    data: str | None = None  # dataset store path/URL; None = pure online
    data_cache: str | None = None  # local folder caching a remote dataset's chunks
    route: str | None = None  # default: the dataset's route, else racetrack
    steps: int | None = None  # gradient updates; None: the device's default (DEVICE_DEFAULTS)
    batch_size: int | None = None  # None: the device's default
    online_mix: float = 0.5  # share of each batch from fresh rollouts (forced to 1 without data)
    online_every: int = 50  # updates between rollout chunks; 0 disables online rollouts
    online_steps: int | None = None  # env steps per rollout chunk (default: online_every -> 1 step/update)
    exploration_noise: float = 0.1
    warmup_steps: int = 1_000  # random-action env steps before learning, when there is no data
    online_capacity: int = 100_000
    replay_memory: str = "4GiB"  # RAM budget for the offline frames
    n_step: int = 3
    gamma: float = 0.99
    encoder_update: str = "critic"
    lr: float = 3e-4  # Adam learning rate of actor and critic
    encoder_lr: float = 3e-4  # Adam learning rate of the CNN
    encoder_head: str = "relu"  # the CNN's last layer: relu, or layernorm (LayerNorm + tanh)
    bc_alpha: float | None = None  # TD3+BC alpha; None: DATA_BC_ALPHA with --data, else 0
    prediction_weight: float = 0.0  # the self-predictive loss on the CNN (TD3Config); 0: off
    augment: bool = True
    device: str = "auto"
    compile: bool = False
    bf16: bool | None = None  # the CNN's convolutions in bf16 (TD3Config.amp); None: DEVICE_DEFAULTS
    seed: int = 0
    checkpoint_every: int = 10_000
    eval_every: int = 0  # 0 disables periodic evaluation
    eval_episodes: int = 2
    eval_seed: int = VALIDATION_SEED  # periodic evaluation on seeds eval_seed, eval_seed + 1, ...
    log_every: int = 100
    vector_fields: str | None = None  # only without --data (the dataset's spec wins)
    traffic: int | None = None
    camera: str | None = None  # only without --data; None: bev
    resume: bool = False
    # The options the user gave (the CLI passes them); on resume the other learner options take the
    # run's values. None (library callers): every learner option must match the run's.
    given: tuple[str, ...] | None = None
    simulator: dict = field(default_factory=dict)  # backend options (CARLA host/port)
    verify: bool = True  # check each dataset chunk read against its recorded checksum


# Host memory one batch row costs a CPU update, all copies included (prefetched uint8 stacks,
# float32 images, augmentation, CNN activations kept for backward): measured with `train
# --online-mix 0 --steps 3`, peak RSS grew 0.8 MiB per row between batch 128 and 1024.
_CPU_BYTES_PER_BATCH_ROW = 1 << 20


def validate_train_config(config: TrainConfig) -> None:
    """Refuse options that cannot make a run, naming the option, before anything is opened or
    written (so a refused command leaves no folder behind)."""
    from pipeline.datasets.replay import parse_bytes

    positive = {"--steps": config.steps, "--batch-size": config.batch_size,
                "--checkpoint-every": config.checkpoint_every, "--log-every": config.log_every,
                "--n-step": config.n_step, "--online-steps": 1 if config.online_steps is None else config.online_steps}
    at_least_zero = {"--online-every": config.online_every, "--warmup-steps": config.warmup_steps,
                     "--online-capacity": config.online_capacity, "--eval-every": config.eval_every,
                     "--eval-episodes": config.eval_episodes, "--eval-seed": config.eval_seed,
                     "--exploration-noise": config.exploration_noise,
                     "--bc-alpha": 0.0 if config.bc_alpha is None else config.bc_alpha,
                     "--prediction-weight": config.prediction_weight}
    for name, value in positive.items():  # None: the device's default, filled in later
        if value is not None and value < 1:
            raise PipelineError(f"{name} must be at least 1, got {value}")
    for name, value in at_least_zero.items():
        if value < 0:
            raise PipelineError(f"{name} must be 0 or more, got {value}")
    if config.prediction_weight > 0 and config.encoder_update == "frozen":
        raise PipelineError("--prediction-weight trains the CNN, and --encoder-update frozen never does: "
                            "drop one of them")
    if not 0.0 <= config.online_mix <= 1.0:
        raise PipelineError(f"--online-mix must be within [0, 1], got {config.online_mix}")
    if not 0.0 < config.gamma <= 1.0:
        raise PipelineError(f"--gamma must be in (0, 1], got {config.gamma}")
    for name, value in {"--lr": config.lr, "--encoder-lr": config.encoder_lr}.items():
        if not value > 0.0:
            raise PipelineError(f"{name} must be above 0, got {value}")
    try:
        parse_bytes(config.replay_memory)
    except PipelineError:
        raise PipelineError(f"--replay-memory must be a positive size such as 4GiB or 500MB, "
                            f"got {config.replay_memory!r}") from None
    if config.eval_every and not config.eval_episodes:
        raise PipelineError(f"--eval-every {config.eval_every} with --eval-episodes 0 evaluates nothing; "
                            "give --eval-episodes 1 or more, or --eval-every 0")
    if config.data is not None and config.online_mix > 0 and not config.online_every:
        raise PipelineError(f"--online-mix {config.online_mix} needs rollouts, which --online-every 0 turns off; "
                            "pass --online-mix 0 for pure offline training")
    online = config.online_every > 0 and (config.data is None or config.online_mix > 0)
    if online and not config.online_capacity:
        raise PipelineError(f"--online-capacity 0 leaves no room for the rollouts of --online-mix "
                            f"{config.online_mix}; give a capacity, or --online-mix 0 for pure offline")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file; give a folder for the run")


def check_train_data(config: TrainConfig, store) -> None:
    """Refuse a dataset the run cannot sample from, and a batch that cannot fit in memory,
    before anything is written. ``store``: the opened dataset, or None (pure online)."""
    import psutil

    if store is not None and store.num_episodes == 0:
        raise PipelineError(f"{store.url} holds no committed episodes; record some with "
                            f"`pipeline collect --resume --out {store.url}`, or train without --data")
    if store is not None and config.online_mix < 1 and config.batch_size > store.num_transitions:
        raise PipelineError(f"--batch-size {config.batch_size} is larger than the {store.num_transitions} "
                            f"transitions in {store.url}; use a smaller batch")
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        need = config.batch_size * _CPU_BYTES_PER_BATCH_ROW
        available = psutil.virtual_memory().available
        if need > available:
            raise PipelineError(f"--batch-size {config.batch_size} needs about {need / 2**30:.1f} GiB of RAM "
                                f"for its updates, {available / 2**30:.1f} GiB is available; use a smaller batch")


# Per device type: (gradient updates, batch size) for options left None. CUDA keeps the issue-#9
# protocol. On CPU an update at batch 256 took 0.3-1.7 s on the 2-core machine (100k updates: 8-46
# hours); batch 64 and a few thousand updates fit the quick start into minutes (README, Train).
# bf16 convolutions wherever the device has native bf16 (TD3Agent checks): on a 2-core AMD EPYC with
# AVX512-BF16 the quick start reached >= 90% on held-out seeds in 5 of 5 training seeds with them,
# as in fp32, at 3,000 updates, with 1.37x the updates/s at one thread
# (benchmarks/results/quickstart-cpu.md, 2026-12-07). A CPU without native bf16 runs fp32.
DEVICE_DEFAULTS = {"cuda": {"steps": 100_000, "batch_size": 256, "bf16": True},
                   "cpu": {"steps": 3_000, "batch_size": 64, "bf16": True}}

# Options that define what a run learns: a resumed run must keep them (TrainConfig field -> flag).
LEARNER_OPTIONS = {
    "data": "--data", "route": "--route", "batch_size": "--batch-size", "online_mix": "--online-mix",
    "online_every": "--online-every", "online_steps": "--online-steps", "exploration_noise": "--exploration-noise",
    "warmup_steps": "--warmup-steps", "online_capacity": "--online-capacity", "n_step": "--n-step",
    "gamma": "--gamma", "encoder_update": "--encoder-update", "lr": "--lr",
    "encoder_lr": "--encoder-lr", "encoder_head": "--encoder-head", "bc_alpha": "--bc-alpha", "augment": "--no-augment",
    "prediction_weight": "--prediction-weight",
    "seed": "--seed", "vector_fields": "--vector-fields", "traffic": "--traffic", "camera": "--camera",
    "bf16": "--bf16/--no-bf16",  # a resumed run keeps its CNN's precision
}

# What a run writes into its folder besides checkpoints: a folder holding only these (a run killed
# before its first checkpoint) may be reused. Checkpoint temp files are ".<name>.pt.tmp<pid>".
_RUN_LEFTOVERS = ("online.zarr", "metrics.csv", "metrics.csv.tmp", "tensorboard", "config.json")
_CHECKPOINT_TEMP = ".*.pt.tmp*"


# TD3+BC weight when the batches hold dataset rows and --bc-alpha is not given. Chosen on CPU
# (benchmarks/results/quickstart-cpu.md, 2026-12-03): over 5 training seeds of the quick start,
# 3,000 updates reached >= 90% route completion on held-out seeds (100-109) in 5 of 5 with 2.5,
# in 2 of 5 without (4 of 5 at 6,000). The BC term acts on dataset rows only.
DATA_BC_ALPHA = 2.5


def device_defaults(config: TrainConfig, device_type: str) -> TrainConfig:
    """``config`` with its ``None`` options filled in: steps/batch size/bf16 from
    ``DEVICE_DEFAULTS[device_type]``; ``bc_alpha`` :data:`DATA_BC_ALPHA` when batches hold dataset
    rows (``data`` given, ``online_mix < 1``), else 0."""
    defaults = dict(DEVICE_DEFAULTS["cuda" if device_type == "cuda" else "cpu"])
    defaults["bc_alpha"] = DATA_BC_ALPHA if config.data is not None and config.online_mix < 1 else 0.0
    return replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})


def _checkpoints(out: Path) -> list[Path]:
    return [p for p in (out / "last.pt", *out.glob("step_*.pt")) if p.is_file()]


def _resume_checkpoint(out: Path) -> Path | None:
    """``last.pt``, else the newest ``step_<n>.pt`` (a kill between writing the two), else None."""
    if (out / "last.pt").is_file():
        return out / "last.pt"
    steps = [p for p in out.glob("step_*.pt") if p.is_file() and p.stem[5:].isdigit()]
    return max(steps, key=lambda p: int(p.stem[5:]), default=None)


def _check_run_folder(out: Path, resume: bool) -> None:
    """Refuse an --out that cannot hold this run (before anything is opened or written)."""
    if out.exists() and not out.is_dir():
        raise PipelineError(f"--out {out} is a file, not a run folder")
    if resume:
        if not out.is_dir() or _resume_checkpoint(out) is None:
            raise PipelineError(f"nothing to resume: {out} holds no checkpoint; run without --resume to start over")
        return
    if not out.exists():
        return
    if _checkpoints(out):
        raise PipelineError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in _RUN_LEFTOVERS and not p.match(_CHECKPOINT_TEMP))
    if foreign:
        raise PipelineError(f"{out} is not empty and not a run folder (it holds {foreign[0]}); choose another --out")


def _clear_leftovers(out: Path, resume: bool) -> None:
    """Remove checkpoint temp files of killed writes and, for a new run in a reused folder (no
    checkpoint, see :func:`_check_run_folder`), what the killed run left."""
    for tmp in out.glob(_CHECKPOINT_TEMP):
        tmp.unlink(missing_ok=True)
    if resume:
        return
    for name in _RUN_LEFTOVERS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _check_resume_options(saved: dict, config: TrainConfig, last: Path) -> TrainConfig:
    """``config`` for resuming the run whose saved config is ``saved``: learner options not in
    ``config.given`` and ``None`` steps/batch size/bc_alpha/bf16 take the run's values; a given learner option
    that differs is a :class:`PipelineError` naming each."""
    unset = [k for k in LEARNER_OPTIONS if config.given is not None and k not in config.given]
    unset += [k for k in ("steps", "batch_size", "bc_alpha", "bf16") if getattr(config, k) is None]
    filled = replace(config, **{k: saved[k] for k in unset if k in saved and saved[k] is not None})
    now = json.loads(json.dumps(asdict(filled), default=str))  # compared as saved: JSON values

    def shown(value):
        return "unset" if value is None else value

    changed = [f"{flag} {shown(now[name])} (the run has {shown(saved[name])})"
               for name, flag in LEARNER_OPTIONS.items() if name in saved and now[name] != saved[name]]
    if changed:
        raise PipelineError(f"--resume keeps the learner options of {last}; changed: {', '.join(changed)}; "
                            "drop them, or start a new run with another --out")
    return filled


class RolloutWorker:
    """Drives the env with the current actor and feeds every transition to the replay buffer."""

    def __init__(self, env, replay, seed: int):
        self.env, self.replay = env, replay
        self.episode_seed = seed
        self.episodes = 0
        self.env_steps = 0
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.recent_completions: deque[float] = deque(maxlen=20)
        self._new_episode()

    def _new_episode(self) -> None:
        self.obs, self.info = self.env.reset(seed=self.episode_seed)
        self.episode_seed += 1
        self.episode_return = 0.0

    def run(self, steps: int, act) -> list[dict]:
        """Drive ``steps`` env steps with ``act(obs) -> action``; returns finished episodes' stats."""
        finished = []
        for _ in range(steps):
            action = act(self.obs)
            next_obs, reward, terminated, truncated, info = self.env.step(action)
            self.replay.add(self.obs, action, reward, next_obs, terminated, truncated, info)
            self.episode_return += reward
            self.env_steps += 1
            self.obs, self.info = next_obs, info
            if terminated or truncated:
                self.episodes += 1
                self.recent_returns.append(self.episode_return)
                self.recent_completions.append(float(info["route_completion"]))
                finished.append({"return": self.episode_return, "route_completion": info["route_completion"],
                                 "termination": info["termination"]})
                self._new_episode()
        return finished

    def state(self) -> dict:
        return {"episode_seed": self.episode_seed, "episodes": self.episodes, "env_steps": self.env_steps}


class MetricsLog:
    """TensorBoard scalars plus ``metrics.csv`` (one row per log step, columns grow as keys appear).

    ``resume_update``: a resumed run keeps the history up to its checkpoint's update and drops what
    a run killed after that checkpoint logged, which the resumed run logs again."""

    def __init__(self, out: Path, resume_update: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resume_update is None else resume_update + 1
        self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge)
        self.csv_path = out / "metrics.csv"
        self.rows: list[dict] = []
        if resume_update is not None and self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                self.rows = [row for row in csv.DictReader(f) if int(row["update"]) <= resume_update]

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, step)
        self.rows.append({"update": step, **scalars})
        columns = list(dict.fromkeys(k for row in self.rows for k in row))
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.csv_path)

    def close(self) -> None:
        self.tb.close()


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": json.dumps(np.random.get_state(legacy=False), default=lambda a: a.tolist()),
        "python": json.dumps(random.getstate()),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = json.loads(state["numpy"])
    np.random.set_state(np_state)
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _open_dataset(config: TrainConfig):
    from pipeline.datasets.store import TransitionStore

    if config.data is None:
        return None
    return TransitionStore(config.data, cache=config.data_cache, verify=config.verify)


def _route_for(config: TrainConfig, store) -> str:
    """--route, else the dataset's (first) route, else racetrack."""
    from pipeline.envs import resolve_routes

    route = config.route or (list(store.routes)[0] if store is not None else "racetrack")
    if config.eval_every and resolve_routes(route)[0].backend == "carla":
        raise PipelineError("--eval-every needs a second env, and a CARLA server runs one at a time; "
                            "evaluate the checkpoints with `pipeline eval` instead")
    return route


def _env_for(config: TrainConfig, store, route: str):
    """Rebuild the env for ``route`` with the dataset's obs spec (or the options without data)."""
    from pipeline.envs import make_env, resolve_routes
    from pipeline.envs.spec import CAMERAS

    simulator = config.simulator if resolve_routes(route)[0].backend == "carla" else {}
    if store is None:
        return make_env(route, vector_fields=config.vector_fields, traffic=config.traffic, camera=config.camera,
                        **simulator)
    if config.vector_fields is not None or config.traffic is not None or config.camera is not None:
        raise PipelineError("--vector-fields/--traffic/--camera come from the dataset when --data is given")
    spec = store.obs_spec
    # a store of an unrecorded camera gets the default one here, and the check below refuses it
    camera = spec.camera if spec.camera in CAMERAS else None
    env = make_env(route, vector_fields=spec.vector_fields, traffic=spec.traffic, camera=camera, **simulator)
    env.unwrapped.obs_spec.check_compatible(spec, f"dataset store {store.url} (route {route!r})")
    return env


def _warn_if_rewards_differ(store, reward: dict, online: bool) -> None:
    """Offline returns of another reward definition next to fresh online ones: say so, once."""
    from pipeline.envs.driving import reward_difference

    difference = reward_difference(store.reward_definition, reward) if store is not None and online else None
    if difference:
        print(f"warning: {store.url} was recorded with another reward than the env's ({difference}); "
              "its returns and the online ones are mixed in every batch", file=sys.stderr)


def _vector_stats(store, env, warmup: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-field mean/std of the state vector: from the dataset, else from warm-up observations."""
    if store is not None and store.num_observations > 0:
        vectors = np.asarray(store.vector[: store.num_observations], dtype=np.float64)
    elif warmup:
        vectors = np.stack(warmup).astype(np.float64)
    else:
        dim = env.unwrapped.obs_spec.vector_dim
        return np.zeros(dim, np.float32), np.ones(dim, np.float32)
    # raw std: the Encoder applies the one floor for near-constant fields (networks.MIN_VECTOR_STD)
    return vectors.mean(0).astype(np.float32), vectors.std(0).astype(np.float32)


@dataclass
class _Run:
    """What the training loop drives: built by :func:`_open_run`, for a new run or a resumed one."""

    config: TrainConfig  # with the device's defaults (and, resumed, the run's learner options)
    out: Path
    env: object  # the gymnasium env the rollouts drive (its route is also the eval route)
    replay: DictReplayBuffer  # the dataset and/or the online ring
    agent: TD3Agent
    worker: RolloutWorker | None  # None: pure offline
    start_update: int  # 0, or the checkpoint's update count
    pure_online: bool  # no dataset: every batch comes from the rollouts
    # best.pt's validation scores: route_completion, driving_score, update, seed, episodes (None: no best yet)
    best: dict | None = None

    def rollout_due(self, update: int) -> bool:
        """A rollout chunk on the ``online_every`` schedule, or now when a pure-online run was
        resumed with an empty ring (no episode had finished before the checkpoint)."""
        if self.worker is None:
            return False
        starved = self.pure_online and self.replay.online_size == 0
        return update % self.config.online_every == 0 or starved

    def save(self, path: Path, update: int) -> None:
        """The agent's state dict plus what :func:`_resume_state` needs to continue at ``update``."""
        loop = {"update": update, "rng": _rng_state(), **(self.worker.state() if self.worker else {}),
                "config": json.dumps(asdict(self.config), default=str),
                **({"best": dict(self.best)} if self.best is not None else {})}
        self.agent.save(path, extra={"loop": loop})

    def is_best(self, scores: dict, update: int) -> bool:
        """Whether the policy just evaluated (``scores``: :func:`_evaluate`'s) is the best so far on
        the validation seeds: mean route completion, then driving score; a tie goes to the later
        policy, which has trained longer. If so, it becomes :attr:`best`."""
        now = (scores["eval/route_completion"], scores["eval/driving_score"])
        if self.best is not None and now < (self.best["route_completion"], self.best["driving_score"]):
            return False
        self.best = {"route_completion": now[0], "driving_score": now[1], "update": update,
                     "seed": self.config.eval_seed, "episodes": self.config.eval_episodes}
        return True


def train(config: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) a training run; returns a summary dict. See the module docstring.

    Setup, then a loop of: rollout chunk -> update -> log -> eval -> checkpoint (a checkpoint
    taken after the eval at the same update keeps the RNG state an uninterrupted run goes on with).
    """
    run = _open_run(config)
    config, out, replay, agent, worker = run.config, run.out, run.replay, run.agent, run.worker
    last = out / "last.pt"
    log = MetricsLog(out, resume_update=run.start_update if config.resume else None)
    online_steps = config.online_steps or config.online_every
    update, latest, interrupted = run.start_update, {}, False
    started = logged_time = time.perf_counter()
    logged_update = update
    try:
        with _TrainProgress(progress, total=config.steps, done=run.start_update) as bar:
            while update < config.steps:
                if run.rollout_due(update):
                    worker.run(online_steps, lambda obs: agent.select_action(obs, noise=config.exploration_noise))
                logs = (update + 1) % config.log_every == 0 or update + 1 == config.steps
                metrics = agent.update(replay.sample(config.batch_size), metrics=logs)
                latest = metrics or latest  # only the logged updates' (they cost gradient norms)
                update += 1
                bar.advance(update)
                if logs:
                    now = time.perf_counter()
                    updates_per_s = (update - logged_update) / max(now - logged_time, 1e-9)
                    scalars = _log_row(latest, updates_per_s, now - started, replay, worker)
                    log.log(update, scalars)
                    bar.show(update, scalars)
                    logged_time, logged_update = now, update
                if config.eval_every and update % config.eval_every == 0:
                    scores = _evaluate(agent, run.env.unwrapped.route.name, config)
                    log.log(update, scores)
                    if run.is_best(scores, update):
                        run.save(out / "best.pt", update)
                if update % config.checkpoint_every == 0:
                    run.save(out / f"step_{update}.pt", update)
                    run.save(last, update)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        try:  # a Ctrl-C while the last checkpoint is written still gets it written, and the logs closed
            interrupted = save_despite_an_interrupt(lambda: run.save(last, update), interrupted)
        finally:
            replay.close()
            log.close()
            run.env.close()
    return {
        "out": str(out),
        "updates": update,
        "interrupted": interrupted,
        "updates_per_s": (update - run.start_update) / max(time.perf_counter() - started, 1e-9),
        "env_steps": worker.env_steps if worker else 0,
        "episodes": worker.episodes if worker else 0,
        "recent_return": float(np.mean(worker.recent_returns)) if worker and worker.recent_returns else None,
        "last_metrics": latest,
        "checkpoint": str(last),
        "best": run.best,  # best.pt's validation scores and update (None: no periodic evaluation)
        "best_checkpoint": str(out / "best.pt") if run.best is not None else None,
    }


def _log_row(latest: dict, updates_per_s: float, elapsed_s: float, replay, worker) -> dict:
    """One metrics row: the last update's losses and values, throughput, and the rollouts'
    recent return and route completion (mean of the last 20 episodes)."""
    scalars = {f"loss/{k}" if "loss" in k else f"train/{k}": v for k, v in latest.items()}
    scalars["perf/updates_per_s"] = updates_per_s
    scalars["perf/replay_wait_s"] = replay.wait_seconds
    scalars["perf/elapsed_s"] = elapsed_s  # this process's wall time so far
    if worker is not None:
        scalars["rollout/env_steps"] = worker.env_steps
        scalars["rollout/episodes"] = worker.episodes
        if worker.recent_returns:
            scalars["rollout/episode_return"] = float(np.mean(worker.recent_returns))
            scalars["rollout/route_completion"] = float(np.mean(worker.recent_completions))
    return scalars


def _open_run(config: TrainConfig) -> _Run:
    """Everything the loop needs, checked before anything is written: the options, the run
    folder, the dataset and the env; then the replay buffer, the rollout worker and the agent
    (new, or resumed from the run's checkpoint). A failure leaves no new folder behind."""
    from pipeline.train.td3 import TD3Agent, resolve_device

    validate_train_config(config)
    out = Path(config.out)
    _check_run_folder(out, config.resume)
    device = resolve_device(config.device)  # an impossible device fails before anything is opened
    checkpoint, resume_from = None, None
    if config.resume:
        resume_from, checkpoint = _read_resume_checkpoint(out)
        config = _check_resume_options(json.loads(checkpoint["loop"]["config"]), config, resume_from)
    config = device_defaults(config, device.type)
    store = _open_dataset(config)
    check_train_data(config, store)
    online, online_mix = _online_plan(config, store)
    route = _route_for(config, store)
    env = _env_for(config, store, route)
    reward = env.unwrapped.reward_config.to_dict()
    _warn_if_rewards_differ(store, reward, online)
    agent = None
    if checkpoint is not None:  # a checkpoint of another spec is refused before anything is written
        agent = TD3Agent.from_state_dict(checkpoint, config.device, env.unwrapped.obs_spec,
                                         what=f"checkpoint {resume_from}")
    created = _make_run_folder(out, config.resume)
    _seed_everything(config.seed)
    replay = None
    try:  # a failure before the loop (a bad replay option, Ctrl-C in warm-up) leaves no new folder
        replay = _make_replay(config, store, env, online, online_mix, device, out, reward)
        worker = RolloutWorker(env, replay, seed=config.seed * 1_000_003 + 10_000) if online else None
        if checkpoint is not None:
            start_update = _resume_state(checkpoint["loop"], replay, worker)
        else:
            agent, start_update = _new_agent(config, store, env, worker), 0
            (out / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str))
    except BaseException:
        if replay is not None:
            replay.close()
        env.close()
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    best = _resumed_best(checkpoint["loop"], config) if checkpoint is not None else None
    return _Run(config, out, env, replay, agent, worker, start_update, pure_online=store is None, best=best)


def _resumed_best(loop_state: dict, config: TrainConfig) -> dict | None:
    """best.pt's scores as the checkpoint recorded them, so a resumed run replaces best.pt only with
    a better policy; None when they came from other validation seeds (not comparable: said once)."""
    best = loop_state.get("best")
    if best is None or (best["seed"], best["episodes"]) == (config.eval_seed, config.eval_episodes):
        return best
    print(f"warning: best.pt was chosen on {best['episodes']} episode(s) from seed {best['seed']}; this run "
          f"evaluates {config.eval_episodes} from seed {config.eval_seed}, so its next evaluation replaces best.pt",
          file=sys.stderr)
    return None


def _read_resume_checkpoint(out: Path) -> tuple[Path, dict]:
    """The checkpoint a resumed run continues from, and its contents (with the loop's state)."""
    from pipeline.train.td3 import read_checkpoint

    resume_from = _resume_checkpoint(out)
    checkpoint = read_checkpoint(resume_from)
    if "loop" not in checkpoint:
        raise PipelineError(f"{resume_from} holds an agent but no training state to resume")
    return resume_from, checkpoint


def _online_plan(config: TrainConfig, store) -> tuple[bool, float]:
    """Whether the run drives rollouts, and the share of each batch they fill."""
    # --online-mix 0 with data is pure offline: no rollouts at all
    online = config.online_every > 0 and (store is None or config.online_mix > 0)
    if store is None and not online:
        raise PipelineError("nothing to learn from: give --data, or allow online rollouts (--online-every > 0)")
    return online, 1.0 if store is None else (config.online_mix if online else 0.0)


def _make_run_folder(out: Path, resume: bool) -> bool:
    """Clear what a killed run left and create ``out``; True when this run created it."""
    _clear_leftovers(out, resume)
    created = not out.exists()
    try:  # only now that data and env are good, so a bad command leaves nothing behind
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PipelineError(f"cannot create {out}: {e.strerror or e}") from None
    return created


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _make_replay(config: TrainConfig, store, env, online: bool, online_mix: float, device, out: Path, reward: dict):
    """The replay buffer: the dataset (if any) and, with rollouts, an online ring that also
    appends every finished episode to ``<out>/online.zarr``."""
    from pipeline.datasets.replay import DictReplayBuffer
    from pipeline.envs.spec import ActionSpec

    return DictReplayBuffer(
        offline=store, obs_spec=env.unwrapped.obs_spec, action_spec=ActionSpec(),
        online_capacity=config.online_capacity if online else 0,
        online_mix=online_mix, memory_budget=config.replay_memory, n_step=config.n_step,
        gamma=config.gamma, device=device, prefetch=2, seed=config.seed,
        online_store=str(out / "online.zarr") if online else None, online_route=env.unwrapped.route.name,
        online_reward=reward,
    )


def _new_agent(config: TrainConfig, store, env, worker: RolloutWorker | None):
    """A fresh agent. Without a dataset the worker first drives random warm-up steps, which fill
    the ring with a batch to sample and give the vector normalisation."""
    from pipeline.envs.spec import ActionSpec
    from pipeline.train.td3 import TD3Agent, TD3Config

    warmup_vectors: list[np.ndarray] = []
    if store is None:
        rng = np.random.default_rng(config.seed)

        def random_action(obs):
            warmup_vectors.append(obs["vector"])
            return rng.uniform(-1, 1, 2).astype(np.float32)

        worker.run(max(config.warmup_steps, config.batch_size), random_action)
    mean, std = _vector_stats(store, env, warmup_vectors)
    td3 = TD3Config(encoder_update=config.encoder_update, actor_lr=config.lr, critic_lr=config.lr,
                    encoder_lr=config.encoder_lr,
                    encoder_head=config.encoder_head, bc_alpha=config.bc_alpha, augment=config.augment,
                    prediction_weight=config.prediction_weight, device=config.device, compile=config.compile,
                    amp=config.bf16, seed=config.seed)
    return TD3Agent(env.unwrapped.obs_spec, ActionSpec(), td3, vector_mean=mean, vector_std=std)


def _resume_state(loop_state: dict, replay, worker: RolloutWorker | None) -> int:
    """Put the replay buffer, the rollout worker and the RNGs back where the checkpoint left
    them; returns the update count to continue from."""
    if worker is not None:
        replay.refill_online()  # the run's rollouts so far, so sampling resumes where it was
        worker.episode_seed = int(loop_state["episode_seed"])
        worker.episodes = int(loop_state["episodes"])
        worker.env_steps = int(loop_state["env_steps"])
        worker._new_episode()
    _set_rng_state(loop_state["rng"])
    return int(loop_state["update"])


def _evaluate(agent, route: str, config: TrainConfig) -> dict:
    """The current deterministic policy on the validation seeds (``pipeline eval``'s metrics)."""
    from pipeline.eval.runner import evaluate_agent

    summary = evaluate_agent(agent, [route], episodes=config.eval_episodes, seed=config.eval_seed,
                             simulator=config.simulator)
    return {f"eval/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}


def _eta(elapsed: float, done: int, left: int) -> str:
    """Time left at the mean rate since the bar started (rich's TimeRemainingColumn waits for a
    30 s speed window, so a slow CPU run showed no ETA for its first minutes)."""
    if done <= 0:
        return "eta -:--:--"
    return f"eta {timedelta(seconds=round(elapsed / done * left))}"


class _TrainProgress(ProgressBar):
    """The train bar: moves on every update (:meth:`advance`); updates/s, recent return and route
    completion at each log step (:meth:`show`); an ETA from the start of this process."""

    def __init__(self, enabled: bool, total: int, done: int, console=None):
        super().__init__(enabled, "[bold]train", total, done=done, eta=False, transient=False, console=console,
                         fields={"status": "", "eta": _eta(0.0, 0, total - done)},
                         template="{task.fields[status]}  {task.fields[eta]}")
        self._started = time.perf_counter()

    def __enter__(self) -> "_TrainProgress":
        self._started = time.perf_counter()
        return super().__enter__()

    def advance(self, update: int) -> None:  # the loop knows its update count, not a step size
        """``update`` updates done in all (this process started at ``done``)."""
        eta = _eta(time.perf_counter() - self._started, update - self.done, self.total - update)
        super().update(update, eta=eta)

    def show(self, update: int, scalars: dict) -> None:
        """The log row's rate, and the rollouts' recent return and completion when there are any."""
        status = f"{scalars['perf/updates_per_s']:6.1f} upd/s"
        if "rollout/episode_return" in scalars:
            status += (f"  return {scalars['rollout/episode_return']:7.2f}"
                       f"  completion {scalars['rollout/route_completion']:.2f}")
        super().update(update, status=status)
