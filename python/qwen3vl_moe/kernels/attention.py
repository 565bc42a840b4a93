"""Graph wrapper for the attention Mojo op in ``mojo_kernels/attention``.

A graph that calls it must list ``kernel_package("attention")`` in
``custom_extensions``. The op runs on CPU and GPU; the device is the device of
``q``. The vision encoder uses it bidirectionally (one segment per image or
frame); the text decoder uses it causally for prefills that start from an
empty KV cache, where it needs no cache reads.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import TensorType, TensorValue, ops

__all__ = ["varlen_attention"]

ATTENTION_OP = "qwen3vl_varlen_attention"


def varlen_attention(
    q: TensorValue,
    k: TensorValue,
    v: TensorValue,
    cu_seqlens: TensorValue,
    *,
    scale: float,
    causal: bool = False,
) -> TensorValue:
    """Attention inside the segments given by ``cu_seqlens``, optionally causal.

    ``out[i, h] = softmax_j(scale * q[i, h] . k[j, g]) @ v[j, g]`` with
    ``g = h // (heads // kv_heads)`` over the keys ``j`` of the segment that
    holds row ``i`` (all of them, or those ``j <= i`` when ``causal``; nothing
    across segments), flash-style with float32 accumulation.

    Args:
        q: ``[N, heads, head_dim]``, float32 or bfloat16, ``head_dim <= 128``.
        k, v: ``[N, kv_heads, head_dim]`` in q's dtype; ``kv_heads`` divides
            ``heads`` (grouped-query attention).
        cu_seqlens: ``[S + 1]`` segment boundaries, ``0 = c[0] <= ... <= c[S] = N``
            (transformers' ``get_vision_cu_seqlens``, or a ragged batch's row
            offsets). int32; any other integer dtype is cast in the graph.
        scale: softmax scale (``head_dim ** -0.5`` for Qwen3-VL).
        causal: mask the keys after each query (within its segment).

    ``scale`` and ``causal`` are compile-time parameters: each distinct pair is a
    separate kernel instantiation.

    Returns:
        ``[N, heads, head_dim]`` in the dtype of ``q``.
    """
    if q.dtype not in (DType.float32, DType.bfloat16):
        raise TypeError(f"varlen_attention: q must be float32 or bfloat16, got {q.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("varlen_attention: q, k and v must have the same dtype")
    if q.rank != 3 or k.rank != 3 or v.rank != 3 or cu_seqlens.rank != 1:
        raise ValueError("varlen_attention: q, k, v must be [N, heads, head_dim], cu_seqlens [S+1]")
    if cu_seqlens.dtype != DType.int32:
        cu_seqlens = ops.cast(cu_seqlens, DType.int32)
    return ops.custom(
        ATTENTION_OP,
        device=q.device,
        values=[q, k, v, cu_seqlens],
        out_types=[TensorType(q.dtype, q.shape, q.device)],
        parameters={"scale": float(scale), "causal": bool(causal)},
    )[0].tensor
