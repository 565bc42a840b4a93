"""Fine-grained FP8 text-decoder layers for GPU graphs, on MAX's own FP8 kernels.

A float8_e4m3fn weight with one float32 ``weight_scale_inv`` per 128x128 block
(the Qwen3-VL ``-FP8`` releases) stays float8 on a GPU, and the layer does what
transformers' ``FP8Linear`` / ``FP8Experts`` do (integrations/finegrained_fp8.py,
5.12.1, ``activation_scheme: dynamic``): quantize the bfloat16 activations per
token in groups of 128 columns (scale = group amax / 448, computed at run time),
multiply float8 x float8 with float32 accumulation, apply both scales per
block, write bfloat16.

- :class:`Fp8Linear`: ``max.nn.kernels.quantize_dynamic_scaled_float8`` (1x128
  groups) then ``dynamic_scaled_matmul`` with block scaling (the path
  ``max.nn.Linear`` takes for ``QuantConfig.blockscaled_fp8``). One difference
  from that path: ``scale_ub`` (MAX clamps each group's amax to it, default
  1200) is set to float32's max, since transformers' activation quantizer does
  not clamp, and the inputs of ``down_proj`` can exceed 1200.
- :func:`fp8_moe_experts`: routing by this package's ``qwen3vl_moe_route`` op
  (transformers' float32 softmax / top-k / renormalisation), grouping by MAX's
  ``moe_create_indices`` (the indices MAX's own FP8 MoE feeds the kernel), the
  two grouped GEMMs by ``grouped_dynamic_scaled_fp8_matmul`` (weights
  ``[E, N, K]``, scales ``[E, N/128, K/128]``: transformers' in-memory expert
  layout; the weight adapter transposes hub-layout experts once at load), SwiGLU
  on the bfloat16 gate_up output as transformers' ``_apply_gate``, and the
  weighted sum over top-k as its grouped_mm path (bfloat16 products, float32 sum).

MAX's kernels need K (and, for the quantizer, the row width) a multiple of 128;
the weight adapter keeps a tensor float8 only when both of its dims are, so
these layers never see a ragged block (see ``weight_adapters``).
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, TensorValue, Weight, ops
from max.nn.kernels import (
    dynamic_scaled_matmul,
    grouped_dynamic_scaled_fp8_matmul,
    moe_create_indices,
    quantize_dynamic_scaled_float8,
)
from max.nn.layer import Module
from max.nn.quant_config import QuantConfig

from ..kernels.moe import moe_route

__all__ = ["BLOCK", "Fp8Experts", "Fp8Linear", "fp8_block_shape_fits", "fp8_moe_experts"]

BLOCK = 128
FP8 = DType.float8_e4m3fn
# No clamp on a group's amax (transformers' dynamic activation quantizer has none).
_NO_SCALE_UB = float(3.4028234663852886e38)

# MAX's blockwise FP8 specs: activations (1, 128) dynamic, weights (128, 128), float32 scales.
_QUANT = QuantConfig.blockscaled_fp8(mlp_quantized_layers=(), attn_quantized_layers=(), block_size=BLOCK)
INPUT_SCALE, WEIGHT_SCALE = _QUANT.input_scale, _QUANT.weight_scale


def fp8_block_shape_fits(rows: int, cols: int) -> bool:
    """Whether a [rows, cols] weight in 128x128 blocks suits MAX's blockwise FP8 kernels (no ragged block)."""
    return rows > 0 and cols > 0 and rows % BLOCK == 0 and cols % BLOCK == 0


def _quantize(x: TensorValue) -> tuple[TensorValue, TensorValue]:
    """x [M, K] -> (float8 [M, K], float32 scales [K/128, M padded to 4])."""
    return quantize_dynamic_scaled_float8(
        x, INPUT_SCALE, WEIGHT_SCALE, scale_ub=_NO_SCALE_UB,
        group_size_or_per_token=BLOCK, out_type=FP8, scales_type=DType.float32,
    )


