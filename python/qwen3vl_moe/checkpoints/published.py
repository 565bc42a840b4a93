"""Test checkpoints with the published Qwen3-VL models' exact dimensions.

Each entry holds the shape-defining ``config.json`` values of one release
(no weights can be downloaded here). :func:`published_config` cuts a release
to 2 text and 2 vision layers, remaps its deepstack indexes onto those 2
vision layers and, where the test needs the memory, shrinks the vocabulary to
the tiny tokenizer's; every other dimension is the release's.
:func:`published_checkpoint` writes (and caches) that config with seeded
unit-scale weights, in float32, or rounded to bfloat16 where a release's cut
is too large for two float32 engines one after the other (235B-A22B).

Where the values come from (docs/published_shapes.md has the table): no copy of
Qwen's own ``config.json`` files was reachable; each model's values are read
from third-party copies of them, named in ``source``. The token ids are the
tiny tokenizer's, not the release's (151655 and so on), since the tokenizer is.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .layout import checkpoint_layout
from .tiny import (
    FORMAT_VERSION,
    bfloat16_draw,
    cached_directory,
    default_cache_dir,
    token_ids,
    write_checkpoint_from_config,
)

__all__ = ["PUBLISHED", "PublishedModel", "published_checkpoint", "published_config", "stored_bytes"]

_MROPE = {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}

# Shared by every release (the same in all the sources below).
_TEXT_COMMON: dict[str, Any] = {
    "attention_bias": False, "attention_dropout": 0.0, "head_dim": 128, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 262144, "rms_norm_eps": 1e-06,
    "rope_scaling": _MROPE, "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936,
}
_VISION_COMMON: dict[str, Any] = {
    "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02,
    "num_heads": 16, "num_position_embeddings": 2304, "patch_size": 16,
    "spatial_merge_size": 2, "temporal_patch_size": 2,
}
# The two vision towers of the family: 24 x 1024 (2B, 4B) and 27 x 1152 (8B and the MoE models).
_VISION_SMALL = {"deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_size": 1024, "intermediate_size": 4096}
_VISION_LARGE = {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_size": 1152, "intermediate_size": 4304}


@dataclass(frozen=True)
class PublishedModel:
    """A release's shape-defining config values, where they were read, and how the test cuts it."""

    repo: str
    architecture: str
    model_type: str
    tie_word_embeddings: bool
    text: dict[str, Any]
    vision: dict[str, Any]
    source: str
    # The test keeps the published vocabulary unless this says why it cannot.
    small_vocab_reason: str | None = None
    # The test writes float32 weights unless this says why they are stored in
    # bfloat16 (as every release stores them) instead.
    bfloat16_reason: str | None = None
    moe: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "moe", "num_experts" in self.text)


