"""Configuration of Qwen3-VL models (MoE and dense), as MAX architecture configs.

The classes keep exactly the fields and methods of MAX's built-in
``max.pipelines.architectures.qwen3vl_moe`` configs (they subclass them), so
code written against the built-in API works unchanged. What differs is how the
values are used: the graphs here honour float32 end to end, and the rope and
expert-layout decisions are taken from the checkpoint config, never guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from max.dtype import DType

from .max_compat import BuiltinQwen3VLConfig, BuiltinVisionConfig
from .checkpoints.layout import ExpertLayout, as_config_dict, is_moe_layer, text_dims, vision_dims
from .checkpoints.validate import validate_checkpoint

__all__ = ["ModelArgs", "Qwen3VLConfig", "TextModelArgs", "VisionConfig", "VisionModelArgs"]


# The vision encoder configuration is MAX's built-in one as it is: the same
# class, so ``Qwen3VLConfig.vision_config`` is an instance of it.
VisionConfig = BuiltinVisionConfig


class Qwen3VLConfig(BuiltinQwen3VLConfig):
    """Whole-model configuration (fields of MAX's built-in ``Qwen3VLConfig``).

    The ``float8_e4m3fn`` encoding (an FP8 checkpoint on a GPU; MAX refuses it
    on CPU) computes in bfloat16: ``dtype`` (activations, norms, vision) is
    bfloat16 and the weight adapter keeps the text decoder's float8 matrices
    that MAX's blockwise FP8 kernels take; ``fp8_weights`` names them (set by
    :meth:`finalize` from the loaded weights), and the decoder builds FP8
    layers for exactly those (``nn/fp8``).
    """

    fp8_weights: frozenset[str] = frozenset()

    @classmethod
    def initialize_from_config(cls, *args: Any, **kwargs: Any) -> Qwen3VLConfig:  # type: ignore[override]
        config = super().initialize_from_config(*args, **kwargs)
        if config.dtype == DType.float8_e4m3fn:
            # MAX's encoding dtype is the weights'; the graphs compute in bfloat16 (the KV
            # cache already is: MAX maps float8_e4m3fn to a bfloat16 cache). The LLM
            # sub-config in bfloat16 also keeps MAX's own FP8 config parser off these weights.
            config.dtype = DType.bfloat16
            config.llm_config.dtype = DType.bfloat16
        return config  # type: ignore[return-value]

    def finalize(self, huggingface_config: Any, llm_state_dict: Any, vision_state_dict: Any,
                 *args: Any, **kwargs: Any) -> None:
        super().finalize(huggingface_config, llm_state_dict, vision_state_dict, *args, **kwargs)
        self.fp8_weights = frozenset(n for n, w in llm_state_dict.items() if w.dtype == DType.float8_e4m3fn)

    @classmethod
    def calculate_max_seq_len(cls, huggingface_config, model_config):  # type: ignore[override]
        """MAX's first call into this architecture that carries the model path
        (in ``PipelineConfig.from_args``, before memory planning, the tokenizer,
        the weights and any compile), so ``max serve --custom-architectures``
        refuses a broken checkpoint here, with every problem in one message."""
        validate_checkpoint(model_config.model_path)
        return super().calculate_max_seq_len(huggingface_config, model_config)


@dataclass(frozen=True)
class TextModelArgs:
    """The text decoder's shape, as the layers consume it."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense layers
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]  # [t, h, w] split of the rotary frequencies
    sparse_layers: tuple[bool, ...]  # per layer: MoE (True) or dense MLP
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    tie_word_embeddings: bool


@dataclass(frozen=True)
class VisionModelArgs:
    """The vision encoder's shape, as the layers consume it."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]

    @property
    def patch_dim(self) -> int:
        """Values per patch row: channels x temporal patch x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class ModelArgs:
    """One typed, frozen description of the model, built once from the checkpoint.

    The dims and the sparse-layer rule come from ``checkpoints.layout`` (the
    same table that checks a checkpoint's tensors and writes the tiny ones,
    so defaults live in one place); the rope parameters from the
    transformers config, which normalises ``rope_scaling`` / ``rope_parameters``.
    ``expert_layout`` is the checkpoint's fused-expert layout, read off its
    tensors (None: a dense model, or dims wanted before the weights are read).
    ``text_weight_dtype`` is the storage dtype of the text decoder's matrices
    when it differs from the compute dtype (bfloat16 weights, float32 compute
    on CPU); None: the compute dtype.
    """

    text: TextModelArgs
    vision: VisionModelArgs
    expert_layout: ExpertLayout | None = None
    text_weight_dtype: DType | None = None

    @classmethod
    def from_config(
        cls, huggingface_config: Any, expert_layout: ExpertLayout | None = None,
        text_weight_dtype: DType | None = None,
    ) -> ModelArgs:
        config = as_config_dict(huggingface_config)
        tc, vc = huggingface_config.text_config, config.get("vision_config") or {}
        t, v = text_dims(config), vision_dims(config)
        moe = "experts" in t
        params = getattr(tc, "rope_parameters", None) or {}
        scaling = getattr(tc, "rope_scaling", None) or {}
        theta = params.get("rope_theta", getattr(tc, "rope_theta", None))
        text = TextModelArgs(
            vocab_size=t["vocab"].size,
            hidden_size=t["hidden"].size,
            num_layers=t["layers"].size,
            num_heads=t["heads"].size,
            num_kv_heads=t["kv_heads"].size,
            head_dim=t["head_dim"].size,
            intermediate_size=t["intermediate"].size,
            rms_norm_eps=float(tc.rms_norm_eps),
            rope_theta=float(theta) if theta is not None else 500000.0,  # transformers' default
            mrope_section=tuple(params.get("mrope_section") or scaling.get("mrope_section") or (24, 20, 20)),
            sparse_layers=tuple(is_moe_layer(config, i) for i in range(t["layers"].size)),
            num_experts=t["experts"].size if moe else 0,
            num_experts_per_tok=int(getattr(tc, "num_experts_per_tok", 0) or 0) if moe else 0,
            moe_intermediate_size=t["moe_intermediate"].size if moe else 0,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        )
        vision = VisionModelArgs(
            depth=v["depth"].size,
            hidden_size=v["hidden"].size,
            num_heads=int(vc.get("num_heads", 16)),
            intermediate_size=v["intermediate"].size,
            in_channels=v["in_channels"].size,
            patch_size=v["patch"].size,
            temporal_patch_size=v["temporal_patch"].size,
            spatial_merge_size=int(vc.get("spatial_merge_size", 2)),
            out_hidden_size=v["out"].size,
            num_position_embeddings=v["positions"].size,
            deepstack_visual_indexes=tuple(v["deepstack"]),
        )
        return cls(text=text, vision=vision, expert_layout=expert_layout, text_weight_dtype=text_weight_dtype)
