"""``datasets merge``: concatenate stores with compatible specs into a new one, keeping provenance.

The sources are only read. Each episode is copied bit for bit through the store's own writer (so
the result is crash-safe and checksummed like any store) and tagged with its source:
``episodes/source`` indexes ``attrs["sources"]``, one entry per original store (URL without
credentials, created time, software version, meta, episode count). Merging merged stores keeps
the original sources rather than nesting them.
"""

from __future__ import annotations

import numpy as np

from pipeline.datasets.store import EpisodeWriter, TransitionStore, interrupted_creation, remove_store
from pipeline.datasets.urls import display_url, exists, fs_path, store_location
from pipeline.envs.driving import reward_difference
from pipeline.errors import PipelineError, SpecMismatchError, StoreError
from pipeline.progress import ProgressBar, stderr_terminal


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


def _origin(source: dict) -> tuple:
    """Which recorded dataset a source entry names: its id (a pulled copy has the same one)."""
    return (source.get("id"),) if source.get("id") else (source.get("created"), source.get("url"))


def _plan(stores: list[TransitionStore], counts: list[int], provenance: list[dict],
          indices: list[np.ndarray]) -> tuple[list[tuple[int, int, int]], list[dict]]:
    """The episodes to write, as ``(store, episode, source)``, each recorded episode once.

    An episode is known by its origin (the dataset it was recorded into) and its ordinal among
    that origin's episodes in the store it is read from: merges copy every episode in order, so
    the k-th episode of origin ``a`` is the same episode in ``a``, in a copy of ``a`` and in any
    merge that includes ``a``. Returns the plan and, per store that repeats episodes, how many
    and which earlier store they were taken from.
    """
    seen: dict[tuple, str] = {}  # episode key -> the store it is taken from
    plan, duplicates = [], []
    for s, (store, count, index) in enumerate(zip(stores, counts, indices)):
        ordinal: dict[tuple, int] = {}
        repeated: dict[str, int] = {}
        for i in range(count):
            origin = _origin(provenance[int(index[i])])
            key = (origin, ordinal.get(origin, 0))
            ordinal[origin] = key[1] + 1
            if key in seen:
                repeated[seen[key]] = repeated.get(seen[key], 0) + 1
                continue
            seen[key] = display_url(store.url)
            plan.append((s, i, int(index[i])))
        duplicates += [{"store": display_url(store.url), "episodes": n, "of": url}
                       for url, n in repeated.items()]
    return plan, duplicates


def _used_sources(provenance: list[dict], plan: list[tuple[int, int, int]]) -> tuple[list[dict], dict[int, int]]:
    """Only the sources some planned episode comes from, and the old -> new index mapping."""
    used = sorted({source for _, _, source in plan})
    return [provenance[j] for j in used], {j: new for new, j in enumerate(used)}


