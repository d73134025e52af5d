"""DictReplayBuffer: the learner's batches, sampled from memory and streamed from disk.

Why not "read Zarr per sample": random reads of 256 stacked observations from a store cost
0.1-1.2 s per batch (every chunk touched costs ~0.5 ms of codec and Python overhead), while a
numpy gather from a frame-deduplicated array in RAM costs ~1 ms. So the buffer keeps frames in
memory and only ever reads the store sequentially, chunk by chunk.

Storage, sampling and prefetching are separate types, one module each (DrQ-v2 keeps storage
apart from the loader; torchrl keeps storage, sampler and writer as small public types):

- storage: two sources in the frame-deduplicated layout of :mod:`pipeline.datasets.episode`
  (observation ``t`` of an episode is ``frames[f0 + t : f0 + t + K]``):

  * :class:`OfflineSource` (``offline.py``), a dataset store. When its decompressed arrays fit
    ``memory_budget`` they are loaded once ("memory" mode). Otherwise ("reservoir" mode) the per-step arrays
    (vectors, actions, rewards: ~1.5 % of the bytes) are loaded whole and the frames live in
    ``n_slots`` slots of chunk-aligned segments; a background thread replaces the oldest slot with
    the next segment of the store, cycling through all of it, and the slots never exceed the
    budget. Consecutive segments overlap by one chunk, so every transition lies wholly inside some
    segment.
  * :class:`OnlineRing` (``online.py``), the last ``online_capacity`` transitions passed to
    :meth:`add`, in rings indexed by global counters; completed episodes also go to the run's ``online.zarr``.

- sampling (:class:`Sampler`, ``sampler.py``): each source turns ``b`` random draws into positions
  (:class:`Rows`: first frame of ``obs``, its vector row, its step row, and ``n`` = steps summed,
  cut at the episode end), and one gather builds images, vectors and n-step targets with numpy
  fancy indexing (``np.take`` with ``mode="wrap"``: the ring wraps for free, and unlike the default
  mode it writes straight into the output without a temporary).
- prefetching (:class:`Prefetcher`, ``prefetch.py``): a thread assembles batches ahead into
  recycled host buffers (pinned memory when the device is CUDA, moved to the device on a side
  stream). ``frames_on_device=True`` keeps frames in device memory and gathers image stacks there.

:class:`DictReplayBuffer` (``buffer.py``) composes them: ``add`` feeds the ring (and the run's
``online.zarr``), ``sample`` asks the prefetcher. Shared frame storage helpers: ``frames.py``.
"""

from pipeline.datasets.replay.buffer import DictReplayBuffer, parse_bytes
from pipeline.datasets.replay.frames import Rows
from pipeline.datasets.replay.offline import OfflineSource
from pipeline.datasets.replay.online import OnlineRing
from pipeline.datasets.replay.prefetch import Prefetcher
from pipeline.datasets.replay.sampler import Sampler

__all__ = ["DictReplayBuffer", "OfflineSource", "OnlineRing", "Prefetcher", "Rows", "Sampler", "parse_bytes"]
