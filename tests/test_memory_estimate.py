"""The activation reservation comes from the config, not a constant.

The estimate must grow with the step's tokens, cover the largest single
buffers a step is known to hold (the float32 pixel rows of the biggest image
the step admits, the logits), and be what the architecture's planner hands
MAX's memory planning.
"""

from __future__ import annotations

import pytest

from qwen3vl_moe.memory import StepShape, estimate_activation_bytes
from qwen3vl_moe.model_config import ModelArgs, TextModelArgs, VisionModelArgs


def config(**text) -> ModelArgs:
    """Qwen3-VL-30B-A3B's dims (docs/published_shapes.md), cut to 2 text layers."""
    vision = VisionModelArgs(
        depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, in_channels=3, patch_size=16,
        temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=2048, num_position_embeddings=2304,
        deepstack_visual_indexes=(8, 16, 24),
    )
    fields = dict(
        vocab_size=151936, hidden_size=2048, num_layers=2, num_heads=32, num_kv_heads=4, head_dim=128,
        intermediate_size=6144, rms_norm_eps=1e-6, rope_theta=5e6, mrope_section=(24, 20, 20),
        sparse_layers=(True, True), num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
        tie_word_embeddings=False,
    )
    return ModelArgs(TextModelArgs(**(fields | text)), vision, "hub")


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
    dense = estimate_activation_bytes(config(sparse_layers=(False, False), intermediate_size=60000), StepShape(512, 1, 4))
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


def test_tensor_parallel_reserves_on_every_device():
    """MAX's planner compares the figure with the free memory of all devices summed: N GPUs reserve N shares."""
    from types import SimpleNamespace

    from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint
    from qwen3vl_moe.memory import estimate_activation_memory
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(tiny_checkpoint("moe"))

    def planned(devices: int) -> int:
        model = SimpleNamespace(max_length=1024, enable_echo=False, quantization_encoding="bfloat16",
                                device_specs=[object()] * devices)
        runtime = SimpleNamespace(max_batch_input_tokens=8192, max_batch_size=16)
        return estimate_activation_memory(SimpleNamespace(model=model, runtime=runtime), hf)

    assert planned(4) == 4 * planned(1) == 2 * planned(2)
    assert planned(1) > 0
