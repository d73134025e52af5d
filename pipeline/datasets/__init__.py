"""Everything that touches stored transitions: the Zarr store, collection, replay, sharing.

Public types are importable from here (``from pipeline.datasets import DictReplayBuffer``); they
load on first use so that commands which never sample (``collect``) do not import torch.
"""

_EXPORTS = {
    "Episode": "pipeline.datasets.episode",
    "EpisodeRecorder": "pipeline.datasets.episode",
    "EpisodeWriter": "pipeline.datasets.store",
    "TransitionStore": "pipeline.datasets.store",
    "DictReplayBuffer": "pipeline.datasets.replay",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'pipeline.datasets' has no attribute {name!r}")
