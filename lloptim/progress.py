"""Progress bars for long runs, on stderr, without touching the code that does the work.

:func:`watch` polls a counter from a background thread and draws a tqdm bar, so a hot loop (the
engine's) pays nothing for being watched: it only keeps the counter it keeps anyway. The bar
appears only after :data:`DELAY_S` seconds, so short runs print nothing, and it is removed when
the work ends.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["watch", "DELAY_S", "POLL_S"]

#: Seconds a run must last before its bar appears.
DELAY_S = 1.0
#: Seconds between two reads of the counter.
POLL_S = 0.25


@contextmanager
def watch(count: Callable[[], int], total: int, desc: str, enabled: bool = True, unit: str = "it") -> Iterator[None]:
    """Show ``count()`` out of ``total`` as a progress bar on stderr while the block runs.

    Parameters
    ----------
    count
        Returns how much is done (read from another thread: it must be cheap and never raise).
    total
        How much there is to do (same unit).
    desc
        Label of the bar.
    enabled
        False shows nothing (``--json`` runs).
    unit
        Unit of the count, for the bar's rate.
    """
    if not enabled or total <= 0:
        yield
        return
    from tqdm.auto import tqdm

    done = threading.Event()
    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, delay=DELAY_S, leave=False, dynamic_ncols=True)

    def poll() -> None:
        while not done.wait(POLL_S):
            try:
                bar.n = min(int(count()), total)
                bar.refresh()
            except Exception:  # noqa: BLE001 - a progress bar must never break the run it watches
                return

    thread = threading.Thread(target=poll, name=f"lloptim-progress-{desc}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        bar.close()