class Fp8Linear(Module):
    """``y = x @ W^T`` with W float8 [out, in] and ``weight_scale_inv`` [out/128, in/128]; x and y bfloat16."""

    def __init__(self, in_dim: int, out_dim: int, device: DeviceRef) -> None:
        super().__init__()
        if not fp8_block_shape_fits(out_dim, in_dim):
            raise ValueError(f"Fp8Linear: [{out_dim}, {in_dim}] is not a whole number of {BLOCK}x{BLOCK} blocks")
        self.weight = Weight("weight", FP8, [out_dim, in_dim], device)
        self.weight_scale_inv = Weight("weight_scale_inv", DType.float32, [out_dim // BLOCK, in_dim // BLOCK], device)

    def __call__(self, x: TensorValue) -> TensorValue:
        if x.rank != 2:
            raise ValueError("Fp8Linear: x must be [M, K]")
        xq, x_scales = _quantize(x)
        return dynamic_scaled_matmul(
            xq, self.weight, x_scales, self.weight_scale_inv, INPUT_SCALE, WEIGHT_SCALE, out_type=x.dtype,
        )


class Fp8Experts(Module):
    """Fused float8 experts in transformers' layout: gate_up [E, 2I, H], down [E, H, I], with block scales."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, device: DeviceRef) -> None:
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        if not (fp8_block_shape_fits(2 * I, H) and fp8_block_shape_fits(H, I)):
            raise ValueError(f"Fp8Experts: H={H}, I={I} are not multiples of {BLOCK}")
        self.num_experts, self.intermediate_size = E, I
        self.gate_up_proj = Weight("gate_up_proj", FP8, [E, 2 * I, H], device)
        self.gate_up_proj_scale_inv = Weight("gate_up_proj_scale_inv", DType.float32, [E, 2 * I // BLOCK, H // BLOCK], device)
        self.down_proj = Weight("down_proj", FP8, [E, H, I], device)
        self.down_proj_scale_inv = Weight("down_proj_scale_inv", DType.float32, [E, H // BLOCK, I // BLOCK], device)

    def __call__(self, x: TensorValue) -> TensorValue:
        raise TypeError("Fp8Experts holds weights; fp8_moe_experts runs them")


def fp8_moe_experts(x: TensorValue, router_logits: TensorValue, experts: Fp8Experts, *, top_k: int) -> TensorValue:
    """Routed FP8 experts of a Qwen3-VL-MoE sparse block: x [T, H] bfloat16 -> [T, H] bfloat16."""
    T, H = x.shape
    r = moe_route(router_logits, top_k=top_k, dtype=x.dtype)
    order, starts, restore, expert_ids, usage = moe_create_indices(
        ops.reshape(r.ids, [-1]), experts.num_experts,
    )
    usage_host = usage.to(DeviceRef.CPU())  # the kernel's grid comes from these two numbers

    def grouped(a: TensorValue, weight: Weight, scales: Weight) -> TensorValue:
        aq, a_scales = _quantize(a)
        return grouped_dynamic_scaled_fp8_matmul(
            aq, weight, a_scales, scales, starts, expert_ids, usage_host,
            INPUT_SCALE, WEIGHT_SCALE, out_type=x.dtype,
        )

    rows = ops.gather(x, ops.cast(order // top_k, DType.int32), axis=0)  # [T*k, H], grouped by expert
    gate_up = grouped(rows, experts.gate_up_proj, experts.gate_up_proj_scale_inv)
    I = experts.intermediate_size
    h = ops.silu(gate_up[:, :I]) * gate_up[:, I:]
    down = grouped(h, experts.down_proj, experts.down_proj_scale_inv)  # [T*k, H]
    per_slot = ops.reshape(ops.gather(down, ops.cast(restore, DType.int32), axis=0), [-1, top_k, H])
    weighted = per_slot * ops.unsqueeze(r.weights, -1)  # bfloat16 products, as transformers
    return ops.cast(ops.reshape(ops.sum(ops.cast(weighted, DType.float32), axis=1), [-1, H]), x.dtype)