def _dense(repo: str, *, hidden: int, intermediate: int, layers: int, heads: int, tied: bool,
           vision: Mapping[str, Any], out_hidden: int, source: str, small_vocab_reason: str | None = None) -> PublishedModel:
    return PublishedModel(
        repo, "Qwen3VLForConditionalGeneration", "qwen3_vl", tied,
        {**_TEXT_COMMON, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": 8, "tie_word_embeddings": tied},
        {**_VISION_COMMON, **vision, "out_hidden_size": out_hidden},
        source, small_vocab_reason,
    )


def _moe(repo: str, *, hidden: int, intermediate: int, moe_intermediate: int, layers: int, heads: int,
         source: str, small_vocab_reason: str, bfloat16_reason: str | None = None) -> PublishedModel:
    return PublishedModel(
        repo, "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", False,
        {**_TEXT_COMMON, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
         "num_attention_heads": heads, "num_key_value_heads": 4, "decoder_sparse_step": 1, "mlp_only_layers": [],
         "moe_intermediate_size": moe_intermediate, "norm_topk_prob": True, "num_experts": 128,
         "num_experts_per_tok": 8},
        {**_VISION_COMMON, **_VISION_LARGE, "out_hidden_size": hidden},
        source, small_vocab_reason, bfloat16_reason,
    )


_EXPERTS_MEMORY = "the two MoE layers' experts alone are {gib:.1f} GiB in float32; the 151936 x {hidden} embedding and lm_head would add {emb:.1f} GiB"

PUBLISHED: dict[str, PublishedModel] = {
    "2b": _dense(
        "Qwen/Qwen3-VL-2B-Instruct", hidden=2048, intermediate=6144, layers=28, heads=16, tied=True,
        vision=_VISION_SMALL, out_hidden=2048,
        source="third-party copies of config.json (a C++ test's Qwen3-VL-2B config, a Rust model-config test); "
        "they agree on every value listed",
    ),
    "4b": _dense(
        "Qwen/Qwen3-VL-4B-Instruct", hidden=2560, intermediate=9728, layers=36, heads=32, tied=True,
        vision=_VISION_SMALL, out_hidden=2560,
        source="two third-party verbatim copies of Qwen3-VL-4B-Instruct's config.json "
        "(transformers_version 4.57.0.dev0), identical in these values",
    ),
    "8b": _dense(
        "Qwen/Qwen3-VL-8B-Instruct", hidden=4096, intermediate=12288, layers=36, heads=32, tied=False,
        vision=_VISION_LARGE, out_hidden=4096,
        source="copies of configs with the Qwen3-VL-8B backbone (nvidia/Cosmos-Reason2-8B's config.json, "
        "Qwen-Image-2.1's Qwen3-VL-8B text encoder config), not the Instruct release's own file",
        small_vocab_reason="the untied 151936 x 4096 embedding and lm_head are 4.6 GiB in float32, "
        "twice over with transformers beside us",
    ),
    "30b-a3b": _moe(
        "Qwen/Qwen3-VL-30B-A3B-Instruct", hidden=2048, intermediate=6144, moe_intermediate=768, layers=48, heads=32,
        source="a third-party byte-for-byte transcription of Qwen3-VL-30B-A3B-Instruct's config.json "
        "(commit 1fc78ad) in a Rust test",
        small_vocab_reason=_EXPERTS_MEMORY.format(gib=2 * 128 * 3 * 2048 * 768 * 4 / 2**30, hidden=2048,
                                                   emb=2 * 151936 * 2048 * 4 / 2**30),
    ),
    "235b-a22b": _moe(
        "Qwen/Qwen3-VL-235B-A22B-Instruct", hidden=4096, intermediate=12288, moe_intermediate=1536, layers=94,
        heads=64,
        source="a third-party dump of Qwen3-VL-235B-A22B-Instruct's config as transformers 5.7.0 prints it "
        "(rope_parameters and num_local_experts are transformers' names for rope_scaling/rope_theta and "
        "num_experts)",
        small_vocab_reason=_EXPERTS_MEMORY.format(gib=2 * 128 * 3 * 4096 * 1536 * 4 / 2**30, hidden=4096,
                                                   emb=2 * 151936 * 4096 * 4 / 2**30),
        bfloat16_reason="in float32 the two layers' experts (18 GiB) cannot be held by two engines, one after "
        "the other, on a 24 GiB machine; in bfloat16 they are 9 GiB, this package computes in float32 from "
        "them, and the transformers reference holds one decoder layer at a time, in float32",
    ),
}

TEST_TEXT_LAYERS = 2
TEST_VISION_LAYERS = 2


def _remap_deepstack(indexes: list[int], depth: int, new_depth: int) -> list[int]:
    """Deepstack taps spread over the cut tower as over the full one, one tap per kept layer at most.

    [5, 11, 17] of 24 and [8, 16, 24] of 27 both become [0, 1] on 2 layers
    (a tap needs a distinct layer, so 3 taps on 2 layers keep 2).
    """
    return sorted({min(new_depth - 1, i * new_depth // depth) for i in indexes})


def published_config(name: str) -> dict[str, Any]:
    """The ``config.json`` of the cut release ``name`` (see :data:`PUBLISHED`)."""
    model = PUBLISHED[name]
    ids = token_ids()
    dtype = "float32" if model.bfloat16_reason is None else "bfloat16"
    text = {**model.text, "model_type": f"{model.model_type}_text", "num_hidden_layers": TEST_TEXT_LAYERS,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "dtype": dtype}
    if model.small_vocab_reason is not None:
        text["vocab_size"] = max(ids.values()) + 1
    vision = {**model.vision, "model_type": model.model_type, "depth": TEST_VISION_LAYERS,
              "deepstack_visual_indexes": _remap_deepstack(model.vision["deepstack_visual_indexes"],
                                                           model.vision["depth"], TEST_VISION_LAYERS)}
    return {
        "architectures": [model.architecture],
        **({"torch_dtype": dtype} if dtype != "float32" else {}),
        "image_token_id": ids["<|image_pad|>"],
        "model_type": model.model_type,
        "text_config": text,
        "tie_word_embeddings": model.tie_word_embeddings,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def stored_bytes(config: Mapping[str, Any]) -> int:
    """Bytes of ``config``'s checkpoint as :func:`published_checkpoint` stores it (its declared dtype)."""
    itemsize = 2 if config["text_config"]["dtype"] == "bfloat16" else 4
    return sum(itemsize * math.prod(spec.shape) for spec in checkpoint_layout(config).values())


def published_checkpoint(name: str, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached checkpoint ``<cache>/published-<name>-s<seed>-v<FORMAT_VERSION>``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    config = published_config(name)
    if config["text_config"]["dtype"] == "float32":
        return cached_directory(root / f"published-{name}-s{seed}-v{FORMAT_VERSION}",
                                lambda tmp: write_checkpoint_from_config(tmp, config, seed))
    # Shards of 2 GiB: the writer then holds one expert tensor's float32 draw, its
    # bfloat16 copy and at most one other shard at a time.
    return cached_directory(root / f"published-{name}-bf16-s{seed}-v{FORMAT_VERSION}",
                            lambda tmp: write_checkpoint_from_config(tmp, config, seed, transform=bfloat16_draw,
                                                                     max_shard_bytes=2 << 30))
