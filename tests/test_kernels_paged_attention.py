"""Causal attention over MAX's paged KV cache (mojo_kernels/text/paged_attention.mojo).

One graph with symbolic dims (rows, heads, head_dim, pages, layers, page size,
batch) serves every example (a sequence's keys split across tasks and merged
when the tasks are few, as at batch-1 decode, or not): float32 queries over a float32 and a bfloat16
cache, and bfloat16 queries over a bfloat16 cache. The cache is filled with
NaN wherever no sequence's token lives (other pages, slots past a sequence's
length, other layers' slots are real values), so reading anything the op
should not read shows. Reference: float64 softmax attention in numpy over the
keys each row may see.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from max.driver import Buffer
from max.dtype import DType
from max.graph import BufferType, DeviceRef, Graph, TensorType, ops

from kernel_harness import hypothesis_settings, load_on_cpu
from qwen3vl_moe.kernels.paged_attention import paged_attention

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

F32, BF16, U32 = DType.float32, DType.bfloat16, DType.uint32
SCALE = 0.125


def _build_graph(dev: DeviceRef, ext) -> Graph:
    block = ["P", 2, "L", "S", "HKV", "D"]
    types = [
        TensorType(F32, ["T", "H", "D"], dev),
        BufferType(F32, block, dev),
        BufferType(BF16, block, dev),
        TensorType(U32, ["B", "MP"], dev),
        TensorType(U32, ["B"], dev),
        TensorType(U32, ["B1"], dev),
        TensorType(U32, [], dev),
    ]
    with Graph("test_paged_attention", input_types=types, custom_extensions=[ext]) as g:
        q, kv32, kv16, table, lengths, offsets, layer = g.inputs
        q, table, lengths, offsets, layer = (v.tensor for v in (q, table, lengths, offsets, layer))
        kv32, kv16 = kv32.buffer, kv16.buffer
        outs = [
            paged_attention(q, kv32, table, lengths, offsets, layer, scale=SCALE),
            paged_attention(q, kv16, table, lengths, offsets, layer, scale=SCALE),
            ops.cast(paged_attention(ops.cast(q, BF16), kv16, table, lengths, offsets, layer, scale=SCALE), F32),
        ]
        g.output(*outs)
    return g


@pytest.fixture(scope="module")
def model():
    return load_on_cpu(_build_graph, "text")


def make_case(rng, cached, rows, kv_heads, group, d, layers, page_size):
    """A batch: sequence b has cached[b] tokens before the step and rows[b] new ones (in the
    cache too); its pages are scattered over a pool with spare pages."""
    B = len(cached)
    totals = [c + r for c, r in zip(cached, rows)]
    need = [-(-t // page_size) for t in totals]
    max_pages = max(1, max(need))
    n_pages = sum(need) + 3
    order = rng.permutation(n_pages)
    kv = np.full((n_pages, 2, layers, page_size, kv_heads, d), np.nan, np.float32)
    table = np.zeros((B, max_pages), np.uint32)
    keys, values, used = [], [], 0
    for b in range(B):
        ids = order[used: used + need[b]]
        used += need[b]
        table[b, : need[b]] = ids
        k = rng.standard_normal((layers, totals[b], kv_heads, d)).astype(np.float32)
        v = rng.standard_normal((layers, totals[b], kv_heads, d)).astype(np.float32)
        for t in range(totals[b]):
            kv[ids[t // page_size], 0, :, t % page_size] = k[:, t]
            kv[ids[t // page_size], 1, :, t % page_size] = v[:, t]
        keys.append(k)
        values.append(v)
    q = (2 * rng.standard_normal((sum(rows), kv_heads * group, d))).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.uint32)
    return q, kv, table, np.asarray(cached, np.uint32), offsets, keys, values


def reference(q, keys, values, cached, offsets, layer, group, kv_dtype=np.float64):
    out = np.zeros(q.shape, np.float64)
    for b in range(len(cached)):
        k = keys[b][layer].astype(kv_dtype).astype(np.float64)
        v = values[b][layer].astype(kv_dtype).astype(np.float64)
        for r, row in enumerate(range(offsets[b], offsets[b + 1])):
            n = int(cached[b]) + r + 1
            for h in range(q.shape[1]):
                s = SCALE * (k[:n, h // group] @ q[row, h].astype(np.float64))
                p = np.exp(s - s.max())
                out[row, h] = (p / p.sum()) @ v[:n, h // group]
    return out


def _bf16(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16)


def run(model, q, kv, table, cached, offsets, layer):
    kv16 = _bf16(kv)
    args = [Buffer.from_numpy(np.ascontiguousarray(a)) for a in (q, kv)] + [Buffer.from_dlpack(kv16)]
    args += [Buffer.from_numpy(np.ascontiguousarray(a)) for a in (table, cached, offsets)]
    args.append(Buffer.from_numpy(np.asarray(layer, np.uint32)))
    return [o.to_numpy() for o in model.execute(*args)]


def check(model, rng, cached, rows, kv_heads, group, d, layers, page_size, layer):
    q, kv, table, lengths, offsets, keys, values = make_case(rng, cached, rows, kv_heads, group, d, layers, page_size)
    f32_cache, bf16_cache, bf16_all = run(model, q, kv, table, lengths, offsets, layer)
    bf16_keys = [torch.from_numpy(k).to(torch.bfloat16).float().numpy() for k in keys]
    bf16_values = [torch.from_numpy(v).to(torch.bfloat16).float().numpy() for v in values]
    ref = reference(q, keys, values, lengths, offsets, layer, group)
    ref16 = reference(q, bf16_keys, bf16_values, lengths, offsets, layer, group)
    q16 = torch.from_numpy(q).to(torch.bfloat16).float().numpy()
    ref16q = reference(q16, bf16_keys, bf16_values, lengths, offsets, layer, group)
    for got, want, tol in ((f32_cache, ref, 2e-5), (bf16_cache, ref16, 2e-5), (bf16_all, ref16q, 1e-2)):
        assert got.shape == want.shape
        assert np.isfinite(got).all()
        # Outputs are convex combinations of N(0, 1) values: O(1).
        assert float(np.abs(got - want).max(initial=0.0)) <= tol


@hypothesis_settings()
@given(
    seqs=st.lists(st.tuples(st.integers(0, 700), st.integers(1, 5)), min_size=1, max_size=4),
    kv_heads=st.integers(1, 4),
    group=st.sampled_from([1, 2, 4, 8, 16, 32]),
    d=st.sampled_from([8, 72, 128]),
    layers=st.integers(1, 3),
    page_size=st.sampled_from([1, 16, 128]),
    data=st.data(),
)
@example(seqs=[(511, 1)], kv_heads=4, group=4, d=128, layers=8, page_size=128, data=None)  # medium, decode b1
@example(seqs=[(0, 1)], kv_heads=1, group=1, d=8, layers=1, page_size=16, data=None)       # one key in all
@example(seqs=[(1500, 1)], kv_heads=4, group=8, d=128, layers=2, page_size=128, data=None)  # keys split 4 ways
@example(seqs=[(600, 3)], kv_heads=2, group=2, d=72, layers=1, page_size=16, data=None)     # rows and splits
@example(seqs=[(300, 2), (40, 1)], kv_heads=4, group=2, d=72, layers=2, page_size=16, data=None)  # all-heads + per-head tasks
def test_paged_attention_matches_reference(model, seqs, kv_heads, group, d, layers, page_size, data):
    layer = layers - 1 if data is None else data.draw(st.integers(0, layers - 1))
    cached, rows = zip(*seqs)
    check(model, np.random.default_rng(sum(cached) + 7 * len(rows)), list(cached), list(rows),
          kv_heads, group, d, layers, page_size, layer)


def test_paged_attention_prefill_after_prefix(model):
    """Many rows of one sequence (a prefill after a cached prefix) beside a decode row:
    row blocks split across tasks, each row causal within the step."""
    check(model, np.random.default_rng(3), [200, 37], [40, 1], 2, 4, 64, 2, 16, 1)


def test_paged_attention_rejects_a_short_lookup_table(model):
    q, kv, table, lengths, offsets, _, _ = make_case(np.random.default_rng(0), [20], [1], 1, 1, 8, 1, 16)
    with pytest.raises(ValueError, match="lookup table"):
        run(model, q, kv, table[:, :1], lengths, offsets, 0)
