"""Feed-forward blocks of the text model: dense SwiGLU and the sparse MoE.

Tensor parallel (``shard``, as MAX's built-in Qwen3-VL): every device holds a
slice of the intermediate dimension, of the dense MLP and of every expert
(all experts on every device, the router replicated), so each device's output
is a partial sum the decoder all-reduces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from max.dtype import DType
from max.graph import DeviceRef, ShardingStrategy, TensorValue, Weight, ops
from max.nn.layer import Module

from ..kernels.moe import moe_experts, moe_experts_panels, panel_shapes
from ..checkpoints.layout import ExpertLayout
from .fp8 import Fp8Experts, Fp8Linear, fp8_moe_experts
from .linear import StreamingLinear, shard_linear


# How the graph holds fused experts: a checkpoint layout, or (CPU) the column panels the
# weight adapter packs them into (``cpu_expert_panels``; kernels.moe.pack_expert_panels).
ExpertsLayout = ExpertLayout | Literal["cpu_panels"]


def text_linear(in_dim: int, out_dim: int, weight_dtype: DType, device: DeviceRef, fp8: bool = False) -> Module:
    """A text-decoder projection: FP8 (float8 weights kept on a GPU, see nn/fp8) or ``StreamingLinear``."""
    return Fp8Linear(in_dim, out_dim, device) if fp8 else StreamingLinear(in_dim, out_dim, weight_dtype, device)


class DenseMLP(Module):
    """``down(silu(gate(x)) * up(x))``, bias-free."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, weight_dtype: DType, device: DeviceRef,
        fp8: frozenset[str] = frozenset(),
    ) -> None:
        """``fp8``: the projections whose weights are float8 (GPU only; see nn/fp8)."""
        super().__init__()
        self.gate_proj = text_linear(hidden_size, intermediate_size, weight_dtype, device, "gate_proj" in fp8)
        self.up_proj = text_linear(hidden_size, intermediate_size, weight_dtype, device, "up_proj" in fp8)
        self.down_proj = text_linear(intermediate_size, hidden_size, weight_dtype, device, "down_proj" in fp8)

    def __call__(self, x: TensorValue) -> TensorValue:
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))

    def shard(self, devices: Sequence[DeviceRef]) -> list[DenseMLP]:
        """gate/up split by rows, down by the matching columns (MAX's ``MLP`` tensor-parallel split)."""
        n = len(devices)
        rows, cols = ShardingStrategy.rowwise(n), ShardingStrategy.columnwise(n)
        gate, up = shard_linear(self.gate_proj, rows, devices), shard_linear(self.up_proj, rows, devices)
        down = shard_linear(self.down_proj, cols, devices)
        shards = []
        intermediate, hidden = (int(d) for d in self.gate_proj.weight.shape)
        for i, device in enumerate(devices):
            shard = DenseMLP(hidden, intermediate // n, self.gate_proj.weight.dtype, device)
            shard.gate_proj, shard.up_proj, shard.down_proj = gate[i], up[i], down[i]
            shards.append(shard)
        return shards


class FusedExperts(Module):
    """The checkpoint's fused expert tensors, in the checkpoint's layout or (CPU) packed into panels."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int,
        layout: ExpertsLayout, dtype: DType, device: DeviceRef,
    ) -> None:
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.layout = layout
        self.intermediate_size = I
        hub = self.hub_layout
        if layout == "cpu_panels":
            gate_up, down = panel_shapes(E, H, I, dtype)
        else:
            gate_up, down = ([E, H, 2 * I], [E, I, H]) if hub else ([E, 2 * I, H], [E, H, I])
        self.gate_up_proj = Weight("gate_up_proj", dtype, gate_up, device)
        self.down_proj = Weight("down_proj", dtype, down, device)

    @property
    def hub_layout(self) -> bool:
        return self.layout == "hub"

    def __call__(self, x: TensorValue) -> TensorValue:
        raise TypeError("FusedExperts holds weights; SparseMoE runs them")

    def shard(self, devices: Sequence[DeviceRef]) -> list[FusedExperts]:
        """Every expert's intermediate dimension split over ``devices`` (MAX's ``StackedMoE`` split).

        gate_up keeps each device's gate rows and the matching up rows (MAX's
        ``gate_up`` strategy), down the matching intermediate slice.
        """
        if self.layout == "cpu_panels":
            raise ValueError("experts packed into CPU panels run on one device")
        n = len(devices)
        # The intermediate axis of each tensor, in the checkpoint's layout.
        self.gate_up_proj.sharding_strategy = ShardingStrategy.gate_up(n, axis=2 if self.hub_layout else 1)
        self.down_proj.sharding_strategy = ShardingStrategy.axiswise(1 if self.hub_layout else 2, n)
        E, H = int(self.gate_up_proj.shape[0]), int(self.down_proj.shape[2 if self.hub_layout else 1])
        I = int(self.down_proj.shape[1 if self.hub_layout else 2])
        gate_up, down = self.gate_up_proj.shard(devices), self.down_proj.shard(devices)
        shards = []
        for i, device in enumerate(devices):
            shard = FusedExperts(E, H, I // n, self.layout, self.gate_up_proj.dtype, device)
            shard.gate_up_proj, shard.down_proj = gate_up[i], down[i]
            shards.append(shard)
        return shards


class SparseMoE(Module):
    """Top-k routed experts, exactly as transformers' Qwen3VLMoe sparse block.

    The router linear runs in the graph; routing (softmax, top-k and
    renormalisation in float32), the grouped expert GEMMs with SwiGLU fused and
    the weighted un-permute are the Mojo ops of ``mojo_kernels/text``, so only
    the chosen experts' weights are read.
    """

    def __init__(
        self, *, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
        layout: ExpertsLayout, weight_dtype: DType, device: DeviceRef, fp8_experts: bool = False,
    ) -> None:
        """``fp8_experts``: float8 experts in transformers' layout (GPU only), run by nn/fp8's MAX kernels."""
        super().__init__()
        self.top_k = top_k
        self.hidden_size, self.num_experts, self.intermediate_size = hidden_size, num_experts, intermediate_size
        self.gate = StreamingLinear(hidden_size, num_experts, weight_dtype, device)
        self.experts: Module = (
            Fp8Experts(num_experts, hidden_size, intermediate_size, device) if fp8_experts
            else FusedExperts(num_experts, hidden_size, intermediate_size, layout, weight_dtype, device)
        )

    def __call__(self, x: TensorValue) -> TensorValue:
        if isinstance(self.experts, Fp8Experts):
            return fp8_moe_experts(x, self.gate(x), self.experts, top_k=self.top_k)
        if self.experts.layout == "cpu_panels":
            return moe_experts_panels(
                x, self.gate(x), self.experts.gate_up_proj, self.experts.down_proj,
                top_k=self.top_k, intermediate_size=self.experts.intermediate_size,
            )
        return moe_experts(
            x, self.gate(x), self.experts.gate_up_proj, self.experts.down_proj,
            top_k=self.top_k, weights_hub_layout=self.experts.hub_layout,
        )

    def shard(self, devices: Sequence[DeviceRef]) -> list[SparseMoE]:
        """The router replicated, the experts' intermediate dimension split (MAX's built-in split)."""
        if not isinstance(self.experts, FusedExperts):
            raise ValueError("float8 experts run on one device (tensor parallel FP8 is not implemented)")
        n = len(devices)
        if self.intermediate_size % n:
            raise ValueError(f"the experts' intermediate size ({self.intermediate_size}) does not divide by {n} devices")
        gates = shard_linear(self.gate, ShardingStrategy.replicate(n), devices)
        experts = self.experts.shard(devices)
        shards = []
        for i, device in enumerate(devices):
            shard = SparseMoE(
                hidden_size=self.hidden_size, num_experts=self.num_experts, top_k=self.top_k,
                intermediate_size=self.intermediate_size // n, layout=self.experts.layout,
                weight_dtype=self.gate.weight.dtype, device=device,
            )
            shard.gate, shard.experts = gates[i], experts[i]
            shards.append(shard)
        return shards
