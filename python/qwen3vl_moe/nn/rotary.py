"""Interleaved multimodal rotary embedding (MRoPE) of the Qwen3-VL text model.

Angles and cos/sin are computed in float32 whatever the model dtype (MAX's
built-in rounds them through bfloat16, which moves logits visibly). Each of
the head_dim/2 frequencies takes its position from one axis:
``h`` for j % 3 == 1 and j < 3*section[1], ``w`` for j % 3 == 2 and
j < 3*section[2], ``t`` otherwise (transformers' ``apply_interleaved_mrope``).
"""

from __future__ import annotations

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorValue, ops


def inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
    """``theta ** (-2j / head_dim)`` rounded once to float32."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float64) / head_dim
    return (1.0 / theta**exponents).astype(np.float32)


def mrope_axis_selector(head_dim: int, section: list[int]) -> np.ndarray:
    """One-hot [3, head_dim/2]: which of (t, h, w) drives each frequency."""
    half = head_dim // 2
    selector = np.zeros((3, half), dtype=np.float32)
    for j in range(half):
        if j % 3 == 1 and j < 3 * section[1]:
            selector[1, j] = 1.0
        elif j % 3 == 2 and j < 3 * section[2]:
            selector[2, j] = 1.0
        else:
            selector[0, j] = 1.0
    return selector


def absolute_positions(
    relative: TensorValue, cache_lengths: TensorValue, input_row_offsets: TensorValue
) -> TensorValue:
    """3-D positions [3, T] int64: each token's ``relative`` position plus its row's KV cache length.

    The host passes positions relative to what each sequence has cached, so a
    decode step's input is the sequence's ``rope_delta`` in all three sections:
    the same every step. A steady decode therefore copies no positions to the
    device, and a captured device graph (whose host inputs are frozen at
    capture) still sees the right positions. The token's row is the number of
    rows that end at or before it (``input_row_offsets[1:] <= t``): a
    [T, batch] comparison, negligible beside a step's matmuls, and made of
    elementwise ops and a sum that every device compiles.
    """
    device = relative.device
    tokens = relative.shape[1]
    t = ops.range(0, tokens, 1, out_dim=tokens, dtype=DType.int64, device=device)
    ends = ops.cast(input_row_offsets[1:], DType.int64)
    rows = ops.sum(ops.cast(ops.unsqueeze(t, 1) >= ops.unsqueeze(ends, 0), DType.int32), axis=1)
    cached = ops.gather(ops.cast(cache_lengths, DType.int64), ops.squeeze(rows, 1), axis=0)
    return relative + ops.unsqueeze(cached, 0)


class InterleavedMRope:
    """Builds per-token cos/sin tables [T, head_dim] from 3-D position ids."""

    def __init__(self, head_dim: int, theta: float, section: list[int]) -> None:
        self.head_dim = head_dim
        self.inv_freq = inverse_frequencies(head_dim, theta)
        self.selector = mrope_axis_selector(head_dim, section)

    def cos_sin(self, position_ids: TensorValue, device: DeviceRef) -> tuple[TensorValue, TensorValue]:
        """position_ids [3, T] int64 -> (cos, sin), each [T, head_dim] float32."""
        positions = ops.cast(position_ids, DType.float32).to(device)
        inv_freq = ops.constant(self.inv_freq, DType.float32, device)
        selector = ops.constant(self.selector, DType.float32, device)
        # [3, T, half]: one exact float32 product per (axis, token, frequency).
        angles = ops.unsqueeze(positions, -1) * ops.unsqueeze(ops.unsqueeze(inv_freq, 0), 0)
        # Exactly one selector entry is 1 per frequency, so the sum is exact.
        freqs = ops.sum(angles * ops.unsqueeze(selector, 1), axis=0)
        freqs = ops.squeeze(freqs, 0)
        emb = ops.concat([freqs, freqs], axis=-1)
        return ops.cos(emb), ops.sin(emb)


def apply_rotary(x: TensorValue, cos: TensorValue, sin: TensorValue) -> TensorValue:
    """NeoX half-split rotation of x [T, heads, head_dim] by per-token cos/sin.

    cos/sin are cast to x's dtype first, as transformers does for the text model.
    """
    cos = ops.unsqueeze(ops.cast(cos, x.dtype), 1)
    sin = ops.unsqueeze(ops.cast(sin, x.dtype), 1)
    half = x.shape[-1] // 2
    x1, x2 = ops.split(x, [half, half], axis=-1)
    rotated = ops.concat([-x2, x1], axis=-1)
    return x * cos + rotated * sin
