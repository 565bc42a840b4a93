"""Priority and placement of MAX's CPU worker threads.

MAX's CPU worker threads ("Thread0", "Thread1", ... one per core) busy-wait
for a while after each kernel, and MAX 26.7 offers no working knob for it
(``MODULAR_THREAD_BUSY_WAIT_US`` and ``InferenceSession(num_threads=...)``
abort with "getOrCreateCPUDevice called requesting different options").
Two things follow, both measured on 2 cores:

- The Python thread that drives each step (batching, sampling, KV
  bookkeeping) competes with spinning workers and loses scheduler time
  slices (decode steps of ~15 ms took ~20 ms every third or fourth step).
  A raised niceness lets it preempt a spinning worker; when the workers
  compute, the driving thread is blocked, so they lose nothing to it.
- Every kernel forks to all workers and joins, so a step advances at the
  pace of the slowest worker. Left to float, two low-weight workers beside
  another process's busy thread get stacked on one core by the scheduler's
  load balancing (their weights add up to less than that thread's), where
  they time-share, and every join waits for a time slice. Each worker is
  therefore pinned to a core of its own, and the niceness is moderate, so a
  worker that shares its core with an outside process still gets a fair
  part of it.
"""

from __future__ import annotations

import logging
import os
import sys

from .max_compat import MAX_CPU_WORKER_THREAD_NAME

logger = logging.getLogger(__name__)

# Weight ~1/3 of a nice-0 thread: the driving thread still preempts a spinning
# worker, and a worker beside an outside busy thread keeps ~1/4 of its core.
WORKER_NICENESS = 5


def cpu_workers() -> list[tuple[int, int]]:
    """(worker index, thread id) of this process's MAX CPU workers, by index; empty off Linux."""
    workers = []
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/comm", encoding="utf-8", errors="replace") as f:
                match = MAX_CPU_WORKER_THREAD_NAME.search(f.read().strip())
        except OSError:  # thread gone
            continue
        if match:
            workers.append((int(match.group(1)), int(tid)))
    return sorted(workers)


def place_cpu_workers(niceness: int = WORKER_NICENESS) -> int:
    """Raises the niceness of this process's MAX CPU workers and pins each to one allowed CPU (Linux).

    Worker ``i`` goes to the ``i``-th CPU this process may run on; with more
    workers than such CPUs they are left to float. A niceness is only ever
    raised (lowering it needs privileges). Returns how many workers were
    placed; 0 elsewhere or when none exist yet (they start with the first CPU
    device). Never raises: a failure only costs the speed-up.
    """
    if not sys.platform.startswith("linux"):
        return 0
    workers = cpu_workers()
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except OSError:
        allowed = []
    pin = 0 < len(workers) <= len(allowed)
    placed = 0
    for index, tid in workers:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
            if pin:
                os.sched_setaffinity(tid, {allowed[index % len(allowed)]})
            placed += 1
        except OSError as exc:  # thread gone, or not permitted
            logger.debug("could not place CPU worker thread %s: %s", tid, exc)
    return placed
