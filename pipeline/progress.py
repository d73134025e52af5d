"""The one progress bar every long command shows (collect, train, eval, verify, push/pull, merge,
loading a replay buffer): a rich bar, or nothing at all when it is off.

::

    with ProgressBar(enabled, "[bold]eval", total=10, unit="episodes", fields={"last": ""}) as bar:
        ...
        bar.advance(1, last="racetrack seed 0: RC 100%")

The bar takes the room its figures leave (``ratio=1``), so at 80 columns it shrinks and the counts,
rates and fields stay whole. ``fields`` are named values shown by ``template`` (a rich
format string over ``task.fields``) and changed by :meth:`update` / :meth:`advance`.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeRemainingColumn, TransferSpeedColumn)
from rich.table import Column


#: Redraws a second. rich redraws on a thread of its own, in Python, holding the GIL the env loop
#: (or the learner) needs: ~2 ms a redraw of collect's bar. At rich's default of 10 a second that
#: was ~1.9% of collect's wall time, 0.55-0.64% at 2 (benchmarks/progress_cost.py), and collect's
#: figures change about once a second anyway (at each commit).
REFRESH_PER_S = 2


def stderr_terminal() -> Console | None:
    """A console on stderr when stderr is a terminal, else None (no bar in logs and pipes)."""
    console = Console(stderr=True)
    return console if console.is_terminal else None


class ProgressBar:
    """A rich progress bar of ``total`` steps from ``done``, or a no-op when ``enabled`` is false.

    ``label``: the name at the left, rich markup allowed (``"[bold]train"``); a long one, such as
    a URL, is cut at 32 columns.
    ``unit``: ``"bytes"`` shows sizes and a transfer rate; anything else ``done/total unit``.
    ``template``: a rich format string over ``fields`` shown after the counts, e.g.
    ``"{task.fields[sps]:5.0f} steps/s"``. ``eta``: rich's time-remaining column (off when the
    caller shows its own, as ``train`` does). ``transient``: the bar disappears when done.
    ``console``: where it draws (rich's default console, stdout, when None; ``stderr=True``
    draws on stderr).
    """

    def __init__(self, enabled: bool, label: str, total: int, *, done: int = 0, unit: str = "",
                 fields: dict | None = None, template: str = "", eta: bool = True, transient: bool = True,
                 console: Console | None = None, stderr: bool = False):
        self.enabled, self.total, self.done = enabled, total, done
        self._progress: Progress | None = None
        if not enabled:
            return
        described = TextColumn("{task.description}",
                               table_column=Column(max_width=32, overflow="ellipsis", no_wrap=True))
        if unit == "bytes":
            counts = [DownloadColumn(), TransferSpeedColumn()]
        else:
            counts = [MofNCompleteColumn()] + ([TextColumn(unit)] if unit else [])
        columns = [described, BarColumn(bar_width=None, table_column=Column(ratio=1)), *counts]
        if template:
            columns.append(TextColumn(template))
        if eta:
            columns.append(TimeRemainingColumn())
        if console is None and stderr:
            console = Console(stderr=True)
        self._progress = Progress(*columns, console=console, transient=transient,
                                  refresh_per_second=REFRESH_PER_S)
        self._task = self._progress.add_task(label, total=total, completed=done, **(fields or {}))

    def __enter__(self) -> "ProgressBar":
        if self._progress is not None:
            self._progress.start()
        return self

    def advance(self, amount: int = 1, **fields) -> None:
        """``amount`` more steps done; ``fields`` change the values the template shows."""
        if self._progress is not None:
            self._progress.update(self._task, advance=amount, **fields)

    def update(self, completed: int | None = None, **fields) -> None:
        """Set the steps done (when given) and the template's ``fields``."""
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, **fields)

    def __exit__(self, *exc) -> bool:
        if self._progress is not None:
            self._progress.stop()
        return False
