"""Graph-side wrapper of the ``qwen3vl_linear`` custom op (``mojo_kernels/text/linear.mojo``).

``y = x @ W^T`` with ``W`` in the checkpoint's ``[N, K]`` layout, CPU only.
MAX's CPU matmul packs (and for ``W^T`` transposes) the whole weight on every
call, which at decode (a few rows) costs as much again as the product: the op
streams ``W`` once for up to 16 rows and calls MAX's matmul above that.
"""

from __future__ import annotations

from max.graph import TensorType, TensorValue, ops

LINEAR_OP = "qwen3vl_linear"


def linear(x: TensorValue, weight: TensorValue) -> TensorValue:
    """[M, K] @ [N, K]^T -> [M, N] in x's dtype (float32 accumulation)."""
    if x.rank != 2 or weight.rank != 2:
        raise ValueError("linear: x must be [M, K] and weight [N, K]")
    if weight.dtype != x.dtype:
        raise ValueError(f"linear: weight dtype {weight.dtype} must equal x's {x.dtype}")
    return ops.custom(
        LINEAR_OP,
        device=x.device,
        values=[x, weight],
        out_types=[TensorType(x.dtype, [x.shape[0], weight.shape[0]], x.device)],
    )[0].tensor
