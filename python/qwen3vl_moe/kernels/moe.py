"""Graph-side wrappers of the MoE custom ops in ``mojo_kernels/text``.

``moe_experts`` is the whole routed-experts computation of transformers'
``Qwen3VLMoeTextSparseMoeBlock`` (after the router linear):

    p = softmax(router_logits, float32); topv, topi = topk(p, top_k)
    w = (topv / topv.sum(-1)).to(x.dtype)
    y[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),  e = topi[t, k]

as three ops: ``qwen3vl_moe_route`` (routing + counting sort of the (token, k) slots by
expert), ``qwen3vl_moe_gate_up`` (grouped GEMM, rows gathered through the permutation,
SwiGLU fused) and ``qwen3vl_moe_down`` (grouped GEMM, routing weight and un-permute fused,
then the float32 sum over k in top-k order, like transformers' grouped_mm path).

A graph that calls these must list ``kernel_package("text")`` (or a ``.mojoc``
precompiled from it) in ``custom_extensions``.
"""

from __future__ import annotations

from typing import NamedTuple

from max.dtype import DType
from max.graph import TensorType, TensorValue, ops

from .linear import check_weight_dtype

ROUTE_OP = "qwen3vl_moe_route"
GATE_UP_OP = "qwen3vl_moe_gate_up"
DOWN_OP = "qwen3vl_moe_down"


class MoeRouting(NamedTuple):
    """Outputs of ``qwen3vl_moe_route``.

    weights [T, top_k] (activation dtype), ids [T, top_k] int32 (descending
    probability), perm [T, top_k] int32 (read flat: the slots t*top_k + k sorted by
    expert, stable), offsets [E + 1] int32 (expert e owns sorted rows
    offsets[e] ..< offsets[e+1]).
    """

    weights: TensorValue
    ids: TensorValue
    perm: TensorValue
    offsets: TensorValue


def moe_route(router_logits: TensorValue, *, top_k: int, dtype: DType | None = None) -> MoeRouting:
    """Softmax (float32) + top-k + renormalisation + sort of the slots by expert.

    ``router_logits`` [T, E]; the routing weights come out in ``dtype``
    (default: the logits' dtype).
    """
    dtype = dtype or router_logits.dtype
    if router_logits.dtype != dtype:
        router_logits = ops.cast(router_logits, dtype)
    dev = router_logits.device
    T, E = router_logits.shape
    outs = ops.custom(
        ROUTE_OP,
        device=dev,
        values=[router_logits],
        out_types=[
            TensorType(dtype, [T, top_k], dev),
            TensorType(DType.int32, [T, top_k], dev),
            TensorType(DType.int32, [T, top_k], dev),
            TensorType(DType.int32, [E + 1], dev),
        ],
        parameters={"top_k": int(top_k)},
    )
    return MoeRouting(*(o.tensor for o in outs))


def _expert_dims(gate_up: TensorValue, down: TensorValue, hub: bool):
    """(H, I) as graph dims from the weights' shapes in the given layout."""
    if gate_up.rank != 3 or down.rank != 3:
        raise ValueError("gate_up and down must be rank-3 [E, ., .] expert weights")
    if hub:  # gate_up [E, H, 2I], down [E, I, H]
        return down.shape[2], down.shape[1]
    return down.shape[1], down.shape[2]  # gate_up [E, 2I, H], down [E, H, I]


def moe_experts(
    x: TensorValue,
    router_logits: TensorValue,
    gate_up: TensorValue,
    down: TensorValue,
    *,
    top_k: int,
    weights_hub_layout: bool,
) -> TensorValue:
    """Routed experts of a Qwen3-VL-MoE sparse block: [T, H] -> [T, H] in x's dtype.

    x [T, H] float32 or bfloat16; router_logits [T, E] (raw logits, cast to x's
    dtype if needed); gate_up/down in x's dtype (or bfloat16 under float32 x on CPU), in the checkpoint's layout:
    ``weights_hub_layout=True``: gate_up [E, H, 2I], down [E, I, H] (original
    release); ``False``: gate_up [E, 2I, H], down [E, H, I] (transformers in memory).
    No weight is copied or transposed. Float32 accumulation everywhere.
    """
    if x.rank != 2 or router_logits.rank != 2:
        raise ValueError("x must be [T, H] and router_logits [T, E]")
    if gate_up.dtype != down.dtype:
        raise ValueError(f"gate_up ({gate_up.dtype}) and down ({down.dtype}) weights must share a dtype")
    check_weight_dtype("moe_experts", gate_up.dtype, x.dtype)
    if gate_up.dtype != x.dtype and not x.device.is_cpu():
        raise ValueError("moe_experts: on GPU the expert weights must have x's dtype")
    hub = bool(weights_hub_layout)
    dev = x.device
    T, _ = x.shape
    _, I = _expert_dims(gate_up, down, hub)
    r = moe_route(router_logits, top_k=top_k, dtype=x.dtype)
    h = ops.custom(
        GATE_UP_OP,
        device=dev,
        values=[x, gate_up, r.perm, r.offsets],
        out_types=[TensorType(x.dtype, [T, top_k, I], dev)],
        parameters={"hub_layout": hub},
    )[0].tensor
    y, _ws = ops.custom(
        DOWN_OP,
        device=dev,
        values=[h, down, r.perm, r.offsets, r.weights],
        out_types=[
            TensorType(x.dtype, [T, x.shape[1]], dev),
            TensorType(x.dtype, [T, top_k, x.shape[1]], dev),
        ],
        parameters={"hub_layout": hub},
    )
    return y.tensor
