"""Deterministic tiny Hugging Face checkpoints of Qwen3-VL (MoE and dense).

Tests need a real checkpoint directory, laid out like the released ones, that
loads without a network: ``config.json`` in the hub's key layout (legacy
``rope_scaling``/``rope_theta``, vision ``model_type`` ``qwen3_vl_moe``),
sharded safetensors plus ``model.safetensors.index.json`` with experts in the
hub layout, a byte-level BPE tokenizer with the Qwen special tokens, the
Qwen3-VL Instruct chat template (where the caller asks) and the preprocessor
configs of the release. Weights are drawn with numpy at unit scale (the
default 0.02 init leaves most ops numerically invisible), so writing needs no
torch: numpy and the tokenizer libraries only.

    python -m qwen3vl_moe.checkpoints.tiny --list
    python -m qwen3vl_moe.checkpoints.tiny --preset moe --seed 0 --out DIR
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..cache import cache_root
from .layout import ExpertStorage, TensorSpec, checkpoint_layout
from .safetensors_io import RawTensor, float32_to_bf16_bits, write_safetensors

__all__ = [
    "FORMAT_VERSION",
    "INDEX_FILE",
    "PRESETS",
    "TEMPLATE_PLACEMENTS",
    "Preset",
    "bfloat16_draw",
    "build_model",
    "cached_directory",
    "default_cache_dir",
    "per_expert_draw",
    "preset_config",
    "tiny_checkpoint",
    "token_ids",
    "unit_scale_weights",
    "write_checkpoint_from_config",
    "write_sharded_safetensors",
    "write_tiny_checkpoint",
]

# Part of the cache key: bump whenever anything written changes.
# v2: weights drawn with numpy per tensor, sharded safetensors + index.
FORMAT_VERSION = 2

INDEX_FILE = "model.safetensors.index.json"

# ---------------------------------------------------------------------------
# Tokenizer

# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds exactly this).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_NUM_MERGES = 200

# Qwen's added tokens in release order: the first 14 are special, the rest are not.
_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_EXTRA_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)

_CORPUS = """\
A picture is a grid of small squares. Each square holds a colour, and the colours
together make the shapes that we see: a red kite in a blue sky, a cat asleep on
a warm chair, two people walking along the beach at the end of the day.
A vision model cuts the picture into patches of sixteen by sixteen pixels. Every
patch becomes a vector, and the vectors pass through the layers of the encoder.
Four neighbouring patches are then merged into one token for the language model.
The language model reads these tokens together with the words of the question.
What is in this image? There is a dog on the grass, and the dog is playing with
a ball. The ball is yellow. The grass is green, and the sky above it is grey.
How many birds are in the tree? I can see three birds: two on the left branch
and one on the right. They are small and brown, with white spots on the wings.
Describe the video. The first frames show a kitchen; a man cuts bread on a wooden
board, then he pours water into a glass and puts the glass on the table.
The text in the picture reads "OPEN 9:00 - 17:30", and the door is painted blue.
Please answer in one sentence. The answer is: the train leaves at half past ten.
Mixture of experts: a router looks at each token and sends it to two of eight
experts. The outputs of the chosen experts are weighted and added together.
Attention lets every token look at the tokens before it. Rotary position
embeddings turn each position into an angle, so that nearby tokens agree.
def add(a, b):
    return a + b
