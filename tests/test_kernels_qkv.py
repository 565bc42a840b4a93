"""The attention-inputs op (mojo_kernels/text/qkv.mojo): qwen3vl_attention_qkv.

q = rope(RMSNorm(x @ Wq^T)) and k = rope(RMSNorm(x @ Wk^T)) per head, v = x @ Wv^T,
float32 activations with float32 and bfloat16 weights. One graph with symbolic
dims (rows, hidden, q/kv widths, head_dim) serves every hypothesis example and
both of the op's paths (the per-head weight stream up to 16 rows, MAX's GEMM
above). Reference: transformers' float32 arithmetic in torch on a float64
projection. A second graph, with one model's static shapes, puts the op beside
the unfused ops it replaces (qwen3vl_linear, MAX's RMSNorm, apply_rotary).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, ops

from kernel_harness import hypothesis_settings, load_on_cpu, run_numpy
from qwen3vl_moe.kernels.linear import linear
from qwen3vl_moe.kernels.qkv import attention_qkv
from qwen3vl_moe.nn.rotary import apply_rotary

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

F32, BF16 = DType.float32, DType.bfloat16
EPS = 1e-6


def _inputs(dev: DeviceRef, m, k, nq, nkv, d) -> list[TensorType]:
    return [
        TensorType(F32, [m, k], dev),
        TensorType(F32, [nq, k], dev),
        TensorType(F32, [nkv, k], dev),
        TensorType(F32, [nkv, k], dev),
        TensorType(F32, [d], dev),
        TensorType(F32, [d], dev),
        TensorType(F32, [m, d], dev),
        TensorType(F32, [m, d], dev),
    ]


def _build_graph(dev: DeviceRef, ext: Path) -> Graph:
    with Graph("test_qkv", input_types=_inputs(dev, "M", "K", "NQ", "NKV", "D"), custom_extensions=[ext]) as g:
        x, wq, wk, wv, qn, kn, cos, sin = (v.tensor for v in g.inputs)
        f32 = attention_qkv(x, wq, wk, wv, qn, kn, cos, sin, eps=EPS)
        bf16 = attention_qkv(x, *(ops.cast(w, BF16) for w in (wq, wk, wv)), qn, kn, cos, sin, eps=EPS)
        g.output(*f32, *bf16)
    return g


# One model's attention (GQA 4:2, head_dim 128) for the side-by-side with the unfused ops.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 96, 4, 2, 128


def _build_unfused_graph(dev: DeviceRef, ext: Path) -> Graph:
    types = _inputs(dev, "M", HIDDEN, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, HEAD_DIM)
    with Graph("test_qkv_unfused", input_types=types, custom_extensions=[ext]) as g:
        x, wq, wk, wv, qn, kn, cos, sin = (v.tensor for v in g.inputs)
        outs = []
        for cast in (lambda w: w, lambda w: ops.cast(w, BF16)):
            q_w, k_w, v_w = (cast(w) for w in (wq, wk, wv))
            outs += attention_qkv(x, q_w, k_w, v_w, qn, kn, cos, sin, eps=EPS)
            # nn/attention.py's unfused path, op for op.
            q = ops.rms_norm(ops.reshape(linear(x, q_w), [-1, HEADS, HEAD_DIM]), qn, EPS, multiply_before_cast=False)
            k = ops.rms_norm(ops.reshape(linear(x, k_w), [-1, KV_HEADS, HEAD_DIM]), kn, EPS,
                             multiply_before_cast=False)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            outs += [ops.reshape(t, [-1, n * HEAD_DIM]) for t, n in ((q, HEADS), (k, KV_HEADS))] + [linear(x, v_w)]
        g.output(*outs)
    return g


@pytest.fixture(scope="module")
def qkv_model():
    return load_on_cpu(_build_graph, "text")


@pytest.fixture(scope="module")
def unfused_model():
    return load_on_cpu(_build_unfused_graph, "text")


def make_inputs(rng, m, k, heads, kv_heads, d):
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = [(rng.standard_normal((h * d, k)) / np.sqrt(k)).astype(np.float32) for h in (heads, kv_heads, kv_heads)]
    qn, kn = (rng.uniform(0.5, 1.5, d).astype(np.float32) for _ in range(2))
    angles = np.concatenate([rng.uniform(-50, 50, (m, d // 2))] * 2, axis=-1).astype(np.float32)
    return [x, *w, qn, kn, np.cos(angles), np.sin(angles)]


def reference(inputs, d, bf16_weights):
    """transformers' arithmetic: float32 norm (x * rsqrt(mean(x^2) + eps), then * weight) and rope."""
    x, wq, wk, wv, qn, kn, cos, sin = (torch.from_numpy(a) for a in inputs)
    if bf16_weights:
        wq, wk, wv = (w.to(torch.bfloat16).float() for w in (wq, wk, wv))
    proj = [(x.double() @ w.double().T).float() for w in (wq, wk, wv)]

    def norm_rope(t, gamma):
        t = t.reshape(t.shape[0], t.shape[1] // d, d)
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS) * gamma
        rotated = torch.cat([-t[..., d // 2:], t[..., : d // 2]], dim=-1)
        return (t * cos[:, None] + rotated * sin[:, None]).flatten(1)

    return [norm_rope(proj[0], qn).numpy(), norm_rope(proj[1], kn).numpy(), proj[2].numpy()]


def check(model, m, k, heads, kv_heads, d, seed):
    inputs = make_inputs(np.random.default_rng(seed), m, k, heads, kv_heads, d)
    outs = run_numpy(model, *inputs)
    for got, bf16 in ((outs[:3], False), (outs[3:], True)):
        for g, ref in zip(got, reference(inputs, d, bf16)):
            assert g.shape == ref.shape
            # Normalised heads are O(1): float32 rounding of the projection and the norm.
            assert float(np.abs(g - ref).max(initial=0.0)) <= 2e-5 * max(1.0, float(np.abs(ref).max(initial=0.0)))


@hypothesis_settings()
@given(
    m=st.integers(1, 40),
    k=st.integers(1, 300),
    kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8]),
    d=st.sampled_from([64, 128]),
    seed=st.integers(0, 2**31 - 1),
)
@example(m=1, k=256, kv_heads=2, group=4, d=128, seed=0)   # a decode step, GQA 8:2
@example(m=17, k=300, kv_heads=1, group=8, d=64, seed=1)   # first row count on MAX's GEMM
def test_qkv_matches_transformers_arithmetic(qkv_model, m, k, kv_heads, group, d, seed):
    check(qkv_model, m, k, kv_heads * group, kv_heads, d, seed)


@pytest.mark.parametrize("m", [0, 1, 2, 4, 8, 16, 17, 64])
def test_qkv_row_counts(qkv_model, m):
    """No rows, each register tile of the stream and both sides of the switch to MAX's GEMM."""
    check(qkv_model, m, 203, 4, 2, 128, m)


@pytest.mark.parametrize("m", [1, 8, 16, 17, 100])
def test_qkv_equals_unfused_ops(unfused_model, m):
    """What nn/attention.py computed before the fusion (same cast points): equal up to the
    float32 rounding of summation orders."""
    outs = run_numpy(unfused_model, *make_inputs(np.random.default_rng(m), m, HIDDEN, HEADS, KV_HEADS, HEAD_DIM))
    for fused, unfused in (outs[0:3], outs[3:6]), (outs[6:9], outs[9:12]):
        for a, b in zip(fused, unfused):
            assert a.shape == b.shape
            assert float(np.abs(a - b).max(initial=0.0)) <= 1e-5 * max(1.0, float(np.abs(b).max(initial=0.0)))


def test_qkv_rejects_odd_head_dim(qkv_model):
    """Norms of 5 (an odd head_dim, not dividing the 12 q rows) are refused, not misread."""
    inputs = make_inputs(np.random.default_rng(0), 2, 8, 2, 1, 6)
    inputs[4:6] = [n[:5] for n in inputs[4:6]]
    inputs[6:8] = [t[:, :5] for t in inputs[6:8]]
    with pytest.raises(ValueError, match="head_dim"):
        run_numpy(qkv_model, *inputs)
