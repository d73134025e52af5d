"""End-to-end TD3 on dict observations: the CNN is trained by the TD3 losses.

The seed document's fix, in one sentence: observations are stored raw, and the encoder runs *with
gradients* inside the update (:meth:`TD3Agent.extract_features` with ``enable_grad=True``), so the
critic loss (and, optionally, the actor loss) reaches the CNN weights. ``select_action`` runs the
same encoder under ``torch.no_grad()``.

One update, read top to bottom in :meth:`TD3Agent.update`:

1. random-shift the image of ``obs`` and ``next_obs`` (DrQ), move the batch to the device;
2. critic: ``y = r + discount * (1 - done) * min Q_targ(s', pi_targ(s') + clipped noise)``, where
   the target side reads ``s'`` through the target encoder; MSE of both Q heads to ``y`` trains
   critic + encoder (plus, with ``prediction_weight > 0``, a self-predictive loss on the CNN: see
   :class:`TD3Agent`);
3. every ``policy_delay`` updates: actor loss ``-Q1(sg(phi), pi(phi))`` (plus TD3+BC's
   behaviour-cloning term on offline rows when ``bc_alpha > 0``), then Polyak-average all three
   target networks. ``sg`` is stop-gradient: in the actor loss the critic always reads detached
   features, so the actor loss reaches the encoder only through the policy. Otherwise most of its
   encoder gradient comes through the critic's state input (measured: 2.25 of the gradient norm vs
   0.12 through the policy), which pushes the CNN to inflate Q rather than to act better.

Encoder modes (``TD3Config.encoder_update``):
- ``"critic"`` (default, DrQ-v2): the critic loss trains the encoder; the actor's Q term reads
  detached features. With TD3+BC (``bc_alpha > 0``) the BC term is computed on the actor applied
  to live features, so demonstrations shape the CNN too, while the Q term still cannot.
- ``"actor+critic"``: the actor loss (Q and BC terms) also backpropagates into the encoder, through
  the policy only (the seed's variant).
- ``"frozen"``: the encoder never receives gradients and never changes; features are computed under
  ``no_grad``. This is the seed's broken baseline, kept for the ablation.

Precision: with ``amp`` the encoder's convolutions run under bf16 autocast; its linear head, its
output, the actor and critic heads and the TD target are fp32 (near Q = 20 bf16 resolves 0.125,
about one step's reward). By default (``amp=None``, as ``amp=True``) that is wherever the device runs
bf16 natively: CUDA, or a CPU with AVX512-BF16 or AMX (see :func:`native_bf16`); ``amp=False`` keeps
fp32. On such a CPU the quick start learned in 5 of 5 training seeds either way, with 1.37x the
fp32 updates/s at one thread (benchmarks/results/quickstart-cpu.md, 2026-12-07); with the linear
head in bf16 too it had learned in 2 of 5 (2026-12-04).

Batch contract (what ``DictReplayBuffer.sample(B)`` returns, a mapping or an object with these
attributes; tensors on any device):
    obs       {"image": uint8 (B, C, H, W), "vector": float32 (B, D)}
    action    float32 (B, A) in [-1, 1]
    reward    float32 (B,)   n-step discounted sum
    next_obs  like obs, the n-th next observation
    done      float32 (B,)   1.0 when the episode terminated within the n steps (truncation bootstraps)
    discount  float32 (B,)   gamma ** n_actual, the bootstrap factor
    offline   bool (B,)      rows from the offline dataset (optional; TD3+BC applies only to these)
    bc_action float32 (B, A) the behaviour-cloning target, e.g. the expert's label (optional;
                             default ``action``)
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.envs.spec import ActionSpec, ObsSpec
from pipeline.errors import PipelineError, SpecMismatchError
from pipeline.train.networks import ENCODER_HEADS, Actor, Critic, Encoder, LatentPredictor, random_shift

ENCODER_UPDATES = ("critic", "actor+critic", "frozen")
CHECKPOINT_FORMAT = "pipeline.td3"
CHECKPOINT_VERSION = 1


@dataclass
class TD3Config:
    """Every learner hyperparameter. Gamma is not here: the batch carries ``discount`` per row."""

    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    encoder_lr: float = 3e-4
    policy_noise: float = 0.2  # target policy smoothing std
    noise_clip: float = 0.5
    policy_delay: int = 2  # critic updates per actor (and target) update
    encoder_update: str = "critic"  # one of ENCODER_UPDATES
    augment: bool = True  # DrQ random shift on obs and next_obs
    augment_pad: int = 4
    bc_alpha: float = 0.0  # TD3+BC alpha; 0 turns BC off (TD3+BC paper uses 2.5)
    # Weight of the self-predictive loss on the CNN (SPR-style, see TD3Agent); 0 turns it off. It
    # shapes the CNN only, so it cannot go with encoder_update "frozen".
    prediction_weight: float = 0.0
    features_dim: int = 512
    encoder_head: str = "relu"  # one of ENCODER_HEADS: "layernorm" bounds the features (SAC-AE, DrQ)
    # A Polyak copy of the CNN reads s' for the TD target. False: the online CNN does (DrQ-v2); same
    # box, 3 seeds, it measured worse in two of the CPU preset's three parts (learning-cpu-ablations.md).
    target_encoder: bool = True
    hidden: int = 256
    seed: int = 0
    device: str = "auto"  # "auto" -> cuda if available, else cpu
    # bf16 autocast of the encoder's convolutions. None or True: where the device has native bf16
    # (native_bf16: CUDA, AVX512-BF16/AMX CPUs); False: never. Elsewhere fp32 whatever is asked.
    amp: bool | None = None
    channels_last: bool = True  # NHWC images and conv weights: faster oneDNN / cuDNN convolutions
    compile: bool = False  # torch.compile the modules

    def __post_init__(self):
        if self.encoder_update not in ENCODER_UPDATES:
            raise PipelineError(
                f"unknown encoder update {self.encoder_update!r}; choose one of {', '.join(ENCODER_UPDATES)}"
            )
        if self.encoder_head not in ENCODER_HEADS:
            raise PipelineError(
                f"unknown encoder head {self.encoder_head!r}; choose one of {', '.join(ENCODER_HEADS)}"
            )
        if self.policy_delay < 1 or not 0.0 < self.tau <= 1.0 or self.bc_alpha < 0 or self.prediction_weight < 0:
            raise PipelineError(
                f"bad TD3 settings: policy_delay={self.policy_delay} (>= 1), tau={self.tau} (0, 1], "
                f"bc_alpha={self.bc_alpha} (>= 0), prediction_weight={self.prediction_weight} (>= 0)"
            )
        if self.prediction_weight > 0 and self.encoder_update == "frozen":
            raise PipelineError("the self-predictive loss (prediction weight > 0) trains the CNN; the frozen "
                                "encoder has nothing for it to train: drop it, or pick another encoder update")


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast of the CNN pays on ``device``: any CUDA GPU, or a CPU whose oneDNN
    convolutions run bf16 in hardware (AVX512-BF16: AMD Zen 4, Intel Cooper Lake; or AMX).

    Measured on a 2-core AMD EPYC with AVX512-BF16: the Nature CNN's forward + backward at batch
    64 / 256 took 16 / 55 ms in bf16 against 26 / 93 ms in fp32 (benchmarks/results/
    learner_throughput_cpu.txt). A CPU without those instructions emulates bf16, slower than fp32,
    so there the CNN stays fp32. ``torch.cpu._is_*_supported`` are torch's own CPU feature probes; a
    torch without them counts as no native bf16.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; a CUDA device on a machine without one is a
    :class:`PipelineError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PipelineError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {name!r} asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's state dict, read with ``weights_only=True`` (nothing is unpickled); a missing,
    unreadable or foreign file is a one-line :class:`PipelineError`."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated/foreign files
        # torch's own words are a bare byte value ("101") or advice to load with weights_only=False,
        # which would unpickle: say what the user can act on instead
        raise PipelineError(f"cannot read checkpoint {path}: not a torch checkpoint file, or a truncated "
                            f"one ({type(e).__name__}); give a last.pt or step_N.pt written by pipeline train") from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise PipelineError(f"{path} is not a pipeline TD3 checkpoint")
    return state


def _field(batch, name: str, default=None):
    if isinstance(batch, Mapping):
        return batch.get(name, default)
    return getattr(batch, name, default)


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all gradients as a 0-d tensor (0 when none exist, e.g. a frozen encoder)."""
    grads = [p.grad for p in params if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=params[0].device)


