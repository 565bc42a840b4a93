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

from .model_config import head_dim, is_moe_layer

__all__ = ["Qwen3VLMemoryPlanner", "StepShape", "estimate_activation_bytes"]

FLOAT32 = 4


@dataclass(frozen=True)
class StepShape:
    """The largest step: tokens in one batch, logits rows returned, weight dtype size."""

    tokens: int
    logit_rows: int
    dtype_bytes: int


def _text_step_bytes(text_config: Any, tokens: int, logit_rows: int, dtype_bytes: int) -> int:
    tc, T, s = text_config, tokens, dtype_bytes
    H, hd = tc.hidden_size, head_dim(tc)
    q, kv = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    residual = 3 * T * H * s  # the stream, the residual sum, the normed input
    attention = T * (2 * q + 2 * kv) * s  # q, k, v and the attention output
    rope = 2 * T * hd * FLOAT32  # cos and sin, float32
    positions = 3 * T * 8  # int64 3-D position ids
    mlps = [0]
    for layer in range(tc.num_hidden_layers):
        if is_moe_layer(tc, layer):
            E, k, I = tc.num_experts, tc.num_experts_per_tok, tc.moe_intermediate_size
            rows = T * k  # (token, expert) slots
            # router logits and top-k weights in float32, gate|up, SwiGLU, per-slot outputs,
            # and the float32 partial rows of streamed experts (bounded by the slots).
            mlps.append(T * E * FLOAT32 + 2 * rows * FLOAT32 + rows * (2 * I + I + H) * s + rows * 2 * I * FLOAT32)
        else:
            mlps.append(T * 3 * tc.intermediate_size * s)
    logits = logit_rows * tc.vocab_size * FLOAT32
    return residual + attention + rope + positions + max(mlps) + logits


def _vision_step_bytes(vision_config: Any, patches: int, dtype_bytes: int) -> tuple[int, int]:
    """(peak bytes inside the encoder, bytes of its outputs that the decoder reads)."""
    vc, N, s = vision_config, patches, dtype_bytes
    Hv, m2 = vc.hidden_size, vc.spatial_merge_size**2
    in_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    pixels = N * in_dim * FLOAT32  # the preprocessed patches arrive in float32
    stream = 3 * N * Hv * s
    attention = 4 * N * Hv * s  # q, k, v, output (the varlen kernel keeps no score matrix)
    mlp = N * vc.intermediate_size * s
    rope = 2 * N * (Hv // vc.num_heads) * FLOAT32
    merged = N // m2
    merger = merged * m2 * Hv * s * 2  # the merge-window rows and the merger's hidden layer
    outputs = (1 + len(vc.deepstack_visual_indexes)) * merged * vc.out_hidden_size * s
    return pixels + stream + attention + mlp + rope + merger + outputs, outputs


def estimate_activation_bytes(huggingface_config: Any, step: StepShape) -> int:
    """Bytes of activations alive at once in the largest step ``step`` describes.

    A step's image tokens are at most its tokens, and each image token merges
    ``spatial_merge_size**2`` patches, so that bounds the encoder's patches.
    """
    vc = huggingface_config.vision_config
    patches = step.tokens * vc.spatial_merge_size**2
    vision_peak, vision_outputs = _vision_step_bytes(vc, patches, step.dtype_bytes)
    text_peak = _text_step_bytes(huggingface_config.text_config, step.tokens, step.logit_rows, step.dtype_bytes)
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


class Qwen3VLMemoryPlanner(PagedMemoryPlanner):
    """MAX's paged-KV planner with activations estimated from the config (MAX's public planner hook)."""

    def estimate_activation_memory(self, pipeline_config: Any, huggingface_config: Any) -> int:
        return estimate_activation_bytes(huggingface_config, largest_step(pipeline_config))
