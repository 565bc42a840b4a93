"""Vision Mojo ops (mojo_kernels/vision): varlen_attention and bilinear_pos_embed.

One module-scoped CPU graph holds both ops with symbolic dims (N, heads,
head_dim, segments, table rows/hidden, G, pos rows) in float32 and bfloat16
(cast inside the graph), so every hypothesis example reuses one compiled model.
References: torch SDPA per segment, and transformers 5.12.1's own
``get_vision_bilinear_indices_and_weights`` + gather/weighted sum.

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

import torch.nn.functional as F  # noqa: E402
from max.dtype import DType  # noqa: E402
from max.graph import DeviceRef, Graph, TensorType, ops  # noqa: E402

from qwen3vl_moe.kernels import kernel_package  # noqa: E402
from qwen3vl_moe.kernels.vision import bilinear_pos_embed, varlen_attention  # noqa: E402

F32, BF16, I32, I64 = DType.float32, DType.bfloat16, DType.int32, DType.int64
SCALE = 72**-0.5          # one compile-time scale for every head_dim tested
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
    ins = [TensorType(F32, ["N", "H", "D"], dev)] * 3 + [
        TensorType(I32, ["S1"], dev),
        TensorType(F32, ["P", "C"], dev),
        TensorType(I64, ["G", 3], dev),
        TensorType(F32, ["R"], dev),
    ]
    with Graph("test_vision_kernels", input_types=ins, custom_extensions=[ext]) as g:
        q, k, v, cu, table, grid, rows = (x.tensor for x in g.inputs)
        att = varlen_attention(q, k, v, cu, scale=SCALE)
        att16 = varlen_attention(*(ops.cast(x, BF16) for x in (q, k, v)), cu, scale=SCALE)
        pos = bilinear_pos_embed(table, grid, merge_size=MERGE, num_grid_per_side=SIDE,
                                 num_rows=rows.shape[0])
        pos16 = bilinear_pos_embed(ops.cast(table, BF16), grid, merge_size=MERGE,
                                   num_grid_per_side=SIDE)  # rows from the shape function
        g.output(att, ops.cast(att16, F32), pos, pos16)
    return g


@pytest.fixture(scope="module")
def vision_model():
    from max.driver import CPU
    from max.engine import InferenceSession

    ext = _precompile_vision()
    session = InferenceSession(devices=[CPU()])
    return session.load(_build_graph(DeviceRef.CPU(), ext))


def _run(model, q, k, v, cu, table, grid):
    from max.driver import Buffer

    rows = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()) if len(grid) else 0
    args = (q, k, v, cu, table, grid, np.zeros(rows, np.float32))
    return [o.to_numpy() for o in model.execute(*[Buffer.from_numpy(np.ascontiguousarray(a)) for a in args])]


def _dummy_attn(n: int = 1):
    z = np.ones((n, 1, 8), np.float32)
    return z, z, z, np.array([0, n], np.int32)


def _dummy_pos():
    return np.ones((SIDE * SIDE, 8), np.float32), np.array([[1, 2, 2]], np.int64)


# ----------------------------------------------------------------------------- attention
def sdpa_ref(q, k, v, cu, scale):
    out = []
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        if b == a:
            continue
        qs, ks, vs = (torch.from_numpy(x[a:b]).transpose(0, 1)[None] for x in (q, k, v))
        out.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1))
    return torch.cat(out).numpy() if out else np.zeros_like(q)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).bfloat16().float().numpy()


@SETTINGS
@given(
    lens=st.lists(st.integers(1, 150), min_size=1, max_size=6),
    heads=st.integers(1, 4),
    head_dim=st.sampled_from([8, 72, 80]),
    amp=st.sampled_from([0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
@example(lens=[1], heads=1, head_dim=8, amp=1.0, seed=0)                  # a single 1-row segment
@example(lens=[1, 1, 5, 1], heads=2, head_dim=72, amp=1.0, seed=1)        # length-1 segments
@example(lens=[777], heads=3, head_dim=72, amp=1.0, seed=2)               # one long segment
@example(lens=[3] * 40 + [64, 65, 1], heads=4, head_dim=80, amp=3.0, seed=3)  # many segments
def test_varlen_attention(vision_model, lens, heads, head_dim, amp, seed):
    rng = np.random.default_rng(seed)
    n = sum(lens)
    q, k, v = (rng.standard_normal((n, heads, head_dim), dtype=np.float32) * amp for _ in range(3))
    v = v / amp
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    att, att16, _, _ = _run(vision_model, q, k, v, cu, *_dummy_pos())

    ref = sdpa_ref(q, k, v, cu, SCALE)
    np.testing.assert_allclose(att, ref, rtol=1e-5, atol=5e-5)
    # float32 accuracy: within 2x of torch's own float32 error against float64
    ref64 = sdpa_ref(*(x.astype(np.float64) for x in (q, k, v)), cu, SCALE)
    err, err_torch = np.abs(att - ref64).max(), np.abs(ref - ref64).max()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    # bf16: same math on bf16-rounded inputs, one bf16 rounding of the output
    ref16 = sdpa_ref(*(_bf16_round(x) for x in (q, k, v)), cu, SCALE)
    np.testing.assert_allclose(att16, ref16, rtol=8e-3, atol=2e-3)


def test_varlen_attention_segments_isolated(vision_model):
    """Changing one segment's keys/values must not change another segment's output."""
    rng = np.random.default_rng(7)
    lens = [50, 70, 9]
    n = sum(lens)
    q, k, v = (rng.standard_normal((n, 2, 72), dtype=np.float32) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    a1 = _run(vision_model, q, k, v, cu, *_dummy_pos())[0]
    k2, v2 = k.copy(), v.copy()
    k2[50:120] += 5.0
    v2[50:120] -= 3.0
    a2 = _run(vision_model, q, k2, v2, cu, *_dummy_pos())[0]
    np.testing.assert_array_equal(a1[:50], a2[:50])
    np.testing.assert_array_equal(a1[120:], a2[120:])
    assert not np.allclose(a1[50:120], a2[50:120])


def test_varlen_attention_bad_cu_seqlens_raises(vision_model):
    q, k, v, _ = _dummy_attn(4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _run(vision_model, q, k, v, np.array([0, 3], np.int32), *_dummy_pos())
    with pytest.raises(ValueError, match="cu_seqlens"):
        _run(vision_model, q, k, v, np.array([0, 3, 2, 4], np.int32), *_dummy_pos())


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
    _, _, pos, pos16 = _run(vision_model, *_dummy_attn(), table, grid)
    ref = pos_ref(table, grid, bf16=False)
    assert pos.shape == ref.shape and pos16.shape == ref.shape
    np.testing.assert_allclose(pos, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pos16, pos_ref(table, grid, bf16=True), rtol=1e-5, atol=1e-6)


def test_bilinear_pos_embed_bad_grid_raises(vision_model):
    table = np.ones((SIDE * SIDE, 8), np.float32)
    with pytest.raises(ValueError, match="multiples of merge_size"):
        _run(vision_model, *_dummy_attn(), table, np.array([[1, 3, 4]], np.int64))


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
    print(f"OK: vision ops compiled for {api}/{arch} in {time.time() - t0:.1f}s")


@pytest.mark.slow
def test_gpu_paths_compile_sm90():
    """Both ops (f32 + bf16) build for a virtual cuda/sm_90 device via session.compile."""
    ext = _precompile_vision()
    r = subprocess.run([sys.executable, __file__, "--gpu-compile", str(ext)], capture_output=True,
                       text=True, env=dict(os.environ), timeout=1200)
    tail = (r.stdout + r.stderr)[-4000:]
    assert r.returncode == 0 and "OK: vision ops compiled" in r.stdout, tail


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--gpu-compile":
    _gpu_compile_main()