for i in range(10):
    print(i, add(i, 1))
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 100, 2024, 3.14, 0.5, 42.
Thank you! You are welcome. Is there anything else that I can help you with?
The weather today is sunny with a light wind from the west, and it will rain
in the evening. The temperature will be around twenty degrees in the afternoon.
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, in vocabulary order."""
    byte_values = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(byte_values)
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            chars.append(256 + len(chars) - 188)  # 188 bytes are printable as themselves
    return {b: chr(c) for b, c in zip(byte_values, chars)}


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the tiny byte-level BPE and return its ``tokenizer.json`` text.

    The BPE trainer picks the merges; the vocabulary is then renumbered the way
    Qwen's is (the 256 byte tokens in GPT-2 order, then one token per merge,
    then the added tokens), so ids do not depend on trainer internals.
    """
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    def pipeline(model: Any) -> Tokenizer:
        tok = Tokenizer(model)
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tok.post_processor = processors.ByteLevel(
            add_prefix_space=False, trim_offsets=False, use_regex=False
        )
        return tok

    byte_tokens = list(_bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(
        vocab_size=len(byte_tokens) + _NUM_MERGES,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=byte_tokens,
        special_tokens=[],
    )
    trained = pipeline(models.BPE())
    trained.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
        for m in json.loads(trained.to_str())["model"]["merges"]
    ]
    if len(merges) != _NUM_MERGES:
        raise RuntimeError(f"the corpus yields {len(merges)} merges, not {_NUM_MERGES}")
    vocab = {token: i for i, token in enumerate(byte_tokens)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    tok = pipeline(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in _EXTRA_TOKENS])
    return tok.to_str(pretty=True)


def _token_ids(tokenizer_json: str) -> dict[str, int]:
    """Ids of all added tokens (what the configs must point at)."""
    return {t["content"]: t["id"] for t in json.loads(tokenizer_json)["added_tokens"]}