def merge_stores(sources: list[str], out: str, *, overwrite: bool = False, resume: bool = False,
                 verify: bool = True, progress: bool = False) -> dict:
    """Write every committed episode of ``sources`` (in order) into a new store at ``out``.

    Refuses (:class:`SpecMismatchError`) sources whose observation or action specs differ, naming
    each differing field; refuses an ``out`` that is one of the sources and a source given twice.
    An episode that an earlier source already holds (overlapping merges, a store and its copy) is
    written once; the result's ``duplicates`` says which store repeated how many of whose.

    The output is marked unfinished until its last episode is committed: a merge killed midway
    leaves a store that every reader refuses, and ``resume`` completes it (the same sources, in
    the same order, read up to the episode counts they had when the merge began). A merge that
    fails on a damaged source removes the output it created. ``overwrite`` replaces a zarr store
    already at ``out``. ``verify``: check every chunk read against its checksum.
    Returns ``{"out", "episodes", "transitions", "sources", "duplicates", "resumed"}``.

    Long because every refusal must come before the writer opens the output (a refused merge
    writes nothing), in the order a user meets them; the steps after it are small helpers.
    """
    if len(sources) < 2:
        raise PipelineError("merge needs at least two stores")
    if resume and overwrite:
        raise PipelineError("--resume and --overwrite exclude each other")
    locations = [store_location(url) for url in sources]
    if store_location(out) in locations:
        raise StoreError(f"the output {display_url(out)} is one of the sources; merge never "
                         "modifies its sources: choose another -o")
    twice = next((url for i, url in enumerate(sources) if locations[i] in locations[:i]), None)
    if twice is not None:
        raise StoreError(f"{display_url(twice)} is given twice; merging a store with itself would "
                         "repeat every episode")
    out_exists = exists(*fs_path(out, None))
    cut_short = resume and out_exists and interrupted_creation(out)  # killed before the store was made
    out_exists = out_exists and not cut_short
    marker = {"operation": "merge", "out": display_url(out), "sources": [display_url(u) for u in sources]}
    previous = TransitionStore(out, verify=verify, allow_unfinished=True) if resume and out_exists else None
    if out_exists and not (overwrite or resume):
        raise StoreError(f"{display_url(out)} already exists; pass --overwrite to replace it"
                         + (" or --resume to complete it" if _is_unfinished(out) else ""))
    stores = [TransitionStore(url, verify=verify) for url in sources]
    for store in stores[1:]:
        diffs = _differences(store, stores[0])
        if diffs:
            raise SpecMismatchError(f"cannot merge {display_url(store.url)} with "
                                    f"{display_url(stores[0].url)}: {'; '.join(diffs)}")
    counts = [store.num_episodes for store in stores]
    marker["ids"] = [store.attrs.get("id") for store in stores]
    if previous is not None and previous.unfinished:
        counts = _resumable_counts(previous.unfinished, marker, stores)
    marker["counts"] = counts
    provenance, indices = _provenance(stores)
    plan, duplicates = _plan(stores, counts, provenance, indices)
    provenance, renumber = _used_sources(provenance, plan)
    marker["episodes"] = len(plan)
    done = previous.num_episodes if previous is not None else 0
    if previous is not None and not previous.unfinished:
        # killed after its last commit, or run twice: done if it holds what these sources give
        if done != len(plan) or [s.get("id") for s in previous.sources] != [s.get("id") for s in provenance]:
            raise StoreError(f"nothing to resume: {display_url(out)} is a finished store of {done} episodes, "
                             f"not the merge of these sources ({len(plan)}); choose another -o or --overwrite")
        return {"out": display_url(out), "episodes": done, "transitions": previous.num_transitions,
                "sources": provenance, "duplicates": duplicates, "resumed": done}
    mode = "append" if previous is not None or cut_short else "overwrite" if overwrite else "create"
    writer = EpisodeWriter(out, stores[0].obs_spec, stores[0].action_spec, meta=_common_meta(stores), mode=mode,
                           sources=None if previous is not None else provenance, unfinished=marker,
                           reward=stores[0].reward_definition)
    try:
        console = stderr_terminal() if progress else None
        with writer, ProgressBar(console is not None, f"merge -> {display_url(out)}", len(plan), console=console) as bar:
            bar.advance(done)
            for s, i, source in plan[done:]:
                writer.append(stores[s].episode(i), source=renumber[source])
                bar.advance()
            writer.finish()
            transitions = writer.num_transitions
    except PipelineError:
        if previous is None:  # what this run began is not whole: leave nothing behind
            remove_store(out)
        raise
    return {"out": display_url(out), "episodes": len(plan), "transitions": transitions,
            "sources": provenance, "duplicates": duplicates, "resumed": done if previous is not None else None}


def _is_unfinished(url: str) -> bool:
    try:
        return bool(TransitionStore(url, verify=False, allow_unfinished=True).unfinished)
    except PipelineError:
        return False


def _resumable_counts(stored: dict, marker: dict, stores: list[TransitionStore]) -> list[int]:
    """The source episode counts the interrupted merge planned with; refuses other sources."""
    if stored.get("sources") != marker["sources"] or stored.get("ids") != marker["ids"]:
        raise StoreError(f"{marker['out']} was being merged from {' '.join(stored.get('sources', []))}; "
                         "resume it with the same sources in the same order")
    counts = [int(c) for c in stored.get("counts", [])]
    short = next((store for store, c in zip(stores, counts) if store.num_episodes < c), None)
    if short is not None:
        raise StoreError(f"{display_url(short.url)} has fewer episodes than when the merge began; "
                         "start the merge again with --overwrite")
    return counts
