"""Ctrl-C and SIGTERM at the end of a stage: the save that keeps what was done is finished anyway.

A stage takes the first interrupt as "stop now and keep what you have": it stops, then saves
(``collect``: the last commit of the episodes it finished; ``train``: the last checkpoint). An
interrupt that lands during that save would otherwise escape it, and what the save was for, and
the clean-up after it, would be given up. So the save is run again once. A second interrupt (one
during the save after one that stopped the stage, or one during the save run again) gives up at
once, as a second Ctrl-C does elsewhere; what is on disk is then the last whole save before it.
"""

from __future__ import annotations

from typing import Callable


def save_despite_an_interrupt(save: Callable[[], object], interrupted: bool) -> bool:
    """Run ``save``; if the stage's first interrupt lands during it, run it again. ``interrupted``:
    whether the stage was interrupted before. Returns whether it has been now."""
    try:
        save()
    except KeyboardInterrupt:
        if interrupted:
            raise
        save()
        return True
    return interrupted
