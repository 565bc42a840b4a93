"""Deterministic tiny Hugging Face checkpoints of Qwen3-VL (MoE and dense).

Tests need a real checkpoint directory, laid out like the released ones, that
loads without a network: ``config.json`` in the hub's key layout (legacy
``rope_scaling``/``rope_theta``, vision ``model_type`` ``qwen3_vl_moe``),
``model.safetensors`` with experts in the hub layout, a byte-level BPE
tokenizer with the Qwen special tokens, the Qwen3-VL Instruct chat template
and the preprocessor configs of the release. Weights are re-drawn at unit
scale because the default 0.02 init leaves most ops numerically invisible.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "PRESETS",
    "Preset",
    "build_model",
    "default_cache_dir",
    "tiny_checkpoint",
    "write_tiny_checkpoint",
]

# Part of the cache key: bump whenever anything written changes.
FORMAT_VERSION = 1

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
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers

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


def _tokenizer_files(tokenizer_json: str) -> dict[str, str]:
    """The text of every tokenizer-side file of a release, keyed by file name."""
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
            "chat_template": CHAT_TEMPLATE,
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
        "chat_template.json": {"chat_template": CHAT_TEMPLATE},
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
    texts = {name: _json(content) for name, content in files.items()}
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

_HUB_TRANSPOSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _unit_scale_init(model: Any, seed: int) -> None:
    """Redraw every parameter so that each op changes the output visibly.

    Weights ~ N(0, 1/fan_in) (fan_in = the input dim; experts are
    [E, out, in] in memory), linear/conv biases ~ N(0, 0.5^2), norm weights
    ~ 1 + N(0, 0.1^2), LayerNorm biases ~ N(0, 0.1^2), embeddings ~ N(0, 1).
    A tied token embedding is also the lm_head and gets the lm_head's
    N(0, 1/H): at N(0, 1) its logits (std sqrt(H)) favour the current token so
    much that greedy decoding just repeats it. Parameters are visited in
    sorted-name order with one generator, so the draw depends only on
    ``seed``. Unknown parameter kinds raise rather than keep their 0.02 init.
    """
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    lm_head = model.get_output_embeddings().weight
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            owner, _, leaf = name.rpartition(".")
            module = modules[owner]
            shape = param.shape
            is_norm = isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
            mean = 0.0
            if isinstance(module, nn.Embedding) and param is not lm_head:
                std = 1.0
            elif is_norm:
                std, mean = 0.1, (0.0 if leaf == "bias" else 1.0)
            elif leaf == "bias":
                std = 0.5
            elif isinstance(module, nn.Conv3d):
                std = math.prod(shape[1:]) ** -0.5
            elif len(shape) >= 2:
                std = shape[-1] ** -0.5
            else:
                raise ValueError(f"no unit-scale rule for {name} {tuple(shape)} ({type(module).__name__})")
            param.copy_(torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean)


def _hub_state_dict(model: Any, tied: bool) -> dict[str, Any]:
    """The state dict as the hub stores it: experts [E, H, 2I] / [E, I, H], no tied lm_head."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        if name.endswith(_HUB_TRANSPOSED):
            tensor = tensor.transpose(1, 2)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors


def build_model(checkpoint_dir: str | os.PathLike[str], seed: int) -> Any:
    """The float32 transformers model whose weights ``write_tiny_checkpoint`` saves.

    Built from the ``config.json`` already in ``checkpoint_dir``, so tests can
    regenerate the exact in-memory model a checkpoint came from.
    """
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(checkpoint_dir)
    model_class = getattr(transformers, config.architectures[0])
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32).eval()
    _unit_scale_init(model, seed)
    return model


# ---------------------------------------------------------------------------
# Writing and caching


def write_tiny_checkpoint(out_dir: str | os.PathLike[str], preset: str = "moe", seed: int = 0) -> Path:
    """Write the ``preset`` checkpoint with weights drawn from ``seed`` into ``out_dir``.

    Same (preset, seed, FORMAT_VERSION) gives byte-identical files.
    """
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer_json = _tokenizer_json()
    config = PRESETS[preset].config(_token_ids(tokenizer_json))
    (out / "config.json").write_text(_json(config), encoding="utf-8")
    for name, text in _tokenizer_files(tokenizer_json).items():
        (out / name).write_text(text, encoding="utf-8")

    model = build_model(out, seed)
    save_file(
        _hub_state_dict(model, tied=config["tie_word_embeddings"]),
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out


def default_cache_dir() -> Path:
    """``$QWEN3VL_MOE_CACHE/checkpoints``, else ``~/.cache/qwen3vl_moe/checkpoints``."""
    root = os.environ.get("QWEN3VL_MOE_CACHE") or "~/.cache/qwen3vl_moe"
    return Path(root).expanduser() / "checkpoints"


def tiny_checkpoint(
    preset: str = "moe", seed: int = 0, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The cached checkpoint directory ``<cache_dir>/<preset>-s<seed>-v<FORMAT_VERSION>``.

    Generated on first use into a temporary sibling and renamed into place, so
    concurrent processes either see a complete directory or none.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{preset}-s{seed}-v{FORMAT_VERSION}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_tiny_checkpoint(tmp, preset, seed)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3vl_moe.checkpoints.tiny",
        description="Write a deterministic tiny Qwen3-VL checkpoint in Hugging Face format.",
    )
    parser.add_argument("--preset", default="moe", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="output directory (default: the shared cache)")
    parser.add_argument("--list", action="store_true", help="list the presets and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, preset in PRESETS.items():
            print(f"{name}: {preset.description}")
        return
    if args.out:
        path = write_tiny_checkpoint(args.out, args.preset, args.seed)
    else:
        path = tiny_checkpoint(args.preset, args.seed)
    print(path)


if __name__ == "__main__":
    main()
