"""Vision Mojo op (mojo_kernels/vision): qwen3vl_bilinear_pos_embed.

One module-scoped CPU graph holds the op with symbolic dims (table rows/hidden,
G, pos rows) in float32 and bfloat16 (cast inside the graph), so every
hypothesis example reuses one compiled model. Reference: transformers 5.12.1's
own ``get_vision_bilinear_indices_and_weights`` + gather/weighted sum. (The
encoder's attention op is tested in test_kernels_attention.py.)

The GPU branch is compile-checked for sm_90 (see kernel_harness).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hyp = pytest.importorskip("hypothesis")
from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from max.dtype import DType  # noqa: E402
from max.graph import DeviceRef, Graph, TensorType, ops  # noqa: E402

from kernel_harness import (  # noqa: E402
    GPU_COMPILE_FLAG, assert_gpu_compile, gpu_compile_main, hypothesis_settings, load_on_cpu, precompile,
    run_numpy,
)
from qwen3vl_moe.kernels.vision import bilinear_pos_embed  # noqa: E402

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

F32, BF16, I64 = DType.float32, DType.bfloat16, DType.int64
SIDE, MERGE = 48, 2       # Qwen3-VL: 2304 position embeddings, merge 2

SETTINGS = hypothesis_settings()


def _build_graph(dev: DeviceRef, ext: Path) -> Graph:
    ins = [
        TensorType(F32, ["P", "C"], dev),
        TensorType(I64, ["G", 3], dev),
        TensorType(F32, ["R"], dev),
    ]
    with Graph("test_vision_kernels", input_types=ins, custom_extensions=[ext]) as g:
        table, grid, rows = (x.tensor for x in g.inputs)
        pos = bilinear_pos_embed(table, grid, merge_size=MERGE, num_grid_per_side=SIDE,
                                 num_rows=rows.shape[0])
        pos16 = bilinear_pos_embed(ops.cast(table, BF16), grid, merge_size=MERGE,
                                   num_grid_per_side=SIDE)  # rows from the shape function
        g.output(pos, pos16)
    return g


@pytest.fixture(scope="module")
def vision_model():
    return load_on_cpu(_build_graph, "vision")


def _run(model, table, grid):
    rows = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) if len(grid) else 0
    return run_numpy(model, table, grid, np.zeros(rows, np.float32))


# ----------------------------------------------------------------------------- position embedding
def pos_ref(table: np.ndarray, grid: np.ndarray, bf16: bool) -> np.ndarray:
    """transformers 5.12.1: indices/weights from vision_utils, then the model's gather + sum."""
    from transformers.vision_utils import get_vision_bilinear_indices_and_weights

    idx, w = get_vision_bilinear_indices_and_weights(torch.from_numpy(grid), num_grid_per_side=SIDE,
                                                     spatial_merge_size=MERGE)
    emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(table))
    if bf16:
        emb = emb.to(torch.bfloat16)
    with torch.no_grad():
        return (emb(idx) * w[:, :, None]).sum(0).float().numpy()


grid_entry = st.tuples(st.integers(1, 3), st.integers(1, 50), st.integers(1, 50)).map(
    lambda e: (e[0], e[1] * MERGE, e[2] * MERGE))


@SETTINGS
@given(
    grid=st.lists(grid_entry, min_size=1, max_size=3),
    hidden=st.sampled_from([8, 20, 64, 1152]),
    seed=st.integers(0, 2**31 - 1),
)
@example(grid=[(1, 2, 4)], hidden=20, seed=0)               # 1x2 merged patches
@example(grid=[(1, 4, 2), (1, 2, 2)], hidden=8, seed=1)     # 2x1, 1x1
@example(grid=[(1, 96, 34)], hidden=64, seed=2)
@example(grid=[(2, 8, 6), (3, 2, 10)], hidden=1152, seed=3)  # t > 1
@example(grid=[(1, 330, 2)], hidden=8, seed=4)              # linspace n=330: y = 23.999998 -> y0 = 23
def test_bilinear_pos_embed(vision_model, grid, hidden, seed):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((SIDE * SIDE, hidden), dtype=np.float32)
    grid = np.array(grid, np.int64)
    pos, pos16 = _run(vision_model, table, grid)
    ref = pos_ref(table, grid, bf16=False)
    assert pos.shape == ref.shape and pos16.shape == ref.shape
    np.testing.assert_allclose(pos, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pos16, pos_ref(table, grid, bf16=True), rtol=1e-5, atol=1e-6)


def test_bilinear_pos_embed_bad_grid_raises(vision_model):
    table = np.ones((SIDE * SIDE, 8), np.float32)
    with pytest.raises(ValueError, match="multiples of merge_size"):
        _run(vision_model, table, np.array([[1, 3, 4]], np.int64))


# ----------------------------------------------------------------------------- GPU compile (sm_90)
def test_gpu_paths_compile_sm90():
    """The op (f32 + bf16 tables) builds for a virtual cuda/sm_90 device."""
    assert_gpu_compile(__file__, precompile("vision"))


if __name__ == "__main__" and sys.argv[1:2] == [GPU_COMPILE_FLAG]:
    gpu_compile_main(_build_graph)
