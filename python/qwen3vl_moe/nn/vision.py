"""The Qwen3-VL vision encoder graph: patches in, merged tokens and deepstack features out.

Patch embedding is the Conv3d as a linear layer, the learned position table is
bilinearly interpolated per image by one Mojo op, the 2-D rotary runs in
float32, and each block attends only within its (image, frame group) segment
through the varlen attention op, so nothing is materialised across images.

Under tensor parallelism the encoder runs on the first GPU only (its cost is
small next to the decoder's) and hands each device its own copy of the
outputs, in the built-in's order: merged per device, then each deepstack level
per device.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, Weight, ops
from max.nn import Linear
from max.nn.layer import LayerList, Module
from max.nn.norm import LayerNorm

from ..kernels.attention import varlen_attention
from ..kernels.vision import bilinear_pos_embed
from ..model_config import VisionModelArgs

LAYER_NORM_EPS = 1e-6  # hard-coded in transformers
ROPE_THETA = 10000.0  # hard-coded in transformers


class VisionRope:
    """2-D rotary tables: ``[row * inv_freq | col * inv_freq]`` duplicated to head_dim."""

    def __init__(self, head_dim: int) -> None:
        dim = head_dim // 2
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float64) / dim
        self.inv_freq = (1.0 / ROPE_THETA**exponents).astype(np.float32)

    def cos_sin(self, position_ids: TensorValue) -> tuple[TensorValue, TensorValue]:
        """position_ids [N, 2] (row, col) -> cos, sin [N, head_dim] float32."""
        pos = ops.cast(position_ids, DType.float32)
        inv = ops.constant(self.inv_freq, DType.float32, pos.device)
        row, col = ops.split(pos, [1, 1], axis=1)
        theta = ops.concat([row * inv, col * inv], axis=-1)
        emb = ops.concat([theta, theta], axis=-1)
        return ops.cos(emb), ops.sin(emb)


def rotate(x: TensorValue, cos: TensorValue, sin: TensorValue) -> TensorValue:
    """NeoX half-split rotation in float32, cast back to x's dtype."""
    xf = ops.cast(x, DType.float32)
    half = x.shape[-1] // 2
    x1, x2 = ops.split(xf, [half, half], axis=-1)
    out = xf * ops.unsqueeze(cos, 1) + ops.concat([-x2, x1], axis=-1) * ops.unsqueeze(sin, 1)
    return ops.cast(out, x.dtype)


class VisionAttention(Module):
    def __init__(self, dim: int, num_heads: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = Linear(dim, 3 * dim, dtype, device, has_bias=True)
        self.proj = Linear(dim, dim, dtype, device, has_bias=True)

    def __call__(self, x: TensorValue, cu_seqlens: TensorValue, cos: TensorValue, sin: TensorValue) -> TensorValue:
        qkv = ops.reshape(self.qkv(x), [-1, 3, self.num_heads, self.head_dim])
        q, k, v = (ops.squeeze(t, 1) for t in ops.split(qkv, [1, 1, 1], axis=1))
        out = varlen_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, cu_seqlens, scale=self.head_dim**-0.5)
        return self.proj(ops.reshape(out, [-1, self.num_heads * self.head_dim]))


