"""Graph-side wrapper of the ``qwen3vl_linear`` custom op (``mojo_kernels/text/linear.mojo``).

``y = x @ W^T`` with ``W`` in the checkpoint's ``[N, K]`` layout, CPU only.
MAX's CPU matmul packs (and for ``W^T`` transposes) the whole weight on every
call, which at decode (a few rows) costs as much again as the product: the op
streams ``W`` once for up to 16 rows and calls MAX's matmul above that.
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import TensorType, TensorValue, ops

LINEAR_OP = "qwen3vl_linear"


def check_weight_dtype(op: str, weight: DType, x: DType) -> None:
    """The CPU ops take weights in x's dtype, or bfloat16 weights under float32 x."""
    if weight != x and not (weight == DType.bfloat16 and x == DType.float32):
        raise ValueError(f"{op}: weight dtype {weight} must be x's ({x}), or bfloat16 under float32 x")


def linear(x: TensorValue, weight: TensorValue) -> TensorValue:
    """[M, K] @ [N, K]^T -> [M, N] in x's dtype (float32 accumulation; see check_weight_dtype)."""
    if x.rank != 2 or weight.rank != 2:
        raise ValueError("linear: x must be [M, K] and weight [N, K]")
    check_weight_dtype("linear", weight.dtype, x.dtype)
    return ops.custom(
        LINEAR_OP,
        device=x.device,
        values=[x, weight],
        out_types=[TensorType(x.dtype, [x.shape[0], weight.shape[0]], x.device)],
    )[0].tensor
