"""Every tensor a Qwen3-VL checkpoint must hold, derived from its ``config.json`` alone.

One pure function, :func:`checkpoint_layout`, turns a config (the parsed
``config.json``, or a transformers config) into the exact tensor names, shapes
and dtype of ``Qwen3VLMoeForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``
checkpoints. Each dimension carries the config field it comes from, so a
checkpoint that disagrees with its config can be told which field to look at
(``text_config.num_experts``), and the tiny-checkpoint writer draws its weights
from the same table. Missing fields take transformers' defaults.

Experts are stored fused per layer (the hub stores ``gate_up_proj`` as
[E, H, 2I] and ``down_proj`` as [E, I, H], transformers holds them transposed
in memory) or per expert, as nn.Linear weights (``experts.{e}.gate_proj`` /
``up_proj`` [I, H], ``down_proj`` [H, I]): Qwen's FP8 releases and tools that
quantize experts one by one (llm-compressor) store them so.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "Dim",
    "ExpertLayout",
    "ExpertStorage",
    "PER_EXPERT_PROJS",
    "TensorSpec",
    "checkpoint_dtype",
    "checkpoint_layout",
    "expert_storage_of",
    "is_moe_architecture",
    "is_moe_layer",
    "as_config_dict",
    "text_dims",
    "vision_dims",
]

ExpertLayout = Literal["hub", "transformers"]
ExpertStorage = Literal["fused", "per_expert"]
PER_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")  # experts.{e}.<proj>.weight

_EXPERT_TENSOR = re.compile(r"model\.language_model\.layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.|gate_up_proj|down_proj)")

# What a tensor is, for whoever needs to know (initialisers, error messages):
# linear/conv/experts/router weights have a fan-in; the rest are vectors or tables.
Kind = Literal["linear", "experts", "conv", "bias", "norm", "norm_bias", "embedding"]


@dataclass(frozen=True)
class Dim:
    """One dimension of a tensor and the config field(s) it is computed from."""

    size: int
    source: str  # e.g. "text_config.num_experts", "2*text_config.moe_intermediate_size"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the checkpoint as stored on disk."""

    name: str
    dims: tuple[Dim, ...]
    dtype: str
    kind: Kind
    fan_in_axes: tuple[int, ...] = ()  # the input axes of a weight (their product is the fan-in)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims)

    @property
    def fan_in(self) -> int:
        n = 1
        for axis in self.fan_in_axes:
            n *= self.dims[axis].size
        return n

    def source_of(self, axis: int) -> str:
        return self.dims[axis].source


def as_config_dict(config: Any) -> dict[str, Any]:
    """A config as ``config.json``'s dict; a transformers config's aliased fields
    (``num_experts`` is stored as ``num_local_experts``) under their public names."""
    if isinstance(config, Mapping):
        return dict(config)
    if not hasattr(config, "to_dict"):
        raise TypeError(f"expected a config dict or a transformers config, got {type(config).__name__}")
    out = config.to_dict()
    for key in (None, "text_config", "vision_config"):
        obj = config if key is None else getattr(config, key, None)
        section = out if key is None else out.get(key)
        if obj is None or not isinstance(section, dict):
            continue
        for alias in getattr(obj, "attribute_map", {}):
            section[alias] = getattr(obj, alias)
    return out


def _section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    sub = config.get(key)
    if sub is None:
        return {}
    return as_config_dict(sub)


def is_moe_architecture(config: Mapping[str, Any]) -> bool:
    """MoE (``qwen3_vl_moe``) or dense (``qwen3_vl``), from model_type, else architectures."""
    model_type = config.get("model_type")
    if model_type in ("qwen3_vl_moe", "qwen3_vl"):
        return model_type == "qwen3_vl_moe"
    return any("Moe" in a for a in config.get("architectures") or ())


