"""Host-thread priority for MAX's CPU runtime.

MAX's CPU worker threads ("Thread0", "Thread1", ... one per core) busy-wait
for a while after each kernel, and MAX 26.7 offers no working knob for it
(``MODULAR_THREAD_BUSY_WAIT_US`` and ``InferenceSession(num_threads=...)``
abort with "getOrCreateCPUDevice called requesting different options").
With as many workers as cores, the Python thread that drives each step
(batching, sampling, KV bookkeeping) then competes with spinning workers and
loses whole scheduler time slices: measured on 2 cores, decode steps of
~15 ms took ~20 ms every third or fourth step. Lowering the workers' priority
lets the driving thread preempt a spinning worker at once; when the workers
compute, the driving thread is blocked, so they lose nothing.
"""

from __future__ import annotations

import logging
import os
import sys

from .max_compat import MAX_CPU_WORKER_THREAD_NAME

logger = logging.getLogger(__name__)

WORKER_NICENESS = 10  # relative weight ~1/10 of a nice-0 thread under CFS


def lower_cpu_worker_priority(niceness: int = WORKER_NICENESS) -> int:
    """Raises the niceness of this process's MAX CPU worker threads (Linux).

    Returns how many threads were changed; 0 elsewhere or when none exist yet
    (they start with the first CPU device). Never raises: a failure only costs
    the speed-up.
    """
    if not sys.platform.startswith("linux"):
        return 0
    changed = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                name = f.read().strip()
            if MAX_CPU_WORKER_THREAD_NAME.search(name) and os.getpriority(os.PRIO_PROCESS, int(tid)) < niceness:
                os.setpriority(os.PRIO_PROCESS, int(tid), niceness)
                changed += 1
        except OSError as exc:  # thread gone, or not permitted
            logger.debug("could not lower priority of thread %s: %s", tid, exc)
    return changed
