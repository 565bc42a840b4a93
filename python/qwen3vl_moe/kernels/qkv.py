"""Graph-side wrapper of the ``qwen3vl_attention_qkv`` custom op (``mojo_kernels/text/qkv.mojo``).

A text attention layer's q, k and v in one CPU kernel: the three projections
(weights in the checkpoint's layout, float32 or bfloat16), the per-head q/k
RMSNorm and the interleaved-MRoPE rotation. Unfused these are 7 kernels, each
a fork/join of MAX's CPU workers, which at batch-1 decode cost about as much
as the weight streams themselves.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import TensorType, TensorValue, ops

from .linear import check_weight_dtype

QKV_OP = "qwen3vl_attention_qkv"


def attention_qkv(
    x: TensorValue,
    q_weight: TensorValue,
    k_weight: TensorValue,
    v_weight: TensorValue,
    q_norm: TensorValue,
    k_norm: TensorValue,
    cos: TensorValue,
    sin: TensorValue,
    *,
    eps: float,
) -> tuple[TensorValue, TensorValue, TensorValue]:
    """x [M, K] float32 -> q [M, Hq*D], k and v [M, Hkv*D] (heads of D contiguous): what
    ``apply_rotary(RMSNorm(x @ Wq^T))`` (q and k, per head) and ``x @ Wv^T`` compute.

    Weights [H*D, K] float32 or bfloat16 (all three alike); norms [D] float32
    (RMSNorm with multiply_before_cast=False; D is their size); cos/sin [M, D] float32.
    """
    if x.dtype != DType.float32:
        raise ValueError(f"attention_qkv: x must be float32, not {x.dtype}")
    for w in (q_weight, k_weight, v_weight):
        check_weight_dtype("attention_qkv", w.dtype, x.dtype)
    if not q_weight.dtype == k_weight.dtype == v_weight.dtype:
        raise ValueError("attention_qkv: q, k and v weights must share a dtype")
    rows = x.shape[0]
    q, k, v = ops.custom(
        QKV_OP,
        device=x.device,
        values=[x, q_weight, k_weight, v_weight, q_norm, k_norm, cos, sin],
        out_types=[
            TensorType(DType.float32, [rows, q_weight.shape[0]], x.device),
            TensorType(DType.float32, [rows, k_weight.shape[0]], x.device),
            TensorType(DType.float32, [rows, v_weight.shape[0]], x.device),
        ],
        parameters={"eps": float(eps)},
    )
    return q.tensor, k.tensor, v.tensor
