"""The learner's networks, DrQ-v2 style: a pixel+vector encoder, a tanh actor, twin critics.

Every module takes plain tensors; :mod:`pipeline.train.td3` decides when gradients flow. The encoder
is deliberately separate from actor and critic so the TD3 losses can (or, for the ``frozen``
ablation, cannot) train it.

Shapes: ``B`` batch, ``D`` vector dim of the obs spec, ``F = features_dim + D`` encoder output.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.envs.spec import ObsSpec
from pipeline.errors import SpecMismatchError


def _orthogonal_init(module: nn.Module) -> None:
    """DrQ-v2's initialisation: orthogonal weights (ReLU gain for convs), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.orthogonal_(module.weight, nn.init.calculate_gain("relu"))
        nn.init.zeros_(module.bias)


# A vector field whose std is below this is treated as constant and only centred (divided by 1).
# Statistics from a short warm-up or a tidy expert dataset can show a field as (nearly) constant
# that later varies by whole units; dividing by its tiny std would then blow it up by 1000x or more.
# 1e-2 is below any variation that matters in the fields' units (m, m/s, rad). This is the one
# place the floor is applied: callers pass raw statistics.
MIN_VECTOR_STD = 1e-2


def _vector_stat(value, default: float, dim: int, name: str) -> torch.Tensor:
    if value is None:
        return torch.full((dim,), default, dtype=torch.float32)
    t = torch.as_tensor(np.asarray(value, dtype=np.float32))
    if t.shape != (dim,):
        raise SpecMismatchError(f"{name} has shape {tuple(t.shape)}, the obs spec needs ({dim},)")
    return t.clone()


# The encoder's last layer, after the Nature CNN's convolutions and Linear(3136, features_dim):
# "relu" (Nature DQN, SB3) or "layernorm" (LayerNorm then tanh: SAC-AE and DrQ, whose features stay
# in [-1, 1] however the critic's gradients pull the weights).
ENCODER_HEADS = ("relu", "layernorm")


def scale_to_unit(image: torch.Tensor) -> torch.Tensor:
    """``image`` uint8 or float in [0, 255] -> [0, 1], in the dtype the convolutions run in: bf16
    under autocast, else float32. Memory format is kept (channels_last stays channels_last).

    Casting the uint8 batch straight to bf16 skips the float32 copy that autocast would cast again:
    1.26x updates/s at batch 64 and 1.35x at 256 on a 2-core AMD EPYC (in-process A/B). The
    result is bit-identical to ``image.float() / 255`` then the cast: 0..255 are exact in bf16.
    """
    device = image.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.float32
    converted = image.to(dtype)
    # in place only on our own copy: .to() returns the caller's tensor when it is already dtype
    return converted.div_(255.0) if converted is not image else image / 255.0


class Encoder(nn.Module):
    """Nature-CNN trunk on the image plus the normalised driving-state vector.

    ``forward(obs)`` takes ``{"image": uint8 or float (B, C, H, W) in [0, 255],
    "vector": float32 (B, D)}`` and returns float ``(B, out_dim)`` with
    ``out_dim = features_dim + D``: CNN features (ReLU, or LayerNorm + tanh with
    ``head="layernorm"``), then ``(vector - mean) / std``. The output is float32 even under
    autocast (the CNN may run in bf16; the heads read fp32).

    ``vector_mean`` / ``vector_std`` (array-like ``(D,)``, e.g. dataset statistics) are buffers, so
    they travel with ``state_dict``; a std below :data:`MIN_VECTOR_STD` becomes 1, so a field that
    looked constant in the statistics is centred but never amplified.
    """

    def __init__(self, obs_spec: ObsSpec, features_dim: int = 512, vector_mean=None, vector_std=None,
                 head: str = "relu"):
        super().__init__()
        if head not in ENCODER_HEADS:
            raise ValueError(f"unknown encoder head {head!r}; choose one of {', '.join(ENCODER_HEADS)}")
        channels, size, _ = obs_spec.image_shape
        # ReLUs in place here and in the heads: the same values without an extra activation tensor
        # each (1.06x updates/s at batch 256 on a 2-core CPU, in-process A/B, 2026-12-06)
        self.cnn = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=8, stride=4), nn.ReLU(inplace=True),
            nn.Conv2d(32, 64, kernel_size=4, stride=2), nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, kernel_size=3, stride=1), nn.ReLU(inplace=True),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.cnn(torch.zeros(1, channels, size, size)).shape[1]  # 3136 at 84x84
        last = [nn.ReLU(inplace=True)] if head == "relu" else [nn.LayerNorm(features_dim), nn.Tanh()]
        self.head = nn.Sequential(nn.Linear(n_flat, features_dim), *last)
        self.apply(_orthogonal_init)

        dim = obs_spec.vector_dim
        std = _vector_stat(vector_std, 1.0, dim, "vector_std")
        self.register_buffer("vector_mean", _vector_stat(vector_mean, 0.0, dim, "vector_mean"))
        self.register_buffer("vector_std", torch.where(std < MIN_VECTOR_STD, torch.ones_like(std), std))
        self.out_dim = features_dim + dim

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        image = scale_to_unit(obs["image"])
        convolved = self.cnn(image)
        # Under autocast only the convolutions run in bf16: the linear head reads and writes fp32
        with torch.autocast(convolved.device.type, enabled=False):
            pixels = self.head(convolved.float())
        vector = (obs["vector"].float() - self.vector_mean) / self.vector_std
        return torch.cat([pixels, vector], dim=1)


