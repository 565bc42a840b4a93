"""Feed-forward blocks of the text model: dense SwiGLU and the sparse MoE."""

from __future__ import annotations

from max.dtype import DType
from max.graph import DeviceRef, TensorValue, Weight, ops
from max.nn import Linear
from max.nn.layer import Module

from ..weight_adapters import ExpertLayout


class DenseMLP(Module):
    """``down(silu(gate(x)) * up(x))``, bias-free."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, dtype, device)
        self.up_proj = Linear(hidden_size, intermediate_size, dtype, device)
        self.down_proj = Linear(intermediate_size, hidden_size, dtype, device)

    def __call__(self, x: TensorValue) -> TensorValue:
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedExperts(Module):
    """The checkpoint's fused expert tensors, kept in the checkpoint's layout."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int,
        layout: ExpertLayout, dtype: DType, device: DeviceRef,
    ) -> None:
        super().__init__()
        E, H, I = num_experts, hidden_size, intermediate_size
        self.layout = layout
        hub = layout == "hub"
        self.gate_up_proj = Weight("gate_up_proj", dtype, [E, H, 2 * I] if hub else [E, 2 * I, H], device)
        self.down_proj = Weight("down_proj", dtype, [E, I, H] if hub else [E, H, I], device)
        self.num_experts = num_experts

    def __call__(self, x: TensorValue, weights: TensorValue, ids: TensorValue) -> TensorValue:
        """y[t] = sum_k weights[t, k] * expert_{ids[t, k]}(x[t])."""
        # Dense [E, T] routing matrix: the weight where an expert was chosen, else 0.
        experts = ops.range(0, self.num_experts, 1, device=x.device, dtype=ids.dtype, out_dim=self.num_experts)
        chosen = ops.cast(ops.equal(ops.unsqueeze(ids, -1), experts), x.dtype)  # [T, k, E]
        dense_w = ops.squeeze(ops.sum(chosen * ops.unsqueeze(weights, -1), axis=1), 1)  # [T, E]
        dense_w = ops.transpose(dense_w, 0, 1)
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.layout == "transformers":
            gate_up, down = ops.transpose(gate_up, 1, 2), ops.transpose(down, 1, 2)
        h = ops.matmul(ops.unsqueeze(x, 0), gate_up)  # [E, T, 2I]
        inter = h.shape[-1] // 2
        gate, up = ops.split(h, [inter, inter], axis=-1)
        out = ops.matmul(ops.silu(gate) * up, down)  # [E, T, H]
        return ops.squeeze(ops.sum(out * ops.unsqueeze(dense_w, -1), axis=0), 0)


class SparseMoE(Module):
    """Top-k routed experts, exactly as transformers' Qwen3VLMoe sparse block.

    Router softmax, top-k and renormalisation run in float32; the routing
    weights are then cast to the activation dtype.
    """

    def __init__(
        self, *, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
        layout: ExpertLayout, dtype: DType, device: DeviceRef,
    ) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.gate = Linear(hidden_size, num_experts, dtype, device)
        self.experts = FusedExperts(num_experts, hidden_size, intermediate_size, layout, dtype, device)

    def route(self, x: TensorValue) -> tuple[TensorValue, TensorValue]:
        """(weights [T, k] in x's dtype, expert ids [T, k])."""
        probs = ops.softmax(ops.cast(self.gate(x), DType.float32))
        top_p, top_ids = ops.top_k(probs, self.top_k, axis=-1)
        top_p = top_p / ops.sum(top_p, axis=-1)
        return ops.cast(top_p, x.dtype), top_ids

    def __call__(self, x: TensorValue) -> TensorValue:
        weights, ids = self.route(x)
        return self.experts(x, weights, ids)
