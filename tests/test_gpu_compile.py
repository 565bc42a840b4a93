"""The whole model (vision encoder + text decoder, Mojo ops included) compiles for sm_90.

No GPU is needed: MAX's virtual device mode (``--target cuda:sm_90``) builds the
pipeline's graphs for the GPU target without running them. Slow (several
minutes on 2 cores, most of it MAX's own GPU attention kernels).
"""

from __future__ import annotations

import pytest

from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

from gpu_compile import warm_cache

pytestmark = pytest.mark.slow  # every test here runs compiled graphs


@pytest.mark.parametrize("preset", ["moe"])
def test_pipeline_compiles_for_sm90(preset):
    log, _ = warm_cache(tiny_checkpoint(preset), "gpu")
    assert "Building, compiling, and initializing model took" in log
