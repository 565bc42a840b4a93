"""Graph wrapper for the vision-encoder Mojo op in ``mojo_kernels/vision``.

A graph that calls it must list the package in ``custom_extensions``::

    from qwen3vl_moe.kernels import kernel_package
    Graph(..., custom_extensions=[kernel_package("vision")])

(or a ``.mojoc`` precompiled from it). The op runs on CPU and GPU; the device
is the device of the first input.
"""

from __future__ import annotations

import itertools

from max.dtype import DType
from max.graph import Dim, TensorType, TensorValue, ops
from max.graph import DimLike

__all__ = ["bilinear_pos_embed"]

POS_EMBED_OP = "qwen3vl_bilinear_pos_embed"

_fresh = itertools.count()


def bilinear_pos_embed(
    table: TensorValue,
    grid_thw: TensorValue,
    *,
    merge_size: int,
    num_grid_per_side: int,
    num_rows: DimLike | None = None,
) -> TensorValue:
    """Qwen3-VL position embeddings, bilinearly interpolated from the learned table.

    Equal to transformers 5.12.1's ``get_vision_bilinear_indices_and_weights``
    followed by ``(pos_embed(indices) * weights[:, :, None]).sum(0)``: rows in
    merge-window order, repeated over ``t``, weights and sums in float32.

    Args:
        table: ``pos_embed.weight`` ``[num_position_embeddings, hidden]``, float32
            or bfloat16.
        grid_thw: ``[G, 3]`` (t, h, w) per image / video, on the op's device;
            int64 (other integer dtypes are cast). ``h`` and ``w`` must be
            multiples of ``merge_size``.
        merge_size: spatial merge size (2).
        num_grid_per_side: ``int(sqrt(num_position_embeddings))`` (48).
        num_rows: the output row count ``sum(t*h*w)`` as a graph dim, e.g.
            ``pixel_values.shape[0]`` (checked at run time). If ``None`` a fresh
            symbolic dim is declared and the op's shape function computes it
            from ``grid_thw``'s values (CPU graphs; on GPU pass ``num_rows``).

    Returns:
        ``[num_rows, hidden]`` float32 (cast it to the activation dtype).
    """
    if table.dtype not in (DType.float32, DType.bfloat16):
        raise TypeError(f"bilinear_pos_embed: table must be float32 or bfloat16, got {table.dtype}")
    if table.rank != 2 or grid_thw.rank != 2:
        raise ValueError("bilinear_pos_embed: table must be [P, hidden] and grid_thw [G, 3]")
    if grid_thw.dtype != DType.int64:
        grid_thw = ops.cast(grid_thw, DType.int64)
    rows = Dim(num_rows) if num_rows is not None else Dim(f"bilinear_pos_rows_{next(_fresh)}")
    return ops.custom(
        POS_EMBED_OP,
        device=table.device,
        values=[table, grid_thw],
        out_types=[TensorType(DType.float32, [rows, table.shape[1]], table.device)],
        parameters={"merge_size": int(merge_size), "num_grid_per_side": int(num_grid_per_side)},
    )[0].tensor
