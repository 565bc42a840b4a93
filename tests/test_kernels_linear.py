"""Tests of the ``qwen3vl_linear`` custom op (mojo_kernels/text/linear.mojo) through qwen3vl_moe.kernels.linear.

y = x @ W^T with W [N, K] in the checkpoint's layout, float32, bfloat16, and
bfloat16 weights under float32 activations (a bfloat16 checkpoint on CPU), for
every row count the op distinguishes: 0, the register tiles of the streaming
path (1, 2, 3-4, 5-8 and > 8 rows, up to 16) and MAX's matmul above 16 rows
(for bfloat16 weights: converted in blocks of 1024 weight rows). One graph with
symbolic dims serves every case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from max.dtype import DType
from max.graph import DeviceRef, Graph, TensorType, ops

from kernel_harness import precompile
from qwen3vl_moe.kernels.linear import linear

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

F32, BF16 = DType.float32, DType.bfloat16


@pytest.fixture(scope="module")
def linear_model():
    from max.driver import CPU
    from max.engine import InferenceSession

    pkg = precompile("text")
    dev = DeviceRef.CPU()
    ins = [TensorType(F32, ["M", "K"], dev), TensorType(F32, ["N", "K"], dev)]
    with Graph("test_linear", input_types=ins, custom_extensions=[pkg]) as g:
        x, w = (v.tensor for v in g.inputs)
        y16 = linear(ops.cast(x, BF16), ops.cast(w, BF16))
        g.output(linear(x, w), ops.cast(y16, F32), linear(x, ops.cast(w, BF16)))
    return InferenceSession(devices=[CPU()]).load(g)


def run(model, x, w):
    from max.driver import Buffer

    return [y.to_numpy() for y in model.execute(Buffer.from_numpy(x), Buffer.from_numpy(w))]


def check(model, M, N, K, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(max(K, 1))).astype(np.float32)
    y32, y16, ymixed = run(model, x, w)
    assert y32.shape == y16.shape == ymixed.shape == (M, N)
    ref = (x.astype(np.float64) @ w.astype(np.float64).T)
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    assert float(np.abs(y32 - ref).max(initial=0.0)) <= 1e-5 * scale
    # bfloat16 weights, float32 x: exactly the float32 product with the bf16-rounded weights.
    wb = torch.from_numpy(w).to(torch.bfloat16).double().numpy()
    ref_mixed = x.astype(np.float64) @ wb.T
    mixed_scale = max(float(np.abs(ref_mixed).max(initial=0.0)), 1e-30)
    assert float(np.abs(ymixed - ref_mixed).max(initial=0.0)) <= 1e-5 * mixed_scale
    # bfloat16: inputs rounded to bf16, float32 accumulation, one rounding of the result.
    xb = torch.from_numpy(x).to(torch.bfloat16).double()
    wb = torch.from_numpy(w).to(torch.bfloat16).double()
    ref16 = (xb @ wb.T).numpy()
    tol = 2.0**-8 * np.abs(ref16) + 1e-5 * max(float(np.abs(ref16).max(initial=0.0)), 1e-30)
    assert np.all(np.abs(y16 - ref16) <= tol), float(np.abs(y16 - ref16).max())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    M=st.integers(0, 40),
    N=st.integers(1, 130),
    K=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_matches_numpy(linear_model, M, N, K, seed):
    check(linear_model, M, N, K, seed)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 17, 64])
def test_linear_row_counts(linear_model, M):
    """Each register tile of the streaming path and both sides of the switch to MAX's matmul,
    with N not a multiple of any tile width and K not a multiple of the SIMD width."""
    check(linear_model, M, 101, 203, M)


@pytest.mark.parametrize("M, N", [(17, 1024), (20, 2100)])
def test_linear_bf16_weights_converted_in_blocks(linear_model, M, N):
    """Above 16 rows a bfloat16 weight is converted 1024 rows at a time for MAX's matmul:
    exactly one block, and three with a partial last one."""
    check(linear_model, M, N, 33, N)


def test_linear_rejects_mismatched_weight(linear_model):
    from max.driver import Buffer

    x = np.zeros((2, 8), np.float32)
    w = np.zeros((4, 8), np.float32)
    # The graph's symbolic K ties x and w; a shape error is caught before the op runs.
    with pytest.raises(ValueError):
        linear_model.execute(Buffer.from_numpy(x), Buffer.from_numpy(w[:, :7].copy()))
