"""The text decoder's linear layer: MAX's ``Linear`` with a CPU path for few rows."""

from __future__ import annotations

from max.graph import TensorValue, ops
from max.nn import Linear

from ..kernels.linear import linear


class StreamingLinear(Linear):
    """``max.nn.Linear`` (same weights and names) that on CPU runs the ``linear`` op.

    At decode a linear layer reads its weight once per step, so its speed is
    the weight stream; MAX's CPU matmul re-packs the weight on every call. GPU
    graphs keep MAX's matmul.
    """

    def __call__(self, x: TensorValue) -> TensorValue:
        if not self.device.is_cpu() or self.bias is not None or self.weight.quantization_encoding is not None:
            return super().__call__(x)
        if x.rank == 2:
            return linear(x, self.weight)
        flat = linear(ops.reshape(x, [-1, x.shape[-1]]), self.weight)
        return ops.reshape(flat, [*x.shape[:-1], self.weight.shape[0]])
