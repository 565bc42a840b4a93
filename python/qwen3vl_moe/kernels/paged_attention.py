"""Graph-side wrapper of the ``qwen3vl_paged_attention`` custom op (``mojo_kernels/text/paged_attention.mojo``).

Causal attention of a step's queries over MAX's paged KV cache on CPU: what
``max.nn.kernels.flash_attention_ragged`` computes with a causal mask, for the
steps that read cached tokens (decode, and a prefill after a cached prefix),
with one task per KV head (its group's query heads share every key and value
row load) and the keys split between tasks when there are few. Against MAX
26.7's CPU kernel, the medium preset's batch-1 decode graph is ~0.5-1 ms
shorter at 45-1,200 cached tokens (docs/STATUS.md).
"""

from __future__ import annotations

from max.dtype import DType
from max.graph import BufferValue, TensorType, TensorValue, ops

PAGED_ATTENTION_OP = "qwen3vl_paged_attention"


def paged_attention(
    q: TensorValue,
    kv_blocks: BufferValue,
    lookup_table: TensorValue,
    cache_lengths: TensorValue,
    input_row_offsets: TensorValue,
    layer_idx: TensorValue,
    *,
    scale: float,
) -> TensorValue:
    """``q`` [T, heads, head_dim] (float32 or bfloat16; rows ragged by ``input_row_offsets``,
    uint32 [B + 1]) -> [T, heads, head_dim]: each row attends to its sequence's cached
    tokens up to and including its own (stored in the cache before this op), with
    ``softmax(scale * q . k)`` in float32.

    The cache is MAX's (``PagedCacheValues``): ``kv_blocks`` [pages, 2, layers,
    page_size, kv_heads, head_dim] float32 or bfloat16, ``lookup_table`` [B, max_pages]
    and ``cache_lengths`` [B] uint32 (tokens cached before this step); ``layer_idx`` a
    uint32 scalar."""
    if q.dtype not in (DType.float32, DType.bfloat16):
        raise TypeError(f"paged_attention: q must be float32 or bfloat16, got {q.dtype}")
    if q.rank != 3:
        raise ValueError("paged_attention: q must be [T, heads, head_dim]")
    if kv_blocks.dtype not in (DType.float32, DType.bfloat16):
        raise TypeError(f"paged_attention: the KV cache must be float32 or bfloat16, not {kv_blocks.dtype}")
    return ops.inplace_custom(
        PAGED_ATTENTION_OP,
        device=q.device,
        values=[
            q,
            kv_blocks,
            lookup_table,
            cache_lengths,
            input_row_offsets,
            ops.reshape(layer_idx, [1]),
        ],
        out_types=[TensorType(q.dtype, q.shape, q.device)],
        parameters={"scale": float(scale)},
    )[0].tensor
