"""The activation reservation comes from the config, not a constant.

The estimate must grow with the step's tokens, cover the largest single
buffers a step is known to hold (the float32 pixel rows of the biggest image
the step admits, the logits), and be what the architecture's planner hands
MAX's memory planning.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from qwen3vl_moe.memory import StepShape, estimate_activation_bytes


def config(**text):
    vision = SimpleNamespace(
        hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3, temporal_patch_size=2,
        patch_size=16, spatial_merge_size=2, out_hidden_size=2048, deepstack_visual_indexes=[8, 16, 24],
    )
    # Qwen3-VL-30B-A3B's text dims (docs/published_shapes.md), cut to 2 layers.
    text_config = SimpleNamespace(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=2,
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144,
        vocab_size=151936, mlp_only_layers=[], decoder_sparse_step=1,
    )
    vars(text_config).update(text)
    return SimpleNamespace(text_config=text_config, vision_config=vision)


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_estimate_grows_with_the_step(dtype_bytes):
    small = estimate_activation_bytes(config(), StepShape(1024, 8, dtype_bytes))
    large = estimate_activation_bytes(config(), StepShape(8192, 8, dtype_bytes))
    assert 7.5 < large / small <= 8.0


def test_estimate_covers_the_largest_buffers():
    tokens = 4096
    estimate = estimate_activation_bytes(config(), StepShape(tokens, tokens, 2))
    pixel_rows = tokens * 4 * (3 * 2 * 16 * 16) * 4  # every token an image token, 4 patches each, float32
    logits = tokens * 151936 * 4
    assert estimate > pixel_rows
    assert estimate > logits


def test_dense_layers_use_the_dense_intermediate():
    moe = estimate_activation_bytes(config(), StepShape(512, 1, 4))
    dense = estimate_activation_bytes(config(num_experts=0, intermediate_size=60000), StepShape(512, 1, 4))
    assert dense > moe  # a huge dense MLP dominates once no layer is sparse


def test_the_architecture_plans_with_it():
    from max.pipelines.lib import PipelineArgs, PipelineConfig

    from qwen3vl_moe.arch import qwen3vl_moe_arch
    from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint
    from qwen3vl_moe.model import Qwen3VLModel

    pipeline_config = PipelineConfig.from_args(PipelineArgs.from_flat_kwargs(
        model_path=str(tiny_checkpoint("moe")), device_specs="cpu", max_length=1024, max_batch_size=4,
        custom_architectures=["qwen3vl_moe"],
    ))
    hf = pipeline_config.model.huggingface_config
    planner = qwen3vl_moe_arch.memory_planner.__new__(qwen3vl_moe_arch.memory_planner)
    planned = planner.estimate_activation_memory(pipeline_config, hf)
    assert planned == Qwen3VLModel.estimate_activation_memory(pipeline_config, hf)
    assert planned > 0
