"""FP8 checkpoints on GPU: the whole pipeline compiles for sm_90 with MAX's blockwise FP8 kernels.

No GPU is needed: ``max warm-cache --target cuda:sm_90`` builds the graphs for
the GPU target without running them. The checkpoint is
``checkpoints.fp8.fp8_blocks_checkpoint`` (the tiny MoE model resized to whole
128x128 blocks: the tiny presets' dims are too small for MAX's FP8 kernels,
so there every float8 tensor would be dequantized). The CPU-side test checks
what the loader hands those graphs. Numerics need a GPU run (see docs/STATUS.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from max.driver import Buffer
from max.dtype import DType
from max.graph.weights import load_weights
from transformers import AutoConfig

from qwen3vl_moe.checkpoints.fp8 import dequantize_blockwise, fp8_blocks_checkpoint
from qwen3vl_moe.weight_adapters import checkpoint_expert_layout, convert_qwen3vl_model_state_dict

from gpu_compile import warm_cache


def _convert(checkpoint, dtype):
    weights = load_weights(sorted(checkpoint.glob("*.safetensors")))
    return convert_qwen3vl_model_state_dict(
        dict(weights.items()), huggingface_config=AutoConfig.from_pretrained(checkpoint), dtype=dtype,
    )


def _values(data) -> np.ndarray:
    buffer = Buffer.from_dlpack(data.data)
    if data.dtype == DType.float8_e4m3fn:
        return buffer.view(DType.uint8, buffer.shape).to_numpy()
    return buffer.to_numpy()


def test_gpu_loader_keeps_text_matrices_float8_in_the_kernels_layout():
    checkpoint = fp8_blocks_checkpoint()
    hf = AutoConfig.from_pretrained(checkpoint)
    gpu = _convert(checkpoint, DType.float8_e4m3fn)  # the float8_e4m3fn encoding (GPU)
    cpu = _convert(checkpoint, DType.float32)  # everything dequantized, as on CPU
    float8 = {n for n, w in gpu.items() if w.dtype == DType.float8_e4m3fn}
    projections = {f"self_attn.{p}_proj.weight" for p in "qkvo"}
    for i in range(3):
        p = f"language_model.layers.{i}."
        want = {p + n for n in projections}
        want |= {p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")} if i == 1 else {
            p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"}
        assert want <= float8, sorted(want - float8)
    assert all(n.startswith("language_model.layers.") for n in float8)
    # Vision (quantized in this checkpoint), router, embedding and lm_head: bfloat16.
    for name, w in gpu.items():
        if name not in float8 and not name.endswith("_scale_inv"):
            assert w.dtype == DType.bfloat16, name
    # Experts in [E, N, K] with [E, N/128, K/128] scales (the hub layout transposed once at load),
    # values equal to the dequantized checkpoint's.
    assert checkpoint_expert_layout(gpu, hf) == "transformers"
    assert checkpoint_expert_layout(cpu, hf) == "hub"
    for name in sorted(float8):
        scale = gpu[name + "_scale_inv"]
        assert scale.dtype == DType.float32
        got = dequantize_blockwise(_values(gpu[name]), _values(scale))
        want = _values(cpu[name])
        if ".experts." in name:
            want = np.swapaxes(want, -1, -2)
        np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.mark.slow
def test_fp8_pipeline_compiles_for_sm90():
    log, _ = warm_cache(fp8_blocks_checkpoint(), "gpu")
    assert "19 float8_e4m3fn text-decoder tensors kept in float8" in log, log[-6000:]
    assert "Building, compiling, and initializing model took" in log
