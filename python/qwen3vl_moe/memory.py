"""Activation memory of one pipeline step, estimated from the checkpoint config.

MAX's memory planner reserves this much beside the weights before it sizes
the KV cache. A fixed reservation is wrong both ways: too small for the
235B model's vision encoder at full pixel budget, far too large for a 2B model
on a laptop CPU. The estimate sums the buffers that are alive at the same
time in the larger of the two graphs (vision encoder, text decoder) of the
largest step the pipeline admits, plus the vision outputs the decoder reads.
It is an upper estimate: every intermediate of a layer is counted as live at
once, and MAX's graph compiler reuses buffers between layers, never across
the whole step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from max.pipelines.kv_cache.memory_planner import PagedMemoryPlanner

from .model_config import ModelArgs, TextModelArgs, VisionModelArgs

__all__ = ["Qwen3VLMemoryPlanner", "StepShape", "estimate_activation_bytes", "estimate_activation_memory", "largest_step"]

FLOAT32 = 4


@dataclass(frozen=True)
class StepShape:
    """The largest step: tokens in one batch, logits rows returned, weight dtype size."""

    tokens: int
    logit_rows: int
    dtype_bytes: int


def _text_step_bytes(t: TextModelArgs, tokens: int, logit_rows: int, dtype_bytes: int) -> int:
    T, s, H = tokens, dtype_bytes, t.hidden_size
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    residual = 3 * T * H * s  # the stream, the residual sum, the normed input
    attention = T * (2 * q + 2 * kv) * s  # q, k, v and the attention output
    rope = 2 * T * t.head_dim * FLOAT32  # cos and sin, float32
    positions = 3 * T * 8  # int64 3-D position ids
    mlps = [0]
    if any(t.sparse_layers):
        E, k, I = t.num_experts, t.num_experts_per_tok, t.moe_intermediate_size
        rows = T * k  # (token, expert) slots
        # router logits and top-k weights in float32, gate|up, SwiGLU, per-slot outputs,
        # and the float32 partial rows of streamed experts (bounded by the slots).
        mlps.append(T * E * FLOAT32 + 2 * rows * FLOAT32 + rows * (2 * I + I + H) * s + rows * 2 * I * FLOAT32)
    if not all(t.sparse_layers):
        mlps.append(T * 3 * t.intermediate_size * s)
    logits = logit_rows * t.vocab_size * FLOAT32
    return residual + attention + rope + positions + max(mlps) + logits


def _vision_step_bytes(v: VisionModelArgs, patches: int, dtype_bytes: int) -> tuple[int, int]:
    """(peak bytes inside the encoder, bytes of its outputs that the decoder reads)."""
    N, s, Hv, m2 = patches, dtype_bytes, v.hidden_size, v.spatial_merge_size**2
    pixels = N * v.patch_dim * FLOAT32  # the preprocessed patches arrive in float32
    stream = 3 * N * Hv * s
    attention = 4 * N * Hv * s  # q, k, v, output (the varlen kernel keeps no score matrix)
    mlp = N * v.intermediate_size * s
    rope = 2 * N * (Hv // v.num_heads) * FLOAT32
    merged = N // m2
    merger = merged * m2 * Hv * s * 2  # the merge-window rows and the merger's hidden layer
    outputs = (1 + len(v.deepstack_visual_indexes)) * merged * v.out_hidden_size * s
    return pixels + stream + attention + mlp + rope + merger + outputs, outputs


def estimate_activation_bytes(args: ModelArgs, step: StepShape) -> int:
    """Bytes of activations alive at once in the largest step ``step`` describes.

    A step's image tokens are at most its tokens, and each image token merges
    ``spatial_merge_size**2`` patches, so that bounds the encoder's patches.
    """
    patches = step.tokens * args.vision.spatial_merge_size**2
    vision_peak, vision_outputs = _vision_step_bytes(args.vision, patches, step.dtype_bytes)
    text_peak = _text_step_bytes(args.text, step.tokens, step.logit_rows, step.dtype_bytes)
    return max(vision_peak, text_peak + vision_outputs)


def largest_step(pipeline_config: Any) -> StepShape:
    """The largest step the pipeline admits, from its runtime settings.

    Prefill is not chunked for this architecture, so one prompt of
    ``max_length`` tokens runs in one step even above ``max_batch_input_tokens``.
    """
    model, runtime = pipeline_config.model, pipeline_config.runtime
    tokens = max(int(runtime.max_batch_input_tokens or 0), int(model.max_length or 0), 1)
    batch = int(runtime.max_batch_size or 1)
    logit_rows = tokens if model.enable_echo else batch
    dtype_bytes = FLOAT32 if model.quantization_encoding in (None, "float32") else 2
    return StepShape(tokens=tokens, logit_rows=logit_rows, dtype_bytes=dtype_bytes)


def estimate_activation_memory(pipeline_config: Any, huggingface_config: Any) -> int:
    """Activation bytes of the largest step ``pipeline_config`` admits for this checkpoint, over all its devices.

    MAX's planner subtracts this figure from the free memory summed over the
    devices (``max/pipelines/lib/memory_estimation.py``, ``_free_memory`` and
    ``_available_kv_cache_memory``), so it must be a sum too. Over N GPUs
    (tensor parallel) every device holds at most one device's activations:
    the residual stream, the router logits and the vision outputs are
    replicated, the attention heads and expert intermediates are split. So
    N times the one-device estimate bounds the sum (the vision encoder runs
    on the first device only, inside that bound).
    """
    devices = max(len(pipeline_config.model.device_specs), 1)
    one_device = estimate_activation_bytes(ModelArgs.from_config(huggingface_config), largest_step(pipeline_config))
    return devices * one_device


class Qwen3VLMemoryPlanner(PagedMemoryPlanner):
    """MAX's paged-KV planner with activations estimated from the config (MAX's public planner hook)."""

    def estimate_activation_memory(self, pipeline_config: Any, huggingface_config: Any) -> int:
        return estimate_activation_memory(pipeline_config, huggingface_config)
