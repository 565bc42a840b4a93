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

On CPU the expert weights may instead be packed at load into the column panels the
CPU micro-kernels read (``pack_expert_panels``; ops ``qwen3vl_moe_gate_up_panels`` and
``qwen3vl_moe_down_panels``, same results): each task then streams one contiguous
panel instead of copying a strided one to scratch.

A graph that calls these must list ``kernel_package("text")`` (or a ``.mojoc``
precompiled from it) in ``custom_extensions``.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from max.dtype import DType
from max.graph import TensorType, TensorValue, ops

from .linear import check_weight_dtype

ROUTE_OP = "qwen3vl_moe_route"
GATE_UP_OP = "qwen3vl_moe_gate_up"
DOWN_OP = "qwen3vl_moe_down"
GATE_UP_PANELS_OP = "qwen3vl_moe_gate_up_panels"
DOWN_PANELS_OP = "qwen3vl_moe_down_panels"
GATE_UP_PANEL, DOWN_PANEL = 32, 64  # columns per panel (of each of gate and up); cpu_moe.mojo's GU_PW, DN_PW


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
    # The GPU path's per-chunk expert counts, max(ceil(T*top_k/256), 1) * E int32, which
    # is at most 4*T*top_k + E for E <= 1024 (the kernel checks): graph memory, not an
    # allocation per call. The CPU path needs none.
    scratch = [0] if dev.is_cpu() else [T * (4 * int(top_k)) + E]
    *outs, _scratch = ops.custom(
        ROUTE_OP,
        device=dev,
        values=[router_logits],
        out_types=[
            TensorType(dtype, [T, top_k], dev),
            TensorType(DType.int32, [T, top_k], dev),
            TensorType(DType.int32, [T, top_k], dev),
            TensorType(DType.int32, [E + 1], dev),
            TensorType(DType.int32, scratch, dev),
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
    _, I = _expert_dims(gate_up, down, hub)
    return _experts(x, router_logits, gate_up, down, top_k, I, GATE_UP_OP, DOWN_OP, {"hub_layout": hub})


def _experts(x, router_logits, gate_up, down, top_k, I, gate_up_op, down_op, parameters) -> TensorValue:
    """Route, gate_up, down: the three ops of ``moe_experts``."""
    dev = x.device
    T, H = x.shape
    r = moe_route(router_logits, top_k=top_k, dtype=x.dtype)
    h = ops.custom(
        gate_up_op,
        device=dev,
        values=[x, gate_up, r.perm, r.offsets],
        out_types=[TensorType(x.dtype, [T, top_k, I], dev)],
        parameters=parameters,
    )[0].tensor
    y, _ws = ops.custom(
        down_op,
        device=dev,
        values=[h, down, r.perm, r.offsets, r.weights],
        out_types=[TensorType(x.dtype, [T, H], dev), TensorType(x.dtype, [T, top_k, H], dev)],
        parameters=parameters,
    )
    return y.tensor


def panel_shapes(E: int, H: int, I: int, dtype: DType) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the (gate_up, down) panels ``pack_expert_panels`` makes for float32 or bfloat16 experts."""
    if dtype not in (DType.float32, DType.bfloat16):
        raise ValueError(f"expert panels hold float32 or bfloat16 weights, not {dtype}")
    pairs = 2 if dtype == DType.bfloat16 else 1
    return (
        (E, -(-I // GATE_UP_PANEL), -(-H // pairs), 2 * GATE_UP_PANEL * pairs),
        (E, -(-H // DOWN_PANEL), -(-I // pairs), DOWN_PANEL * pairs),
    )


def pack_expert_panels(w: np.ndarray, groups: int, pairs: bool) -> np.ndarray:
    """Hub-layout experts [E, K, groups*N] as the CPU kernels' column panels (cpu_moe.mojo).

    ``groups``: 2 for gate_up (panel j holds gate columns 32j..32j+31, then the same up
    columns), 1 for down (64 columns). Each panel is [K, groups*width], row by row;
    ``pairs`` (bfloat16, given as its uint16 bits): rows in k-pairs, [ceil(K/2),
    groups*width*2] with W[2kp, c], W[2kp+1, c] side by side. Columns past N and the
    row past an odd K are 0. One copy of ``w``'s size is made (call it layer by layer).
    """
    E, K, GN = w.shape
    N = GN // groups
    width = GATE_UP_PANEL if groups == 2 else DOWN_PANEL
    NP = -(-N // width)
    Kp = K + (K % 2 if pairs else 0)
    rows, elements = (Kp // 2, groups * width * 2) if pairs else (Kp, groups * width)
    out = np.empty((E, NP, rows, elements), w.dtype)

    def pack(e: int) -> None:  # expert by expert: the temporaries stay one expert's size
        we = w[e].reshape(K, groups, N)
        if NP * width != N or Kp != K:
            we = np.pad(we, ((0, Kp - K), (0, 0), (0, NP * width - N)))
        if not pairs:
            out[e].reshape(NP, Kp, groups, width)[...] = we.reshape(Kp, groups, NP, width).transpose(2, 0, 1, 3)
            return
        # A k-pair of bfloat16 bits as one little-endian uint32 (row 2kp low): the transpose
        # then moves whole words, not 2-byte elements (6x faster at load).
        we = we.reshape(Kp // 2, 2, groups, NP, width)
        words = we[:, 0].astype(np.uint32)
        words |= we[:, 1].astype(np.uint32) << 16
        out[e].view(np.uint32).reshape(NP, Kp // 2, groups, width)[...] = words.transpose(2, 0, 1, 3)

    # numpy copies without the GIL: one thread per core (most of the time is the
    # kernel providing the output's fresh pages, which also runs on every core).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max(1, min(E, cores))) as pool:
        list(pool.map(pack, range(E)))
    return out


def moe_experts_panels(
    x: TensorValue,
    router_logits: TensorValue,
    gate_up: TensorValue,
    down: TensorValue,
    *,
    top_k: int,
    intermediate_size: int,
) -> TensorValue:
    """``moe_experts`` on CPU over experts packed by ``pack_expert_panels`` (shapes: ``panel_shapes``).

    gate_up and down are float32 or bfloat16 (bfloat16 also under float32 x); the
    results are those of the hub layout.
    """
    if not x.device.is_cpu():
        raise ValueError("moe_experts_panels: the panel layout is a CPU layout")
    if gate_up.dtype != down.dtype:
        raise ValueError(f"gate_up ({gate_up.dtype}) and down ({down.dtype}) weights must share a dtype")
    check_weight_dtype("moe_experts_panels", gate_up.dtype, x.dtype)
    return _experts(x, router_logits, gate_up, down, top_k, intermediate_size, GATE_UP_PANELS_OP,
                    DOWN_PANELS_OP, {})