def text_dims(config: Mapping[str, Any]) -> dict[str, Dim]:
    """The text model's dims with transformers' defaults for absent fields."""
    config = as_config_dict(config)
    moe = is_moe_architecture(config)
    tc = _section(config, "text_config")

    def field(name: str, default: Any) -> Dim:
        value = tc.get(name)
        return Dim(int(default if value is None else value), f"text_config.{name}")

    hidden = field("hidden_size", 2048 if moe else 4096)
    heads = field("num_attention_heads", 16 if moe else 32)
    kv = tc.get("num_key_value_heads")
    dims = {
        "vocab": field("vocab_size", 151936),
        "hidden": hidden,
        "layers": field("num_hidden_layers", 24 if moe else 32),
        "heads": heads,
        "kv_heads": Dim(int(kv), "text_config.num_key_value_heads")
        if kv is not None
        else Dim(heads.size if moe else 32, "text_config.num_key_value_heads"),
        "intermediate": field("intermediate_size", 5632 if moe else 22016),
    }
    head_dim = tc.get("head_dim")
    if head_dim:
        dims["head_dim"] = Dim(int(head_dim), "text_config.head_dim")
    elif moe:
        dims["head_dim"] = Dim(
            hidden.size // heads.size, "text_config.head_dim (= hidden_size / num_attention_heads)"
        )
    else:
        dims["head_dim"] = Dim(128, "text_config.head_dim")
    if moe:
        dims |= {
            "experts": field("num_experts", 60),
            "moe_intermediate": field("moe_intermediate_size", 1408),
        }
    return dims


def is_moe_layer(config: Mapping[str, Any], layer: int) -> bool:
    """transformers' rule: sparse unless in mlp_only_layers, every decoder_sparse_step-th layer."""
    config = as_config_dict(config)
    if not is_moe_architecture(config):
        return False
    tc = _section(config, "text_config")
    num_experts = tc.get("num_experts", 60)
    mlp_only = tc.get("mlp_only_layers") or []
    step = tc.get("decoder_sparse_step") or 1
    return layer not in mlp_only and bool(num_experts) and (layer + 1) % step == 0


def vision_dims(config: Mapping[str, Any]) -> dict[str, Any]:
    vc = _section(config, "vision_config")

    def field(name: str, default: Any) -> Dim:
        value = vc.get(name)
        return Dim(int(default if value is None else value), f"vision_config.{name}")

    merge = field("spatial_merge_size", 2)
    hidden = field("hidden_size", 1152)
    return {
        "depth": field("depth", 27),
        "hidden": hidden,
        "intermediate": field("intermediate_size", 4304),
        "in_channels": field("in_channels", 3),
        "patch": field("patch_size", 16),
        "temporal_patch": field("temporal_patch_size", 2),
        "out": field("out_hidden_size", 3584),
        "positions": field("num_position_embeddings", 2304),
        "merged": Dim(
            hidden.size * merge.size**2, "vision_config.hidden_size*vision_config.spatial_merge_size^2"
        ),
        "deepstack": list(vc.get("deepstack_visual_indexes", (8, 16, 24))),
    }