# The Qwen3-VL Instruct chat template, verbatim as released with
# Qwen3-VL-8B-Instruct (5292 bytes, sha256 3636d0f0bd6bef02...291a489e4); the
# 30B-A3B-Instruct processor config carries the same template.
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def _json(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


TemplatePlacement = Literal["all", "tokenizer_config", "chat_template_json", "jinja"]
TEMPLATE_PLACEMENTS: tuple[str, ...] = ("all", "tokenizer_config", "chat_template_json", "jinja")


def _tokenizer_files(tokenizer_json: str, chat_template: str = "all") -> dict[str, str]:
    """The text of every tokenizer-side file of a release, keyed by file name.

    ``chat_template`` says where the template goes: ``tokenizer_config``
    (its ``chat_template`` key), ``chat_template_json`` (the processor file of
    the Qwen3-VL releases), ``jinja`` (``chat_template.jinja``, what
    transformers and fine-tuning tools save today) or ``all`` of them.
    """
    if chat_template not in TEMPLATE_PLACEMENTS:
        raise ValueError(f"chat_template must be one of {TEMPLATE_PLACEMENTS}, not {chat_template!r}")
    data = json.loads(tokenizer_json)
    ids = _token_ids(tokenizer_json)
    added = {
        str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
        for t in data["added_tokens"]
    }
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    files = {
        "vocab.json": data["model"]["vocab"],
        "tokenizer_config.json": {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": list(_SPECIAL_TOKENS[1:]),
            "bos_token": None,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 262144,
            "pad_token": "<|endoftext|>",
            "processor_class": "Qwen3VLProcessor",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
        "generation_config.json": {
            "bos_token_id": ids["<|endoftext|>"],
            "do_sample": False,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
        "preprocessor_config.json": {
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessorFast",
            "image_std": [0.5, 0.5, 0.5],
            "merge_size": 2,
            "patch_size": 16,
            "processor_class": "Qwen3VLProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"longest_edge": 16777216, "shortest_edge": 65536},
            "temporal_patch_size": 2,
        },
        "video_preprocessor_config.json": {
            "do_sample_frames": True,
            "fps": 2,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "max_frames": 768,
            "merge_size": 2,
            "min_frames": 4,
            "patch_size": 16,
            "processor_class": "Qwen3VLProcessor",
            "size": {"longest_edge": 25165824, "shortest_edge": 4096},
            "temporal_patch_size": 2,
            "video_processor_type": "Qwen3VLVideoProcessor",
        },
    }
    everywhere = chat_template == "all"
    if everywhere or chat_template == "tokenizer_config":
        files["tokenizer_config.json"]["chat_template"] = CHAT_TEMPLATE
    if everywhere or chat_template == "chat_template_json":
        files["chat_template.json"] = {"chat_template": CHAT_TEMPLATE}
    texts = {name: _json(content) for name, content in files.items()}
    if everywhere or chat_template == "jinja":
        texts["chat_template.jinja"] = CHAT_TEMPLATE
    texts["tokenizer.json"] = tokenizer_json
    texts["merges.txt"] = "#version: 0.2\n" + "".join(m + "\n" for m in merges)
    return texts


# ---------------------------------------------------------------------------
# Configs (hand-written in the hub layout; save_pretrained would write rope_parameters)

_ROPE_SCALING = {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}


def _vision_config(model_type: str) -> dict[str, Any]:
    # head_dim 72 as in the real encoder; merger input 4*144 = 576.
    return {
        "deepstack_visual_indexes": [1, 2, 3],
        "depth": 4,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 144,
        "in_channels": 3,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "model_type": model_type,
        "num_heads": 2,
        "num_position_embeddings": 2304,
        "out_hidden_size": 64,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }


def _text_config(ids: Mapping[str, int], model_type: str, num_layers: int) -> dict[str, Any]:
    # head_dim 128 is explicit so q_proj's output (4*128) is wider than hidden (64).
    return {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "dtype": "float32",
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 80,
        "max_position_embeddings": 262144,
        "model_type": model_type,
        "num_attention_heads": 4,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": dict(_ROPE_SCALING),
        "rope_theta": 5000000,
        "use_cache": True,
        # The added tokens come last, so the tokenizer's size is the largest id + 1.
        "vocab_size": max(ids.values()) + 1,
    }


def _top_config(ids: Mapping[str, int], architecture: str, model_type: str, tied: bool) -> dict[str, Any]:
    return {
        "architectures": [architecture],
        "image_token_id": ids["<|image_pad|>"],
        "model_type": model_type,
        "tie_word_embeddings": tied,
        "video_token_id": ids["<|video_pad|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
    }


def _moe_config(ids: Mapping[str, int], *, decoder_sparse_step: int, mlp_only_layers: list[int]) -> dict[str, Any]:
    # H=64, I=48: neither H == 2I nor H == I, so the loader's shape-based expert
    # transpose is unambiguous.
    text = _text_config(ids, "qwen3_vl_moe_text", num_layers=4)
    text.update(
        decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=mlp_only_layers,
        moe_intermediate_size=48,
        norm_topk_prob=True,
        num_experts=8,
        num_experts_per_tok=2,
    )
    config = _top_config(ids, "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", tied=False)
    config.update(text_config=text, vision_config=_vision_config("qwen3_vl_moe"))
    return config


def _dense_config(ids: Mapping[str, int]) -> dict[str, Any]:
    # Tied like the real 2B/4B releases: no lm_head tensor on disk.
    text = _text_config(ids, "qwen3_vl_text", num_layers=3)
    text["tie_word_embeddings"] = True
    config = _top_config(ids, "Qwen3VLForConditionalGeneration", "qwen3_vl", tied=True)
    config.update(text_config=text, vision_config=_vision_config("qwen3_vl"))
    return config


def _medium_config(ids: Mapping[str, int]) -> dict[str, Any]:
    # Benchmark size (about 0.4B parameters): every text layer MoE, 32 experts
    # top-4 of I=384 at H=1024 (neither H == 2I nor H == I); intermediate_size
    # is in the config as in the releases but unused (no dense layer).
    text = _text_config(ids, "qwen3_vl_moe_text", num_layers=8)
    text.update(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=384,
        norm_topk_prob=True,
        num_experts=32,
        num_experts_per_tok=4,
    )
    vision = _vision_config("qwen3_vl_moe")
    vision.update(
        deepstack_visual_indexes=[1, 3, 5],
        depth=8,
        hidden_size=512,
        intermediate_size=1536,
        num_heads=8,
        out_hidden_size=1024,
    )
    config = _top_config(ids, "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", tied=False)
    config.update(text_config=text, vision_config=vision)
    return config


@dataclass(frozen=True)
class Preset:
    """A named tiny model: what it is for, and its ``config.json`` given the token ids."""

    description: str
    config: Callable[[Mapping[str, int]], dict[str, Any]]


PRESETS: dict[str, Preset] = {
    "moe": Preset(
        "Qwen3VLMoeForConditionalGeneration, 4 text layers (layer 2 dense via mlp_only_layers), "
        "8 experts top-2, untied lm_head",
        functools.partial(_moe_config, decoder_sparse_step=1, mlp_only_layers=[2]),
    ),
    "dense": Preset(
        "Qwen3VLForConditionalGeneration, 3 dense text layers, tied embeddings",
        _dense_config,
    ),
    "moe-sparse2": Preset(
        "Qwen3VLMoeForConditionalGeneration, 4 text layers, decoder_sparse_step 2 "
        "(layers 1 and 3 MoE, 0 and 2 dense), untied lm_head",
        functools.partial(_moe_config, decoder_sparse_step=2, mlp_only_layers=[]),
    ),
    "medium": Preset(
        "Qwen3VLMoeForConditionalGeneration for benchmarks (~0.4B): 8 MoE text layers, H=1024, "
        "32 experts top-4 (I=384), 16/4 heads; vision depth 8, hidden 512, deepstack [1, 3, 5]",
        _medium_config,
    ),
}


# ---------------------------------------------------------------------------
# Weights


def unit_scale_tensor(spec: TensorSpec, seed: int, *, tied_embedding: bool = False) -> np.ndarray:
    """One tensor drawn so that each op changes the output visibly (float32).

    Weights ~ N(0, 1/fan_in) (fan_in = the input dims, the product of all but
    the first for the patch conv), linear/conv biases ~ N(0, 0.5^2), norm
    weights ~ 1 + N(0, 0.1^2), LayerNorm biases ~ N(0, 0.1^2), embeddings ~
    N(0, 1). A tied token embedding is also the lm_head and gets the lm_head's
    N(0, 1/H): at N(0, 1) its logits (std sqrt(H)) favour the current token so
    much that greedy decoding just repeats it. Each tensor has its own stream,
    seeded by ``seed`` and its name, so a draw depends on nothing else. (The
    default 0.02 init would leave most ops numerically invisible.)
    """
    mean, std = 0.0, 1.0
    if spec.kind == "embedding":
        std = spec.fan_in**-0.5 if tied_embedding else 1.0
    elif spec.kind == "norm":
        mean, std = 1.0, 0.1
    elif spec.kind == "norm_bias":
        std = 0.1
    elif spec.kind == "bias":
        std = 0.5
    else:  # linear, experts, conv
        std = spec.fan_in**-0.5
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    x = rng.standard_normal(spec.shape, dtype=np.float32)
    x *= np.float32(std)
    x += np.float32(mean)
    return x


def unit_scale_weights(config: Mapping[str, Any], seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """(name, float32 array) for every tensor of ``config``'s checkpoint, hub layout, model order."""
    tied = bool(config.get("tie_word_embeddings", False))
    for name, spec in checkpoint_layout(config).items():
        tied_embedding = tied and name == "model.language_model.embed_tokens.weight"
        yield name, unit_scale_tensor(spec, seed, tied_embedding=tied_embedding)


def per_expert_draw(name: str, array: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Fused hub-layout experts split into the per-expert nn.Linear weights they hold; the rest unchanged.

    ``gate_up_proj [E, H, 2I]`` gives ``experts.{e}.gate_proj.weight`` (its first
    I columns, transposed to [I, H]) and ``up_proj.weight`` (the last I);
    ``down_proj [E, I, H]`` gives ``experts.{e}.down_proj.weight [H, I]``: the
    values transformers' fused model holds, so both storages carry the same model.
    """
    prefix, _, part = name.rpartition("experts.")
    if part == "gate_up_proj":
        half = array.shape[2] // 2
        return [
            (f"{prefix}experts.{e}.{proj}.weight", np.ascontiguousarray(array[e, :, cols].T))
            for e in range(array.shape[0])
            for proj, cols in (("gate_proj", slice(None, half)), ("up_proj", slice(half, None)))
        ]
    if part == "down_proj":
        return [(f"{prefix}experts.{e}.down_proj.weight", np.ascontiguousarray(array[e].T))
                for e in range(array.shape[0])]
    return [(name, array)]


def write_sharded_safetensors(
    out_dir: str | os.PathLike[str],
    tensors: Iterable[tuple[str, np.ndarray | RawTensor]],
    max_shard_bytes: int,
) -> list[str]:
    """Write ``tensors`` as the hub does: ``model-0000k-of-0000n.safetensors`` + index.

    Tensors (numpy arrays, or :class:`RawTensor` for bfloat16 and float8) are
    taken in order and a shard is closed before it would exceed
    ``max_shard_bytes`` (a larger tensor gets a shard of its own), so at most
    one shard is held in memory. Returns the shard file names.
    """
    out = Path(out_dir)
    shard: dict[str, RawTensor] = {}
    shard_bytes = total = 0
    written: list[str] = []  # temporary names, renamed once the shard count is known
    shard_of: dict[str, int] = {}

    def flush() -> None:
        written.append(f".shard-{len(written):05d}.tmp")
        write_safetensors(out / written[-1], shard, {"format": "pt"})

    for name, array in tensors:
        tensor = array if isinstance(array, RawTensor) else RawTensor.of(array)
        nbytes = tensor.data.nbytes
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
            shard, shard_bytes = {}, 0
        shard[name] = tensor
        shard_bytes += nbytes
        total += nbytes
        shard_of[name] = len(written)
    flush()
    files = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
    for tmp, final in zip(written, files):
        os.replace(out / tmp, out / final)
    index = {
        "metadata": {"total_size": total},
        "weight_map": {name: files[i] for name, i in sorted(shard_of.items())},
    }
    (out / INDEX_FILE).write_text(_json(index), encoding="utf-8")
    return files


def default_shard_bytes(config: Mapping[str, Any]) -> int:
    """A third of the float32 checkpoint (at least 64 KiB): every preset gets several shards."""
    total = sum(4 * math.prod(spec.shape) for spec in checkpoint_layout(config).values())
    return max(64 * 1024, -(-total // 3))


def build_model(checkpoint_dir: str | os.PathLike[str]) -> Any:
    """The float32 transformers model of a written checkpoint, loaded from its files (needs torch)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])
    return model_class.from_pretrained(checkpoint_dir, dtype=torch.float32, local_files_only=True).eval()


# ---------------------------------------------------------------------------
# Writing and caching

def write_checkpoint_from_config(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    seed: int = 0,
    *,
    chat_template: TemplatePlacement = "all",
    max_shard_bytes: int | None = None,
    transform: Callable[[str, np.ndarray], Iterable[tuple[str, np.ndarray | RawTensor]]] | None = None,
    expert_storage: ExpertStorage = "fused",
) -> Path:
    """Write a checkpoint for an arbitrary Qwen3-VL ``config`` (the ``config.json`` dict).

    The tensors are those :func:`~qwen3vl_moe.checkpoints.layout.checkpoint_layout`
    lists, drawn at unit scale from ``seed`` in float32, in the hub layout. The
    tokenizer files are the tiny tokenizer's; ``config``'s token ids should be
    this tokenizer's (see :func:`token_ids`).

    Args:
        chat_template: Where the chat template goes (``all`` writes every place).
        max_shard_bytes: Shard size limit; default: a third of the checkpoint.
        transform: Maps each drawn (name, float32 array) to the tensors to store
            instead (e.g. :func:`bfloat16_draw`).
        expert_storage: ``per_expert`` stores the same drawn experts as
            per-expert linear weights (:func:`per_expert_draw`), before ``transform``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    (out / "config.json").write_text(_json(config), encoding="utf-8")
    for name, text in _tokenizer_files(_tokenizer_json(), chat_template).items():
        (out / name).write_text(text, encoding="utf-8")
    tensors: Iterable[tuple[str, np.ndarray]] = unit_scale_weights(config, seed)
    if expert_storage == "per_expert":
        tensors = (item for name, array in tensors for item in per_expert_draw(name, array))
    if transform is not None:
        tensors = (item for name, array in tensors for item in transform(name, array))
    write_sharded_safetensors(
        out, tensors, max_shard_bytes if max_shard_bytes is not None else default_shard_bytes(config)
    )
    return out


def bfloat16_draw(name: str, array: np.ndarray) -> list[tuple[str, RawTensor]]:
    """A ``transform`` that stores each float32 draw rounded to bfloat16, as the releases store weights."""
    return [(name, RawTensor("BF16", float32_to_bf16_bits(array)))]


def token_ids() -> dict[str, int]:
    """Ids of the tiny tokenizer's added tokens (what a config's token ids must be)."""
    return _token_ids(_tokenizer_json())


def preset_config(preset: str) -> dict[str, Any]:
    """The ``config.json`` of a preset."""
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    return PRESETS[preset].config(token_ids())


def write_tiny_checkpoint(
    out_dir: str | os.PathLike[str],
    preset: str = "moe",
    seed: int = 0,
    *,
    chat_template: TemplatePlacement = "all",
    expert_storage: ExpertStorage = "fused",
) -> Path:
    """Write the ``preset`` checkpoint with weights drawn from ``seed`` into ``out_dir``.

    Same (preset, seed, chat_template, expert_storage, FORMAT_VERSION) gives byte-identical files.
    """
    return write_checkpoint_from_config(
        out_dir, preset_config(preset), seed, chat_template=chat_template, expert_storage=expert_storage
    )


def default_cache_dir() -> Path:
    """``$QWEN3VL_MOE_CACHE/checkpoints``, else ``~/.cache/qwen3vl_moe/checkpoints``."""
    return cache_root() / "checkpoints"


def cached_directory(final: Path, write: Callable[[Path], object]) -> Path:
    """``final``, written once by ``write(tmp)`` into a temporary sibling and renamed into place.

    Concurrent processes see a complete directory or none.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def tiny_checkpoint(
    preset: str = "moe", seed: int = 0, cache_dir: str | os.PathLike[str] | None = None,
    expert_storage: ExpertStorage = "fused",
) -> Path:
    """The cached checkpoint directory ``<cache_dir>/<preset>-s<seed>-v<FORMAT_VERSION>``
    (``-per-expert`` appended for that storage).

    Generated on first use into a temporary sibling and renamed into place, so
    concurrent processes either see a complete directory or none.
    """
    preset_config(preset)  # an unknown preset fails before anything is created
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    suffix = "-per-expert" if expert_storage == "per_expert" else ""
    return cached_directory(
        root / f"{preset}-s{seed}-v{FORMAT_VERSION}{suffix}",
        lambda tmp: write_tiny_checkpoint(tmp, preset, seed, expert_storage=expert_storage),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3vl_moe.checkpoints.tiny",
        description="Write a deterministic tiny Qwen3-VL checkpoint in Hugging Face format.",
    )
    parser.add_argument("--preset", default="moe", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output directory (default: the shared cache)")
    parser.add_argument(
        "--chat-template", default="all", choices=TEMPLATE_PLACEMENTS,
        help="where the chat template goes (with --out; the cache always holds 'all')",
    )
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name}: {preset.description}")
        return
    if args.out:
        path = write_tiny_checkpoint(args.out, args.preset, args.seed, chat_template=args.chat_template)
    else:
        path = tiny_checkpoint(args.preset, args.seed)
    print(path)


if __name__ == "__main__":
    main()
