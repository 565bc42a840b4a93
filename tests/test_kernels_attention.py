"""Attention Mojo op (mojo_kernels/attention): qwen3vl_varlen_attention, bidirectional and causal GQA.

One module-scoped CPU graph holds the op four ways (bidirectional and causal,
float32 and bfloat16 cast inside the graph) with symbolic dims (N, heads,
kv heads, head_dim, segments), so every hypothesis example reuses one compiled
model. Reference: torch SDPA per segment (``is_causal``, ``enable_gqa``), and
float64 for the float32 accuracy bound.

The GPU branches are compile-checked for sm_90 (see kernel_harness).
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

import torch.nn.functional as F  # noqa: E402
from max.dtype import DType  # noqa: E402
from max.graph import DeviceRef, Graph, TensorType, ops  # noqa: E402

from kernel_harness import (  # noqa: E402
    GPU_COMPILE_FLAG, assert_gpu_compile, gpu_compile_main, hypothesis_settings, load_on_cpu, precompile,
    run_numpy,
)
from qwen3vl_moe.kernels.attention import varlen_attention  # noqa: E402

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

F32, BF16, I32 = DType.float32, DType.bfloat16, DType.int32
SCALE = 72**-0.5          # one compile-time scale for every head_dim tested

SETTINGS = hypothesis_settings()


def _build_graph(dev: DeviceRef, ext: Path) -> Graph:
    ins = [
        TensorType(F32, ["N", "H", "D"], dev),
        TensorType(F32, ["N", "HKV", "D"], dev),
        TensorType(F32, ["N", "HKV", "D"], dev),
        TensorType(I32, ["S1"], dev),
    ]
    with Graph("test_attention_kernels", input_types=ins, custom_extensions=[ext]) as g:
        q, k, v, cu = (x.tensor for x in g.inputs)
        bf = [ops.cast(x, BF16) for x in (q, k, v)]
        outs = []
        for causal in (False, True):
            outs.append(varlen_attention(q, k, v, cu, scale=SCALE, causal=causal))
            outs.append(ops.cast(varlen_attention(*bf, cu, scale=SCALE, causal=causal), F32))
        g.output(*outs)
    return g


@pytest.fixture(scope="module")
def attention_model():
    return load_on_cpu(_build_graph, "attention")


def _run(model, q, k, v, cu):
    """(bidirectional f32, bidirectional bf16, causal f32, causal bf16) outputs."""
    return run_numpy(model, q, k, v, cu)


def sdpa_ref(q, k, v, cu, scale, causal):
    out = []
    for s in range(len(cu) - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        if b == a:
            continue
        qs, ks, vs = (torch.from_numpy(x[a:b]).transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, scale=scale, is_causal=causal,
                                           enable_gqa=qs.shape[1] != ks.shape[1])
        out.append(o[0].transpose(0, 1))
    return torch.cat(out).numpy() if out else np.zeros_like(q)


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x).bfloat16().float().numpy()


def _inputs(lens, heads, kv_heads, head_dim, amp, seed):
    rng = np.random.default_rng(seed)
    n = sum(lens)
    q = rng.standard_normal((n, heads, head_dim), dtype=np.float32) * amp
    k = rng.standard_normal((n, kv_heads, head_dim), dtype=np.float32) * amp
    v = rng.standard_normal((n, kv_heads, head_dim), dtype=np.float32)
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return q, k, v, cu


@SETTINGS
@given(
    lens=st.lists(st.integers(1, 150), min_size=1, max_size=6),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([8, 72, 80, 128]),
    amp=st.sampled_from([0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
@example(lens=[1], kv_heads=1, group=1, head_dim=8, amp=1.0, seed=0)                  # a single 1-row segment
@example(lens=[1, 1, 5, 1], kv_heads=2, group=1, head_dim=72, amp=1.0, seed=1)        # length-1 segments
@example(lens=[777], kv_heads=3, group=1, head_dim=72, amp=1.0, seed=2)               # one long segment
@example(lens=[3] * 40 + [64, 65, 1], kv_heads=1, group=4, head_dim=80, amp=3.0, seed=3)  # many segments
@example(lens=[515], kv_heads=2, group=4, head_dim=128, amp=1.0, seed=4)              # a text prefill, GQA 4
@example(lens=[64, 65, 96, 97, 160], kv_heads=1, group=2, head_dim=128, amp=3.0, seed=5)  # block edges
@example(lens=[47, 48, 49, 144, 145], kv_heads=2, group=2, head_dim=72, amp=1.0, seed=6)  # causal block edges
def test_varlen_attention(attention_model, lens, kv_heads, group, head_dim, amp, seed):
    q, k, v, cu = _inputs(lens, kv_heads * group, kv_heads, head_dim, amp, seed)
    att, att16, causal, causal16 = _run(attention_model, q, k, v, cu)
    for got, got16, is_causal in ((att, att16, False), (causal, causal16, True)):
        ref = sdpa_ref(q, k, v, cu, SCALE, is_causal)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=5e-5)
        # float32 accuracy: within 2x of torch's own float32 error against float64
        ref64 = sdpa_ref(*(x.astype(np.float64) for x in (q, k, v)), cu, SCALE, is_causal)
        err, err_torch = np.abs(got - ref64).max(), np.abs(ref - ref64).max()
        assert err <= 2 * err_torch + 1e-6, (is_causal, err, err_torch)
        # bf16: same math on bf16-rounded inputs, one bf16 rounding of the output
        ref16 = sdpa_ref(*(_bf16_round(x) for x in (q, k, v)), cu, SCALE, is_causal)
        np.testing.assert_allclose(got16, ref16, rtol=8e-3, atol=2e-3)


def test_varlen_attention_segments_isolated(attention_model):
    """Changing one segment's keys/values must not change another segment's output."""
    q, k, v, cu = _inputs([50, 70, 9], 2, 2, 72, 1.0, 7)
    a1 = _run(attention_model, q, k, v, cu)
    k2, v2 = k.copy(), v.copy()
    k2[50:120] += 5.0
    v2[50:120] -= 3.0
    a2 = _run(attention_model, q, k2, v2, cu)
    for x1, x2 in ((a1[0], a2[0]), (a1[2], a2[2])):
        np.testing.assert_array_equal(x1[:50], x2[:50])
        np.testing.assert_array_equal(x1[120:], x2[120:])
        assert not np.allclose(x1[50:120], x2[50:120])


def test_causal_ignores_future_keys(attention_model):
    """Causal rows up to i are bit-identical whatever the keys/values after i."""
    q, k, v, cu = _inputs([300], 4, 1, 128, 1.0, 8)
    c1 = _run(attention_model, q, k, v, cu)[2]
    k2, v2 = k.copy(), v.copy()
    k2[137:] = 100.0
    v2[137:] = -7.0
    c2 = _run(attention_model, q, k2, v2, cu)[2]
    np.testing.assert_array_equal(c1[:137], c2[:137])
    assert not np.allclose(c1[137:], c2[137:])


def test_varlen_attention_bad_inputs_raise(attention_model):
    q, k, v, _ = _inputs([4], 1, 1, 8, 1.0, 0)
    with pytest.raises(ValueError, match="cu_seqlens"):
        _run(attention_model, q, k, v, np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="cu_seqlens"):
        _run(attention_model, q, k, v, np.array([0, 3, 2, 4], np.int32))
    q3, k2, v2, cu = _inputs([4], 3, 2, 8, 1.0, 0)
    with pytest.raises(ValueError, match="kv_heads dividing heads"):
        _run(attention_model, q3, k2, v2, cu)


# ----------------------------------------------------------------------------- GPU compile (sm_90)
def test_gpu_paths_compile_sm90():
    """All four variants (bidirectional/causal, f32/bf16) build for a virtual cuda/sm_90 device."""
    assert_gpu_compile(__file__, precompile("attention"))


if __name__ == "__main__" and sys.argv[1:2] == [GPU_COMPILE_FLAG]:
    gpu_compile_main(_build_graph)
