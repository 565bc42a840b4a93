"""MAX's CPU workers get the package's niceness and one allowed CPU each (cpu_threads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# In a fresh process: MAX's workers start with the first CPU device.
_PLACE = """
import json, os
from max.driver import CPU
from qwen3vl_moe.cpu_threads import WORKER_NICENESS, cpu_workers, place_cpu_workers
device = CPU()
placed = place_cpu_workers()
again = place_cpu_workers()
print(json.dumps({
    "niceness": WORKER_NICENESS,
    "placed": placed,
    "again": again,
    "allowed": sorted(os.sched_getaffinity(0)),
    "workers": [[index, os.getpriority(os.PRIO_PROCESS, tid), sorted(os.sched_getaffinity(tid))]
                for index, tid in cpu_workers()],
}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread placement is Linux-only")
def test_workers_get_the_niceness_and_a_cpu_each() -> None:
    out = subprocess.run([sys.executable, "-c", _PLACE], capture_output=True, text=True, check=True,
                         env={**os.environ, "MODULAR_TELEMETRY_ENABLED": "0"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    workers, allowed = result["workers"], result["allowed"]
    assert workers, "MAX started no CPU worker threads named ThreadN"
    assert [index for index, _, _ in workers] == list(range(len(workers)))
    assert result["placed"] == result["again"] == len(workers)  # idempotent
    for index, niceness, cpus in workers:
        assert niceness == result["niceness"]
        # pinned to a CPU of their own when there are enough; left to float otherwise
        assert cpus == ([allowed[index]] if len(workers) <= len(allowed) else allowed)
