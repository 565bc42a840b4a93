"""Configuration of Qwen3-VL models (MoE and dense), as MAX architecture configs.

The classes keep exactly the fields and methods of MAX's built-in
``max.pipelines.architectures.qwen3vl_moe`` configs (they subclass them), so
code written against the built-in API works unchanged. What differs is how the
values are used: the graphs here honour float32 end to end, and the rope and
expert-layout decisions are taken from the checkpoint config, never guessed.
"""

from __future__ import annotations

from .max_compat import BuiltinQwen3VLConfig, BuiltinVisionConfig
from .checkpoints.validate import validate_checkpoint

__all__ = ["Qwen3VLConfig", "VisionConfig", "head_dim", "is_moe_layer", "mrope_section", "rope_theta"]


# The vision encoder configuration is MAX's built-in one as it is: the same
# class, so ``Qwen3VLConfig.vision_config`` is an instance of it.
VisionConfig = BuiltinVisionConfig


class Qwen3VLConfig(BuiltinQwen3VLConfig):
    """Whole-model configuration (fields of MAX's built-in ``Qwen3VLConfig``)."""

    @classmethod
    def calculate_max_seq_len(cls, huggingface_config, model_config):  # type: ignore[override]
        """MAX's first call into this architecture that carries the model path
        (in ``PipelineConfig.from_args``, before memory planning, the tokenizer,
        the weights and any compile), so ``max serve --custom-architectures``
        refuses a broken checkpoint here, with every problem in one message."""
        validate_checkpoint(model_config.model_path)
        return super().calculate_max_seq_len(huggingface_config, model_config)


def head_dim(text_config) -> int:
    """Attention head size: explicit in Qwen3-VL configs, else hidden / heads."""
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


def is_moe_layer(text_config, layer_idx: int) -> bool:
    """transformers' rule for which decoder layers are sparse (MoE)."""
    num_experts = getattr(text_config, "num_experts", 0) or 0
    mlp_only = getattr(text_config, "mlp_only_layers", None) or []
    step = getattr(text_config, "decoder_sparse_step", 1) or 1
    return (
        layer_idx not in mlp_only
        and num_experts > 0
        and (layer_idx + 1) % step == 0
    )


def rope_theta(text_config) -> float:
    """The text rope base; transformers defaults to 500000 when absent."""
    params = getattr(text_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    return float(theta) if theta is not None else 500000.0


def mrope_section(text_config) -> list[int]:
    """The [t, h, w] frequency split; transformers defaults to [24, 20, 20]."""
    params = getattr(text_config, "rope_parameters", None) or {}
    scaling = getattr(text_config, "rope_scaling", None) or {}
    return list(params.get("mrope_section") or scaling.get("mrope_section") or [24, 20, 20])
