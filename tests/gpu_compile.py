"""Compiling the whole pipeline for sm_90 GPUs with no GPU (MAX's virtual device mode).

``max warm-cache --target cuda:sm_90`` builds the pipeline's graphs for the
GPU target without running them. :func:`warm_cache` runs it for one or more
device lists in ONE fresh process (the virtual device mode is per process and
must be set before any device exists; one process also spares each device
count MAX's and Python's start-up), and says how long each took.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

_DRIVER = """
import sys, time
from qwen3vl_moe.max_compat import run_max_commands
model, flags, device_lists = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
for devices in device_lists:
    start = time.perf_counter()
    run_max_commands([["warm-cache", "--custom-architectures", "qwen3vl_moe", "--model-path", model,
                       "--devices", devices, "--target", "cuda:sm_90", *flags]])
    print(f"warm-cache for {devices} took {time.perf_counter() - start:.1f} s", flush=True)
"""

FLAGS = "--max-length 1024 --max-batch-size 4"


def warm_cache(model_path: Path, *device_lists: str, timeout: float = 3000) -> tuple[str, dict[str, float]]:
    """(the log, seconds per device list) of compiling the pipeline for each of ``device_lists`` ("gpu", "gpu:0,1")."""
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(model_path), FLAGS, *device_lists],
        capture_output=True, text=True, env=dict(os.environ), timeout=timeout,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    seconds = {m[1]: float(m[2]) for m in re.finditer(r"warm-cache for (\S+) took ([\d.]+) s", log)}
    assert list(seconds) == list(device_lists), log[-6000:]
    return log, seconds