class VisionMLP(Module):
    def __init__(self, dim: int, hidden: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.linear_fc1 = Linear(dim, hidden, dtype, device, has_bias=True)
        self.linear_fc2 = Linear(hidden, dim, dtype, device, has_bias=True)

    def __call__(self, x: TensorValue) -> TensorValue:
        return self.linear_fc2(ops.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(Module):
    def __init__(self, dim: int, num_heads: int, hidden: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim, [device], dtype, eps=LAYER_NORM_EPS)
        self.norm2 = LayerNorm(dim, [device], dtype, eps=LAYER_NORM_EPS)
        self.attn = VisionAttention(dim, num_heads, dtype, device)
        self.mlp = VisionMLP(dim, hidden, dtype, device)

    def __call__(self, x, cu_seqlens, cos, sin) -> TensorValue:
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(Module):
    """Concatenates each 2x2 merge window (4 consecutive rows) and projects it.

    The final merger normalises each patch before the concat; the deepstack
    mergers normalise the concatenated window (``postshuffle``). GELU is exact.
    """

    def __init__(self, dim: int, out_dim: int, merge: int, postshuffle: bool, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.merged = dim * merge * merge
        self.postshuffle = postshuffle
        self.norm = LayerNorm(self.merged if postshuffle else dim, [device], dtype, eps=LAYER_NORM_EPS)
        self.linear_fc1 = Linear(self.merged, self.merged, dtype, device, has_bias=True)
        self.linear_fc2 = Linear(self.merged, out_dim, dtype, device, has_bias=True)

    def windows(self, x: TensorValue) -> TensorValue:
        """[N, D] -> [N / m^2, m^2 * D]; N is a multiple of m^2 (whole merge windows)."""
        group = self.merged // int(x.shape[1])
        n = x.shape[0]
        return ops.reshape(x.rebind([(n // group) * group, x.shape[1]]), [n // group, self.merged])

    def __call__(self, x: TensorValue) -> TensorValue:
        x = self.norm(self.windows(x)) if self.postshuffle else self.windows(self.norm(x))
        return self.linear_fc2(ops.gelu(self.linear_fc1(x)))


class PatchEmbed(Module):
    """The Conv3d patch embedding, as a linear layer over flattened patches."""

    def __init__(self, in_dim: int, dim: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.proj = Linear(in_dim, dim, dtype, device, has_bias=True)

    def __call__(self, x: TensorValue) -> TensorValue:
        return self.proj(x)


class PositionTable(Module):
    """The learned [num_position_embeddings, dim] table."""

    def __init__(self, count: int, dim: int, dtype: DType, device: DeviceRef) -> None:
        super().__init__()
        self.weight = Weight("weight", dtype, [count, dim], device)
        self.side = int(count**0.5)  # transformers' num_grid_per_side

    def __call__(self, grid_thw: TensorValue, merge: int, rows: Any) -> TensorValue:
        return bilinear_pos_embed(self.weight, grid_thw, merge_size=merge, num_grid_per_side=self.side, num_rows=rows)


class Qwen3VLVisionEncoder(Module):
    """pixel patches [N, C*Tp*P*P] -> (merged [N/m^2, out], deepstack features [N/m^2, out] each),
    each once per device of ``devices`` (computed on ``devices[0]``)."""

    def __init__(self, args: VisionModelArgs, dtype: DType, devices: list[DeviceRef]) -> None:
        super().__init__()
        device = devices[0]
        self.dtype, self.device, self.devices = dtype, device, devices
        self.merge = args.spatial_merge_size
        self.in_dim = args.patch_dim
        self.patch_embed = PatchEmbed(self.in_dim, args.hidden_size, dtype, device)
        self.pos_embed = PositionTable(args.num_position_embeddings, args.hidden_size, dtype, device)
        self.rope = VisionRope(args.hidden_size // args.num_heads)
        self.blocks = LayerList([
            VisionBlock(args.hidden_size, args.num_heads, args.intermediate_size, dtype, device)
            for _ in range(args.depth)
        ])
        self.deepstack_visual_indexes = list(args.deepstack_visual_indexes)
        self.merger = PatchMerger(args.hidden_size, args.out_hidden_size, self.merge, False, dtype, device)
        self.deepstack_merger_list = LayerList([
            PatchMerger(args.hidden_size, args.out_hidden_size, self.merge, True, dtype, device)
            for _ in self.deepstack_visual_indexes
        ])

    def input_tree(self) -> OrderedDict[str, TensorType]:
        """The graph inputs, in ``__call__``'s order (traced positionally):
        pixel_values, grid_thw [G, 3], vision_position_ids [N, 2], cu_seqlens [S+1]."""
        d = self.device
        return OrderedDict(
            pixel_values=TensorType(DType.float32, ["vision_seq_len", self.in_dim], d),
            grid_thw=TensorType(DType.int64, ["n_grids", 3], d),
            vision_position_ids=TensorType(DType.int32, ["vision_seq_len", 2], d),
            cu_seqlens=TensorType(DType.uint32, ["n_segments_plus_one"], d),
        )

    def __call__(
        self, pixel_values: TensorValue, grid_thw: TensorValue, position_ids: TensorValue, cu_seqlens: TensorValue
    ) -> tuple[TensorValue, ...]:
        x = self.patch_embed(ops.cast(pixel_values, self.dtype))
        x = x + ops.cast(self.pos_embed(grid_thw, self.merge, pixel_values.shape[0]), x.dtype)
        cos, sin = self.rope.cos_sin(position_ids)
        deepstack = []
        for j, block in enumerate(self.blocks):
            x = block(x, cu_seqlens, cos, sin)
            if j in self.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(j)](x))
        return tuple(
            copy for out in (self.merger(x), *deepstack) for copy in (out, *(out.to(d) for d in self.devices[1:]))
        )
