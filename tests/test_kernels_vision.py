"""Vision Mojo op (mojo_kernels/vision): bilinear_pos_embed.

One module-scoped CPU graph holds the op with symbolic dims (table rows/hidden,
G, pos rows) in float32 and bfloat16 (cast inside the graph), so every
hypothesis example reuses one compiled model. Reference: transformers 5.12.1's
own ``get_vision_bilinear_indices_and_weights`` + gather/weighted sum. (The
encoder's attention op is tested in test_kernels_attention.py.)

The GPU branches are compile-checked for sm_90 in a subprocess (MAX virtual
device mode must be set before any device exists in the process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from max.dtype import DType  # noqa: E402
from max.graph import DeviceRef, Graph, TensorType, ops  # noqa: E402

from qwen3vl_moe.kernels import kernel_package  # noqa: E402
from qwen3vl_moe.kernels.vision import bilinear_pos_embed  # noqa: E402

F32, BF16, I64 = DType.float32, DType.bfloat16, DType.int64
SIDE, MERGE = 48, 2       # Qwen3-VL: 2304 position embeddings, merge 2
BUILD = Path(__file__).resolve().parents[1] / ".build"

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)


def _precompile_vision() -> Path:
    """Precompile the package once to a stable .mojoc (a new name = one cold compile)."""
    out = BUILD / "vision_kernels.mojoc"
    out.parent.mkdir(exist_ok=True)
    mojo = Path(sys.executable).parent / "mojo"
    # env=os.environ: importing max.pipelines setenv()s PYTHONEXECUTABLE to the pyenv
    # shim at C level, which makes a plain child `mojo` miss the venv.
    subprocess.run([str(mojo), "precompile", str(kernel_package("vision")), "-o", str(out)], check=True,
                   env=dict(os.environ))
    return out


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
    from max.driver import CPU
    from max.engine import InferenceSession

    ext = _precompile_vision()
    session = InferenceSession(devices=[CPU()])
    return session.load(_build_graph(DeviceRef.CPU(), ext))


def _run(model, table, grid):
    from max.driver import Buffer

    rows = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) if len(grid) else 0
    args = (table, grid, np.zeros(rows, np.float32))
    return [o.to_numpy() for o in model.execute(*[Buffer.from_numpy(np.ascontiguousarray(a)) for a in args])]


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
def _gpu_compile_main(api: str = "cuda", arch: str = "sm_90") -> None:
    from max import driver

    driver.set_virtual_device_api(api)
    driver.set_virtual_device_target_arch(arch)
    driver.set_virtual_device_count(1)
    from max.driver import CPU, Accelerator
    from max.engine import InferenceSession

    gpu = Accelerator()
    assert driver.is_virtual_device_mode()
    ext = Path(sys.argv[2]) if len(sys.argv) > 2 else kernel_package("vision")
    g = _build_graph(DeviceRef.GPU(), ext)
    t0 = time.time()
    InferenceSession(devices=[CPU(), gpu]).compile(g)   # compile only: load() needs a real GPU
    print(f"OK: vision op compiled for {api}/{arch} in {time.time() - t0:.1f}s")


@pytest.mark.slow
def test_gpu_paths_compile_sm90():
    """The op (f32 + bf16 tables) builds for a virtual cuda/sm_90 device via session.compile."""
    ext = _precompile_vision()
    r = subprocess.run([sys.executable, __file__, "--gpu-compile", str(ext)], capture_output=True,
                       text=True, env=dict(os.environ), timeout=1200)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0 and "OK: vision op compiled" in r.stdout, tail


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--gpu-compile":
    _gpu_compile_main()