def _mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, out_dim),
    )


class Actor(nn.Module):
    """Deterministic policy: features float ``(B, feature_dim)`` -> action float ``(B, action_dim)``
    in [-1, 1] (tanh)."""

    def __init__(self, feature_dim: int, action_dim: int = 2, hidden: int = 256):
        super().__init__()
        self.net = _mlp(feature_dim, hidden, action_dim)
        self.apply(_orthogonal_init)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(features))


class Critic(nn.Module):
    """Twin Q heads (TD3's clipped double-Q): ``forward(features (B, F), action (B, A))`` returns
    ``(q1, q2)``, each float ``(B,)``; :meth:`q1` returns only the first (the actor's objective)."""

    def __init__(self, feature_dim: int, action_dim: int = 2, hidden: int = 256):
        super().__init__()
        self.head1 = _mlp(feature_dim + action_dim, hidden, 1)
        self.head2 = _mlp(feature_dim + action_dim, hidden, 1)
        self.apply(_orthogonal_init)

    def forward(self, features: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([features, action.to(features.dtype)], dim=1)
        return self.head1(x).squeeze(1), self.head2(x).squeeze(1)

    def q1(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.head1(torch.cat([features, action.to(features.dtype)], dim=1)).squeeze(1)


class LatentPredictor(nn.Module):
    """The self-predictive loss's model (SPR, Schwarzer et al. 2021, one step): CNN features float
    ``(B, features_dim)`` of an observation and the action float ``(B, A)`` taken there -> a
    prediction float ``(B, features_dim)`` of the CNN features of the next observation. The loss
    compares directions only (cosine), so the scale of the features is left to the RL losses."""

    def __init__(self, features_dim: int, action_dim: int = 2, hidden: int = 256):
        super().__init__()
        self.net = _mlp(features_dim + action_dim, hidden, features_dim)
        self.apply(_orthogonal_init)

    def forward(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([features, action.to(features.dtype)], dim=1))


def random_shift(image: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """DrQ's random-shift augmentation: replicate-pad by ``pad`` pixels, crop back at a random
    integer offset, one offset per sample (shared by its stacked frames).

    ``image``: any dtype ``(B, C, H, W)``; returns the same dtype and shape. uint8 batches are
    shifted before the float conversion (4x less memory traffic than shifting floats), and
    ``pad=0`` is the identity. ``generator`` (on ``image.device``) makes the shifts reproducible.

    Two exact implementations of the same shift, by device: on CUDA :func:`shift_by_gather` (no
    host sync); on CPU :func:`shift_by_crop`, 12x faster there (1.4 vs 17 ms at batch 64, one
    thread, 2-core EPYC).
    """
    if pad == 0:
        return image
    shift = torch.randint(0, 2 * pad + 1, (image.shape[0], 2), device=image.device, generator=generator)
    return shift_by_gather(image, shift, pad) if image.is_cuda else shift_by_crop(image, shift, pad)


def shift_by_gather(image: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """``image`` uint8/float ``(B, C, H, W)`` shifted by ``shift`` int64 ``(B, 2)`` in ``[0, 2 pad]``
    (row, column offsets into the padded image): two gathers with clamped indices."""
    b, c, h, w = image.shape
    rows = (torch.arange(h, device=image.device) - pad + shift[:, :1]).clamp_(0, h - 1)  # (B, H)
    cols = (torch.arange(w, device=image.device) - pad + shift[:, 1:]).clamp_(0, w - 1)  # (B, W)
    image = image.gather(2, rows[:, None, :, None].expand(b, c, h, w))
    return image.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def shift_by_crop(image: torch.Tensor, shift: torch.Tensor, pad: int) -> torch.Tensor:
    """Same result as :func:`shift_by_gather`: replicate-pad by concatenating edge rows and columns,
    then one slice per sample (the offsets are read on the host)."""
    h, w = image.shape[2:]
    padded = torch.cat([image[:, :, :1].expand(-1, -1, pad, -1), image, image[:, :, -1:].expand(-1, -1, pad, -1)], 2)
    padded = torch.cat([padded[..., :1].expand(-1, -1, -1, pad), padded, padded[..., -1:].expand(-1, -1, -1, pad)], 3)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(shift.tolist())])
