"""``datasets stats``: out-of-core statistics of a store with dask arrays, and an optional PNG.

Each array is wrapped chunk for chunk (``dask.array.from_array`` over the zarr array) and reduced
in two passes over the committed rows (moments and ranges, then histograms), so memory stays at a
few chunks whatever the store's size, local or remote.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.datasets.store import TransitionStore
from pipeline.errors import PipelineError


def _lazy(array, rows: int):
    import dask.array as da

    return da.from_array(array, chunks=array.chunks, lock=False, fancy=False)[:rows]


def _hist(counts, edges) -> dict:
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _describe(values: np.ndarray) -> dict | None:
    if not len(values):
        return None
    return {"mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max())}


def dataset_stats(url: str, *, bins: int = 20, png: str | None = None, storage_options: dict | None = None,
                  cache: str | None = None, verify: bool = True) -> dict:
    """Statistics of the committed data of the store at ``url`` (a JSON-able dict).

    - ``vector``: per field (``fields``) ``mean``, ``std`` (float64 accumulation) and ``nonfinite``
      counts over all observations;
    - ``reward``: mean/std/min/max and a ``bins``-bin histogram over [min, max];
    - ``action``: per field mean/std and ``bins``-bin histograms over the action box [-1, 1]
      (``outside`` counts values beyond it);
    - ``terminated``/``truncated`` counts, episode ``return`` and ``length`` summaries.

    With ``png`` a figure of the three is written there. ``verify``: check every chunk read
    against its recorded checksum (a damaged chunk stops the statistics with a StoreError).
    """
    import dask
    import dask.array as da

    if bins < 1:
        raise PipelineError(f"--bins must be positive, got {bins}")
    store = TransitionStore(url, storage_options, cache, verify=verify)
    n, o = store.num_transitions, store.num_observations
    vector = _lazy(store.vector, o).astype(np.float64)
    action = _lazy(store.action, n).astype(np.float64)
    reward = _lazy(store.reward, n).astype(np.float64)
    finite = da.where(da.isfinite(vector), vector, 0.0)
    low, high = store.action_spec.to_dict()["low"], store.action_spec.to_dict()["high"]
    first = dict(
        v_sum=finite.sum(0), v_sq=(finite**2).sum(0), v_bad=(~da.isfinite(vector)).sum(0),
        a_mean=action.mean(0), a_std=action.std(0), outside=((action < low) | (action > high)).sum(0),
        r_mean=reward.mean(), r_std=reward.std(), r_min=reward.min(), r_max=reward.max(),
        terminated=_lazy(store.terminated, n).sum(), truncated=_lazy(store.truncated, n).sum(),
    ) if n else {}
    with dask.config.set(scheduler="threads"):
        first = dict(zip(first, dask.compute(*first.values())))
        fields, action_fields = list(store.obs_spec.vector_fields), list(store.action_spec.fields)
        result = {"url": store.url, "episodes": store.num_episodes, "transitions": n, "observations": o}
        if not n:
            return {**result, "vector": None, "reward": None, "action": None, "terminated": 0,
                    "truncated": 0, "return": None, "length": None, "png": None}
        count = np.maximum(o - first["v_bad"], 1)
        mean = first["v_sum"] / count
        r_range = (first["r_min"], first["r_max"] if first["r_max"] > first["r_min"] else first["r_min"] + 1)
        hists = dask.compute(da.histogram(reward, bins=bins, range=r_range),
                             *(da.histogram(action[:, j], bins=bins, range=(low, high))
                               for j in range(len(action_fields))))
    result.update(
        vector={"fields": fields, "mean": mean.tolist(),
                "std": np.sqrt(np.maximum(first["v_sq"] / count - mean**2, 0.0)).tolist(),
                "nonfinite": first["v_bad"].astype(int).tolist()},
        reward={"mean": float(first["r_mean"]), "std": float(first["r_std"]), "min": float(first["r_min"]),
                "max": float(first["r_max"]), "hist": _hist(*hists[0])},
        action={"fields": action_fields, "mean": first["a_mean"].tolist(), "std": first["a_std"].tolist(),
                "outside": first["outside"].astype(int).tolist(), "hist": [_hist(*h) for h in hists[1:]]},
        terminated=int(first["terminated"]), truncated=int(first["truncated"]),
        **{"return": _describe(store.episodes["return"]), "length": _describe(store.episodes["length"])},
        png=None,
    )
    if png is not None:
        result["png"] = str(write_png(result, png))
    return result


def write_png(stats: dict, path: str) -> Path:
    """Plot :func:`dataset_stats` output (vector mean +- std, reward and action histograms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.is_dir():  # a folder: the plot goes into it, and the message names the file
        path = path / "stats.png"
    elif not path.suffix:  # matplotlib would add ".png" itself, and the message would miss it
        path = path.with_suffix(".png")
    fig, (ax_v, ax_r, ax_a) = plt.subplots(3, 1, figsize=(10, 10), constrained_layout=True)
    v = stats["vector"]
    x = np.arange(len(v["fields"]))
    ax_v.errorbar(x, v["mean"], yerr=v["std"], fmt="o", capsize=3)
    ax_v.set_xticks(x, v["fields"], rotation=60, fontsize=8)
    ax_v.set_title("vector: mean +- std per field")
    for ax, hists, labels, title in ((ax_r, [stats["reward"]["hist"]], ["reward"], "reward"),
                                     (ax_a, stats["action"]["hist"], stats["action"]["fields"], "action")):
        for hist, label in zip(hists, labels):
            ax.stairs(hist["counts"], hist["edges"], label=label)
        ax.set_title(f"{title} histogram")
        ax.set_ylabel("transitions")
        ax.legend()
    fig.suptitle(f"{stats['url']}: {stats['episodes']} episodes, {stats['transitions']} transitions")
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise PipelineError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return path