def checkpoint_dtype(config: Mapping[str, Any]) -> str:
    """The dtype the config declares for its weights (``dtype`` / ``torch_dtype``), float32 if none."""
    config = as_config_dict(config)
    for section in (config, _section(config, "text_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(section.get(key), str):
                return section[key]
    return "float32"


def expert_storage_of(name: str) -> tuple[int, ExpertStorage] | None:
    """(layer, storage) of a checkpoint tensor (or its FP8 scale) that holds experts; None for the rest."""
    match = _EXPERT_TENSOR.match(name)
    if match is None:
        return None
    return int(match[1]), "per_expert" if match[2] is not None else "fused"


def checkpoint_layout(
    config: Mapping[str, Any] | Any,
    *,
    expert_layout: ExpertLayout = "hub",
    expert_storage: ExpertStorage | Mapping[int, ExpertStorage] = "fused",
    include_tied_lm_head: bool = False,
) -> dict[str, TensorSpec]:
    """Every tensor the checkpoint of ``config`` holds, by Hugging Face name, in model order.

    Args:
        config: The parsed ``config.json`` (or a transformers config).
        expert_layout: ``hub`` for the files as released ([E, H, 2I] / [E, I, H]);
            ``transformers`` for transformers' in-memory layout ([E, 2I, H] / [E, H, I]).
        expert_storage: ``fused`` (the two tensors above) or ``per_expert``
            (``experts.{e}.gate_proj.weight`` ...), for every sparse layer or by
            layer index (layers not in the mapping are fused).
        include_tied_lm_head: Also list ``lm_head.weight`` when the embeddings are
            tied (transformers' state_dict has it; tied checkpoints do not store it).
    """
    config = as_config_dict(config)
    dtype = checkpoint_dtype(config)
    t = text_dims(config)
    v = vision_dims(config)
    specs: dict[str, TensorSpec] = {}

    def add(name: str, dims: tuple[Dim, ...], kind: Kind, fan_in_axes: tuple[int, ...] = ()) -> None:
        specs[name] = TensorSpec(name, dims, dtype, kind, fan_in_axes)

    def linear(name: str, out: Dim, inp: Dim, bias: bool) -> None:
        add(name + ".weight", (out, inp), "linear", (1,))
        if bias:
            add(name + ".bias", (out,), "bias")

    def layer_norm(name: str, dim: Dim) -> None:
        add(name + ".weight", (dim,), "norm")
        add(name + ".bias", (dim,), "norm_bias")

    # Vision encoder.
    D, Dm, Iv = v["hidden"], v["merged"], v["intermediate"]
    add(
        "model.visual.patch_embed.proj.weight",
        (D, v["in_channels"], v["temporal_patch"], v["patch"], v["patch"]),
        "conv",
        (1, 2, 3, 4),
    )
    add("model.visual.patch_embed.proj.bias", (D,), "bias")
    add("model.visual.pos_embed.weight", (v["positions"], D), "embedding")
    qkv = Dim(3 * D.size, f"3*{D.source}")
    for j in range(v["depth"].size):
        p = f"model.visual.blocks.{j}."
        layer_norm(p + "norm1", D)
        layer_norm(p + "norm2", D)
        linear(p + "attn.qkv", qkv, D, bias=True)
        linear(p + "attn.proj", D, D, bias=True)
        linear(p + "mlp.linear_fc1", Iv, D, bias=True)
        linear(p + "mlp.linear_fc2", D, Iv, bias=True)

    def merger(p: str, norm_dim: Dim) -> None:
        layer_norm(p + "norm", norm_dim)
        linear(p + "linear_fc1", Dm, Dm, bias=True)
        linear(p + "linear_fc2", v["out"], Dm, bias=True)

    merger("model.visual.merger.", D)
    for k in range(len(v["deepstack"])):
        merger(f"model.visual.deepstack_merger_list.{k}.", Dm)

    # Language model.
    tc = _section(config, "text_config")
    H, V, hd = t["hidden"], t["vocab"], t["head_dim"]
    q_out = Dim(t["heads"].size * hd.size, f"{t['heads'].source}*{hd.source}")
    kv_out = Dim(t["kv_heads"].size * hd.size, f"{t['kv_heads'].source}*{hd.source}")
    attention_bias = bool(tc.get("attention_bias", False))
    add("model.language_model.embed_tokens.weight", (V, H), "embedding", (1,))
    for i in range(t["layers"].size):
        p = f"model.language_model.layers.{i}."
        add(p + "input_layernorm.weight", (H,), "norm")
        add(p + "post_attention_layernorm.weight", (H,), "norm")
        linear(p + "self_attn.q_proj", q_out, H, attention_bias)
        linear(p + "self_attn.k_proj", kv_out, H, attention_bias)
        linear(p + "self_attn.v_proj", kv_out, H, attention_bias)
        linear(p + "self_attn.o_proj", H, q_out, attention_bias)
        add(p + "self_attn.q_norm.weight", (hd,), "norm")
        add(p + "self_attn.k_norm.weight", (hd,), "norm")
        if is_moe_layer(config, i):
            E, I = t["experts"], t["moe_intermediate"]
            I2 = Dim(2 * I.size, f"2*{I.source}")
            add(p + "mlp.gate.weight", (E, H), "linear", (1,))
            storage = expert_storage if isinstance(expert_storage, str) else expert_storage.get(i, "fused")
            if storage == "per_expert":
                for e in range(E.size):
                    linear(f"{p}mlp.experts.{e}.gate_proj", I, H, bias=False)
                    linear(f"{p}mlp.experts.{e}.up_proj", I, H, bias=False)
                    linear(f"{p}mlp.experts.{e}.down_proj", H, I, bias=False)
            elif expert_layout == "hub":
                add(p + "mlp.experts.gate_up_proj", (E, H, I2), "experts", (1,))
                add(p + "mlp.experts.down_proj", (E, I, H), "experts", (1,))
            else:
                add(p + "mlp.experts.gate_up_proj", (E, I2, H), "experts", (2,))
                add(p + "mlp.experts.down_proj", (E, H, I), "experts", (2,))
        else:
            Id = t["intermediate"]
            linear(p + "mlp.gate_proj", Id, H, bias=False)
            linear(p + "mlp.up_proj", Id, H, bias=False)
            linear(p + "mlp.down_proj", H, Id, bias=False)
    add("model.language_model.norm.weight", (H,), "norm")
    if not config.get("tie_word_embeddings", False) or include_tied_lm_head:
        add("lm_head.weight", (V, H), "linear", (1,))
    return specs