class TD3Agent:
    """TD3 with a trainable pixel encoder. See the module docstring for the update and the modes.

    Attributes: ``encoder``, ``actor``, ``critic`` and their Polyak targets ``encoder_target``
    (``None`` with ``target_encoder=False``: the TD target then reads ``s'`` through ``encoder``),
    ``actor_target``, ``critic_target``; one Adam optimiser each for actor, critic and encoder;
    ``num_updates`` (calls to :meth:`update`); ``bf16_cnn`` (bool: whether the CNN runs under bf16
    autocast, ``TD3Config.amp`` resolved on this device); ``predictor`` (a
    :class:`~pipeline.train.networks.LatentPredictor` with its own Adam when
    ``prediction_weight > 0``, else ``None``).

    The self-predictive loss (``prediction_weight``; SPR, Schwarzer et al. 2021, one step, as BYOL):
    the critic step already encodes ``next_obs`` without gradients for the TD target; ``predictor``
    maps the online CNN features of ``obs`` and the action to a guess of those next features, and
    ``2 - 2 cos(guess, next features)`` is added to the critic loss with that weight. So the CNN gets a
    dense self-supervised signal beside the TD error, at the cost of one small MLP per update.
    The target side reads the Polyak-averaged encoder (the online one with ``target_encoder=False``);
    the next observation is the n-th next when the batch holds n-step returns.
    """

    def __init__(
        self,
        obs_spec: ObsSpec,
        action_spec: ActionSpec | None = None,
        config: TD3Config | None = None,
        vector_mean=None,
        vector_std=None,
    ):
        self.obs_spec = obs_spec
        self.action_spec = action_spec or ActionSpec()
        self.config = cfg = config or TD3Config()
        self.device = resolve_device(cfg.device)
        self.bf16_cnn = cfg.amp is not False and native_bf16(self.device)  # whether the convolutions run in bf16
        # CPU too: 1.11x updates/s at batch 64, 1.07x at 256 (benchmarks/results/learner_throughput_cpu.txt)
        self._channels_last = cfg.channels_last

        # Same seed -> same initial weights, without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.encoder = Encoder(obs_spec, cfg.features_dim, vector_mean, vector_std, head=cfg.encoder_head)
            self.actor = Actor(self.encoder.out_dim, self.action_spec.dim, cfg.hidden)
            self.critic = Critic(self.encoder.out_dim, self.action_spec.dim, cfg.hidden)
            # built last, so the networks above start the same with the loss on or off
            self.predictor = (LatentPredictor(cfg.features_dim, self.action_spec.dim, cfg.hidden)
                              if cfg.prediction_weight > 0 else None)
        self.encoder_target = copy.deepcopy(self.encoder) if cfg.target_encoder else None
        self.actor_target = copy.deepcopy(self.actor)
        self.critic_target = copy.deepcopy(self.critic)
        memory_format = torch.channels_last if self._channels_last else torch.preserve_format
        for net in self._online() + self._targets():
            net.to(self.device, memory_format=memory_format)
        self.predictor_opt = None
        if self.predictor is not None:
            self.predictor.to(self.device)
            self.predictor_opt = torch.optim.Adam(self.predictor.parameters(), lr=cfg.encoder_lr, fused=True)
        for net in self._targets():
            net.requires_grad_(False)
        if cfg.encoder_update == "frozen":
            self.encoder.requires_grad_(False)

        # fused Adam: one kernel for all tensors, ~6x faster than the per-tensor loop on CPU.
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, fused=True)
        self.encoder_opt = torch.optim.Adam(self.encoder.parameters(), lr=cfg.encoder_lr, fused=True)
        self.num_updates = 0
        # Own generators (augmentation + target noise; exploration noise) so a resumed run
        # continues the exact random stream; both are saved in the checkpoint.
        self._update_rng = torch.Generator(device=self.device).manual_seed(cfg.seed)
        self._explore_rng = torch.Generator().manual_seed(cfg.seed + 1)

        if cfg.compile:
            # Module.compile keeps parameter names, so checkpoints stay interchangeable.
            for net in self._online() + self._targets():
                net.compile()

    def _online(self):
        return [self.encoder, self.actor, self.critic]

    def _target_pairs(self):
        """(online network, its Polyak target) for every target the agent has."""
        pairs = [(self.actor, self.actor_target), (self.critic, self.critic_target)]
        if self.encoder_target is not None:
            pairs.append((self.encoder, self.encoder_target))
        return pairs

    def _targets(self):
        return [target for _, target in self._target_pairs()]

    @property
    def _trains_encoder(self) -> bool:
        return self.config.encoder_update != "frozen"

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_cnn)

    def _encode(self, encoder, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """``encoder(obs)`` with autocast on the CNN only; the result is fp32 for the heads."""
        with self._autocast():
            return encoder(obs).float()

    # ------------------------------------------------------------------ features and acting

    def _obs_to_device(self, obs, augment: bool = False) -> dict[str, torch.Tensor]:
        """numpy or torch ``obs`` -> ``{"image": uint8 (B,C,H,W), "vector": float32 (B,D)}`` on
        the device; images stay uint8 until the encoder, so transfers and shifts move 1 byte/pixel."""
        image = torch.as_tensor(obs["image"]).to(self.device, non_blocking=True)
        vector = torch.as_tensor(obs["vector"]).to(self.device, torch.float32, non_blocking=True)
        if augment:
            image = random_shift(image, self.config.augment_pad, generator=self._update_rng)
        if self._channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return {"image": image, "vector": vector}

    def extract_features(self, obs, enable_grad: bool) -> torch.Tensor:
        """Encoder output float ``(B, encoder.out_dim)`` for batched ``obs``.

        ``enable_grad=True`` keeps the autograd graph so a loss on the result trains the CNN
        (ignored in ``frozen`` mode, whose encoder never gets gradients)."""
        with torch.set_grad_enabled(enable_grad and self._trains_encoder):
            return self._encode(self.encoder, self._obs_to_device(obs))

    @torch.no_grad()
    def select_action(self, obs, noise: float = 0.0, averaged: bool = False) -> np.ndarray:
        """Policy action for one observation (image ``(C,H,W)``, vector ``(D,)``) -> float32 ``(A,)``,
        or for a batch (``(B,C,H,W)``, ``(B,D)``) -> ``(B, A)``. Gaussian exploration noise of std
        ``noise`` is added, then actions are clipped to [-1, 1]; ``noise=0`` is deterministic.

        ``averaged=False`` acts with the online ``encoder`` and ``actor`` (exploration, as in TD3).
        ``averaged=True`` acts with their Polyak averages ``encoder_target`` (the online encoder when
        there is none) and ``actor_target``: the deployed policy, which evaluation uses. The online
        actor swings by up to 60 points of route completion between checkpoints 500 updates apart;
        the average over the last few hundred updates is steadier late in a run and lags early
        (``benchmarks/results/learning-cpu-deployed-policy.md``)."""
        image, vector = np.asarray(obs["image"]), np.asarray(obs["vector"], dtype=np.float32)
        single = image.ndim == 3
        if single:
            image, vector = image[None], vector[None]
        if image.shape[1:] != self.obs_spec.image_shape or vector.shape[1:] != (self.obs_spec.vector_dim,):
            raise SpecMismatchError(
                f"observation image {image.shape[1:]} / vector {vector.shape[1:]} does not match the "
                f"agent's spec: image {self.obs_spec.image_shape} / vector ({self.obs_spec.vector_dim},)"
            )
        encoder, actor = self.encoder, self.actor
        if averaged:
            actor = self.actor_target
            encoder = self.encoder if self.encoder_target is None else self.encoder_target
        features = self._encode(encoder, self._obs_to_device({"image": image, "vector": vector}))
        action = actor(features).cpu()
        if noise > 0:
            action = (action + noise * torch.randn(action.shape, generator=self._explore_rng)).clamp_(-1, 1)
        return action[0].numpy() if single else action.numpy()

    # ------------------------------------------------------------------ learning

    def _prepare(self, batch) -> dict:
        """Batch on the device, images shifted (when ``augment``) independently for obs and next_obs."""
        to = dict(device=self.device, dtype=torch.float32, non_blocking=True)
        augment = self.config.augment
        action = torch.as_tensor(_field(batch, "action")).to(**to)
        offline = _field(batch, "offline")
        bc_action = _field(batch, "bc_action")
        return {
            "obs": self._obs_to_device(_field(batch, "obs"), augment),
            "next_obs": self._obs_to_device(_field(batch, "next_obs"), augment),
            "action": action,
            "bc_action": action if bc_action is None else torch.as_tensor(bc_action).to(**to),
            "reward": torch.as_tensor(_field(batch, "reward")).to(**to),
            "done": torch.as_tensor(_field(batch, "done")).to(**to),
            "discount": torch.as_tensor(_field(batch, "discount")).to(**to),
            "offline": (torch.zeros(action.shape[0], device=self.device, dtype=torch.bool)
                        if offline is None else torch.as_tensor(offline).to(self.device, torch.bool)),
        }

    def _critic_step(self, b: dict, diagnose: bool = True) -> tuple[torch.Tensor, dict]:
        """One critic (+ encoder) step on a prepared batch; returns the (detached) obs features and
        the metrics (the gradient norms only with ``diagnose``)."""
        cfg = self.config
        with torch.no_grad():
            next_encoder = self.encoder if self.encoder_target is None else self.encoder_target
            next_features = self._encode(next_encoder, b["next_obs"])
            noise = torch.randn(b["action"].shape, device=self.device, generator=self._update_rng)
            noise = (noise * cfg.policy_noise).clamp(-cfg.noise_clip, cfg.noise_clip)
            next_action = (self.actor_target(next_features) + noise).clamp(-1.0, 1.0)
            target_q1, target_q2 = self.critic_target(next_features, next_action)
            target_q = b["reward"] + b["discount"] * (1.0 - b["done"]) * torch.min(target_q1, target_q2)

        features = self.extract_features(b["obs"], enable_grad=True)  # the seed's fix: CNN in the graph
        q1, q2 = self.critic(features, b["action"])
        critic_loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
        loss, metrics = critic_loss, {}
        if self.predictor is not None:
            cnn = slice(0, cfg.features_dim)  # the encoder's output is CNN features, then the vector
            guess = self.predictor(features[:, cnn], b["action"])
            prediction_loss = (2.0 - 2.0 * F.cosine_similarity(guess, next_features[:, cnn], dim=1)).mean()
            loss = critic_loss + cfg.prediction_weight * prediction_loss
            metrics["prediction_loss"] = prediction_loss.detach()
            self.predictor_opt.zero_grad(set_to_none=True)

        self.critic_opt.zero_grad(set_to_none=True)
        self.encoder_opt.zero_grad(set_to_none=True)
        loss.backward()
        metrics.update(critic_loss=critic_loss.detach(), q1_mean=q1.detach().mean(), q_target_mean=target_q.mean())
        if diagnose:
            metrics["critic_grad_norm"] = _grad_norm(list(self.critic.parameters()))
            metrics["encoder_grad_norm"] = _grad_norm(list(self.encoder.parameters()))
        self.critic_opt.step()
        if self._trains_encoder:
            self.encoder_opt.step()
        if self.predictor is not None:
            self.predictor_opt.step()
        return features.detach(), metrics

    def _actor_step(self, b: dict, features: torch.Tensor | None = None, diagnose: bool = True) -> dict:
        """One actor step. ``features`` (detached, from the critic step) are reused unless a term of
        the actor loss must reach the encoder, which needs a fresh graph.

        Paths into the encoder: the Q term only through the policy and only in ``actor+critic``
        mode; the BC term in both trainable modes (in ``critic`` mode through a second actor pass
        on live features, so the Q term stays out). The critic always reads detached features.
        """
        cfg = self.config
        q_through_encoder = cfg.encoder_update == "actor+critic"
        to_encoder = self._trains_encoder and (q_through_encoder or cfg.bc_alpha > 0)
        if to_encoder:
            live = self.extract_features(b["obs"], enable_grad=True)
            features = live.detach()
        elif features is None:
            features = self.extract_features(b["obs"], enable_grad=False)
        pi = self.actor(live if q_through_encoder else features)
        q = self.critic.q1(features, pi)
        metrics = {}
        if cfg.bc_alpha > 0:
            # TD3+BC (Fujimoto & Gu 2021): normalise the Q term by lambda = alpha / mean|Q| and pull
            # the policy toward the behaviour target (the expert's label when the batch has one),
            # on offline rows only.
            pi_bc = self.actor(live) if to_encoder and not q_through_encoder else pi
            lam = cfg.bc_alpha / q.abs().mean().detach().clamp_min(1e-6)
            offline = b["offline"].float()
            per_row = ((pi_bc - b["bc_action"]) ** 2).mean(dim=1)
            bc_loss = (per_row * offline).sum() / offline.sum().clamp_min(1.0)
            actor_loss = -lam * q.mean() + bc_loss
            metrics["bc_loss"] = bc_loss.detach()
        else:
            actor_loss = -q.mean()

        # Only actor (and, when a term reaches it, encoder) weights receive this loss's gradients;
        # the critic is a fixed judge here.
        params = list(self.actor.parameters())
        encoder_params = list(self.encoder.parameters()) if to_encoder else []
        self.actor_opt.zero_grad(set_to_none=True)
        if to_encoder:
            self.encoder_opt.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=params + encoder_params)
        metrics["actor_loss"] = actor_loss.detach()
        if diagnose:
            metrics["actor_grad_norm"] = _grad_norm(params)
        if diagnose and to_encoder:
            metrics["encoder_grad_norm"] = _grad_norm(encoder_params)
        self.actor_opt.step()
        if to_encoder:
            self.encoder_opt.step()
        return metrics

    @torch.no_grad()
    def _soft_update_targets(self) -> None:
        # One multi-tensor lerp per network instead of one call per tensor; bit-identical.
        for online, target in self._target_pairs():
            torch._foreach_lerp_(list(target.parameters()), list(online.parameters()), self.config.tau)

    @staticmethod
    def _floats(metrics: dict) -> dict[str, float]:
        # One device sync for all metrics instead of one per .item().
        values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
        return dict(zip(metrics, values))

    def update_critic(self, batch) -> dict[str, float]:
        """One critic (+ encoder) step: ``critic_loss, q1_mean, q_target_mean, critic_grad_norm,
        encoder_grad_norm`` (+ ``prediction_loss`` with the self-predictive loss). Does not count
        towards ``num_updates``."""
        return self._floats(self._critic_step(self._prepare(batch))[1])

    def update_actor(self, batch) -> dict[str, float]:
        """One actor step: ``actor_loss, actor_grad_norm`` (+ ``bc_loss`` with TD3+BC,
        + ``encoder_grad_norm`` when the actor loss reaches the encoder: actor+critic mode, or
        TD3+BC in a trainable mode). Targets are not moved."""
        return self._floats(self._actor_step(self._prepare(batch)))

    def update(self, batch, metrics: bool = True) -> dict[str, float]:
        """One TD3 update: a critic step, and every ``policy_delay``-th call an actor step plus
        Polyak averaging of the targets. Returns floats (see update_critic / update_actor); the
        actor's encoder gradient norm is reported as ``encoder_actor_grad_norm``.

        ``metrics=False`` returns ``{}`` and skips what only the metrics need (the gradient norms, the
        wait for the values): the training loop asks for them on the updates it logs. The update
        itself is the same either way."""
        b = self._prepare(batch)
        features, critic_metrics = self._critic_step(b, diagnose=metrics)
        self.num_updates += 1
        if self.num_updates % self.config.policy_delay == 0:
            actor_metrics = self._actor_step(b, features, diagnose=metrics)
            if "encoder_grad_norm" in actor_metrics:
                actor_metrics["encoder_actor_grad_norm"] = actor_metrics.pop("encoder_grad_norm")
            critic_metrics.update(actor_metrics)
            self._soft_update_targets()
        return self._floats(critic_metrics) if metrics else {}

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to resume exactly: networks, targets, optimisers, update counter,
        RNG states, config and specs. Plain types and tensors only (``weights_only=True`` loads it)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "config": dataclasses.asdict(self.config),
            "obs_spec": self.obs_spec.to_dict(),
            "action_spec": self.action_spec.to_dict(),
            "num_updates": self.num_updates,
            **{name: getattr(self, name).state_dict() for name in self._state_names()},
            "rng": {"update": self._update_rng.get_state(), "explore": self._explore_rng.get_state()},
        }

    def _state_names(self) -> list[str]:
        names = ["encoder", "actor", "critic", "actor_target", "critic_target", "actor_opt", "critic_opt",
                 "encoder_opt"]
        names += ["encoder_target"] if self.encoder_target is not None else []
        return names + (["predictor", "predictor_opt"] if self.predictor is not None else [])

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`. Raises :class:`SpecMismatchError` if its obs or action spec
        differs from this agent's. The agent's own ``config`` is kept."""
        self.obs_spec.check_compatible(ObsSpec.from_dict(state["obs_spec"]), "checkpoint")
        self.action_spec.check_compatible(ActionSpec.from_dict(state["action_spec"]), "checkpoint")
        for name in self._state_names():
            getattr(self, name).load_state_dict(state[name])
        self.num_updates = int(state["num_updates"])
        self._update_rng.set_state(state["rng"]["update"])
        self._explore_rng.set_state(state["rng"]["explore"])

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the checkpoint atomically (temp file in the same folder, then rename), so a crash
        never leaves a half-written ``last.pt``. ``extra`` (plain types and tensors) is stored
        alongside, e.g. the training loop's counters; :meth:`load` ignores it."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({**self.state_dict(), **(extra or {})}, tmp)
            os.replace(tmp, path)
        except BaseException as e:  # a second Ctrl-C during the final save too: no temp file left
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise PipelineError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
            raise
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        map_location: str | torch.device | None = None,
        expected_obs_spec: ObsSpec | None = None,
    ) -> "TD3Agent":
        """Build an agent from a checkpoint (``torch.load(weights_only=True)``: nothing is unpickled).

        ``map_location`` picks the device (default: the saved config's, usually "auto").
        ``expected_obs_spec`` (e.g. the env's) must match the checkpoint's, else
        :class:`SpecMismatchError` naming the differing fields."""
        state = read_checkpoint(path)
        return cls.from_state_dict(state, map_location, expected_obs_spec, what=f"checkpoint {path}")

    @classmethod
    def from_state_dict(
        cls,
        state: dict,
        map_location: str | torch.device | None = None,
        expected_obs_spec: ObsSpec | None = None,
        what: str = "checkpoint",
    ) -> "TD3Agent":
        """Build an agent from a loaded :meth:`state_dict` (see :meth:`load` for the arguments)."""
        obs_spec = ObsSpec.from_dict(state["obs_spec"])
        if expected_obs_spec is not None:
            expected_obs_spec.check_compatible(obs_spec, what)
        known = {f.name for f in dataclasses.fields(TD3Config)}
        saved = state["config"]
        if "target_encoder" not in saved:  # version 1 before the option: one commit (2ee1631) had none
            saved = {**saved, "target_encoder": "encoder_target" in state}
        config = TD3Config(**{k: v for k, v in saved.items() if k in known})
        if map_location is not None:
            config = dataclasses.replace(config, device=str(map_location))
        agent = cls(obs_spec, ActionSpec.from_dict(state["action_spec"]), config)
        agent.load_state_dict(state)
        return agent
