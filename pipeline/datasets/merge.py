"""``datasets merge``: concatenate stores with compatible specs into a new one, keeping provenance.

The sources are only read. Each episode is copied bit for bit through the store's own writer (so
the result is crash-safe and checksummed like any store) and tagged with its source:
``episodes/source`` indexes ``attrs["sources"]``, one entry per original store (URL without
credentials, created time, software version, meta, episode count). Merging merged stores keeps
the original sources rather than nesting them.
"""

from __future__ import annotations

import numpy as np

from pipeline.datasets.remote import _Progress, display_url, store_location
from pipeline.datasets.store import EpisodeWriter, TransitionStore, _exists, _fs_path
from pipeline.envs.driving import reward_difference
from pipeline.errors import PipelineError, SpecMismatchError, StoreError


def _differences(store: TransitionStore, reference: TransitionStore) -> list[str]:
    """The spec fields in which ``store`` differs from ``reference``, with both values."""
    mine, theirs = store.obs_spec.to_dict(), reference.obs_spec.to_dict()
    diffs = [f"obs_spec.{k}: {mine[k]!r} != {theirs[k]!r}" for k in store.obs_spec.mismatch(reference.obs_spec)]
    mine, theirs = store.action_spec.to_dict(), reference.action_spec.to_dict()
    diffs += [f"action_spec.{k}: {mine[k]!r} != {theirs[k]!r}" for k in mine if mine[k] != theirs.get(k)]
    reward = reward_difference(store.reward_definition, reference.reward_definition)
    if reward:  # returns of two reward definitions must not end up side by side unnoticed
        diffs.append(f"reward: {reward}")
    return diffs


def _describe(store: TransitionStore) -> dict:
    return {"url": display_url(store.url), "id": store.attrs.get("id"), "created": store.attrs.get("created"),
            "software_version": store.attrs.get("software_version"), "meta": store.meta}


def _provenance(stores: list[TransitionStore]) -> tuple[list[dict], list[np.ndarray]]:
    """The merged ``sources`` list, and for each store the source index of each of its episodes.

    A merged input contributes its own sources (so provenance never nests); episodes recorded
    straight into a store (source -1) are attributed to that store. A store met twice (same id)
    is one source.
    """
    sources: list[dict] = []
    index: dict[tuple, int] = {}

    def add(source: dict) -> int:
        key = (source.get("id"), source.get("created"), source.get("url"))
        if key not in index:
            index[key] = len(sources)
            sources.append(source)
        return index[key]

    per_store = []
    for store in stores:
        column = store.episodes["source"].astype(np.int64)
        mapping = np.array([add(dict(source)) for source in store.sources] + [-1], dtype=np.int64)
        if np.any(column < 0):
            mapping[-1] = add(_describe(store))
        per_store.append(mapping[column])  # column -1 picks the last entry: the store itself
    return sources, per_store


def _common_meta(stores: list[TransitionStore]) -> dict:
    """Meta entries every source agrees on (e.g. backend), plus how many stores were merged."""
    first = stores[0].meta
    common = {k: v for k, v in first.items() if all(s.meta.get(k) == v for s in stores[1:])}
    return {**common, "merged_stores": len(stores)}


def merge_stores(sources: list[str], out: str, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Write every committed episode of ``sources`` (in order) into a new store at ``out``.

    Refuses (:class:`SpecMismatchError`) sources whose observation or action specs differ, naming
    each differing field; refuses an ``out`` that is one of the sources. ``overwrite`` replaces a
    zarr store already at ``out``. Returns ``{"out", "episodes", "transitions", "sources"}``.
    """
    if len(sources) < 2:
        raise PipelineError("merge needs at least two stores")
    if store_location(out) in {store_location(url) for url in sources}:
        raise StoreError(f"the output {display_url(out)} is one of the sources; merge never "
                         "modifies its sources: choose another -o")
    if not overwrite and _exists(*_fs_path(out, None)):
        raise StoreError(f"{display_url(out)} already exists; pass --overwrite to replace it")
    stores = [TransitionStore(url) for url in sources]
    for store in stores[1:]:
        diffs = _differences(store, stores[0])
        if diffs:
            raise SpecMismatchError(f"cannot merge {display_url(store.url)} with "
                                    f"{display_url(stores[0].url)}: {'; '.join(diffs)}")
    provenance, indices = _provenance(stores)
    total = sum(store.num_episodes for store in stores)
    with EpisodeWriter(out, stores[0].obs_spec, stores[0].action_spec, meta=_common_meta(stores),
                       mode="overwrite" if overwrite else "create", sources=provenance,
                       reward=stores[0].reward_definition) as writer, \
            _Progress(progress, f"merge -> {display_url(out)}", total, unit="items") as bar:
        for store, index in zip(stores, indices):
            for i in range(store.num_episodes):
                writer.append(store.episode(i), source=int(index[i]))
                bar.advance()
        transitions = writer.num_transitions
    return {"out": display_url(out), "episodes": total, "transitions": transitions,
            "sources": provenance}
