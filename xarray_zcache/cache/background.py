"""Background threads give way to the threads that read.

The disk writer and maintenance run at a lower scheduling priority than the rest of the
process (`lower_priority`): on a busy machine (two cores, a Dask compute using both) the
kernel runs a reader's thread before them, so the cold pass's leftover disk writes, or
an eviction pass, cost a warm read as little CPU time as possible. On Linux a thread is
a task of its own and ``setpriority`` on its id changes that thread only; raising one's
own niceness needs no privilege. Elsewhere, or where it is refused, nothing changes.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Final

__all__ = ["BACKGROUND_NICENESS", "lower_priority"]

#: niceness added to a background thread (0 normal, 19 lowest; the kernel gives a
#: thread at +10 about a tenth of the CPU time of one at 0 when both want it)
BACKGROUND_NICENESS: Final = 10


def lower_priority(increment: int = BACKGROUND_NICENESS) -> bool:
    """Lower the calling thread's scheduling priority by ``increment`` (Linux only);
    whether it was done. Never raises."""
    if not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, current + increment))
    except OSError:
        return False
    return True
