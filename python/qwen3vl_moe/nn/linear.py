"""The text decoder's linear layer: MAX's ``Linear`` with a CPU path for few rows."""

from __future__ import annotations

from collections.abc import Sequence

from max.graph import DeviceRef, ShardingStrategy, TensorValue
from max.nn import Linear

from ..kernels.linear import linear


class StreamingLinear(Linear):
    """``max.nn.Linear`` (same weights and names) that on CPU runs the ``linear`` op.

    At decode a linear layer reads its weight once per step, so its speed is
    the weight stream; MAX's CPU matmul re-packs the weight on every call. The
    op also reads a bfloat16 weight under float32 activations (half the bytes).
    GPU graphs keep MAX's matmul.
    """

    def __call__(self, x: TensorValue) -> TensorValue:
        if self.runs_cpu_op(x):
            return linear(x, self.weight)  # the weight may be bfloat16 under float32 x
        return super().__call__(x)

    def runs_cpu_op(self, x: TensorValue) -> bool:
        """Whether ``x`` goes through this package's CPU op (no bias or quantization, [M, K] x on CPU)."""
        plain = self.bias is None and self.weight.quantization_encoding is None
        return self.device.is_cpu() and plain and x.rank == 2


def shard_linear(layer: Linear, strategy: ShardingStrategy, devices: Sequence[DeviceRef]) -> list[Linear]:
    """``layer`` split over ``devices`` by ``strategy`` (MAX's ``Linear.shard``: views of the one loaded weight).

    The shards are MAX ``Linear`` layers: tensor parallelism runs on GPUs,
    where ``StreamingLinear`` is MAX's matmul anyway.
    """
    layer.sharding_strategy = strategy
    return layer.shard(devices)
