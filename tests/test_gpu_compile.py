"""The whole model (vision encoder + text decoder, Mojo ops included) compiles for sm_90.

No GPU is needed: MAX's virtual device mode (``--target cuda:sm_90``) builds the
pipeline's graphs for the GPU target without running them. Slow (several
minutes on 2 cores, most of it MAX's own GPU attention kernels).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

pytestmark = pytest.mark.slow  # every test here runs compiled graphs


@pytest.mark.parametrize("preset", ["moe"])
def test_pipeline_compiles_for_sm90(preset, tmp_path):
    max_cli = os.path.join(os.path.dirname(sys.executable), "max")
    cmd = [
        max_cli, "warm-cache", "--custom-architectures", "qwen3vl_moe",
        "--model-path", str(tiny_checkpoint(preset)), "--devices", "gpu", "--target", "cuda:sm_90",
        "--max-length", "1024", "--max-batch-size", "4",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=3000)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "Building, compiling, and initializing model took" in log
