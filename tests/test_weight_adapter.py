"""The weight adapter: names, expert layouts decided from config dims, precise errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from max.graph.weights import load_weights
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig

from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint
from qwen3vl_moe.weight_adapters import (
    CheckpointError,
    checkpoint_expert_layout,
    convert_qwen3vl_model_state_dict,
)

EXPERTS = "model.language_model.layers.0.mlp.experts."


@pytest.fixture(scope="module")
def moe_dir() -> Path:
    return tiny_checkpoint("moe")


def load_all(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of a (sharded) checkpoint."""
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def convert(directory: Path, tensors: dict[str, np.ndarray] | None = None, tmp: Path | None = None, config=None):
    """Runs the adapter on ``directory``'s checkpoint, optionally with replaced tensors."""
    paths = sorted(directory.glob("*.safetensors"))
    if tensors is not None:
        assert tmp is not None
        paths = [tmp / "model.safetensors"]
        save_file(tensors, str(paths[0]))
    weights = load_weights(paths)
    return convert_qwen3vl_model_state_dict(
        dict(weights.items()), huggingface_config=config or AutoConfig.from_pretrained(directory)
    )


def test_hub_layout_is_recognised_and_renamed(moe_dir):
    out = convert(moe_dir)
    assert "language_model.embed_tokens.weight" in out
    assert "language_model.lm_head.weight" in out
    assert "vision_encoder.pos_embed.weight" in out
    # The patch Conv3d is handed to the graph as the linear layer it equals.
    assert list(out["vision_encoder.patch_embed.proj.weight"].shape) == [144, 3 * 2 * 16 * 16]
    assert not any(k.startswith("model.") for k in out)
    config = AutoConfig.from_pretrained(moe_dir)
    assert checkpoint_expert_layout(out, config) == "hub"


def test_transformers_layout_is_recognised(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[name] = np.ascontiguousarray(tensors[name].transpose(0, 2, 1))
    out = convert(moe_dir, tensors, tmp_path)
    config = AutoConfig.from_pretrained(moe_dir)
    assert checkpoint_expert_layout(out, config) == "transformers"


def test_mixed_layouts_are_rejected(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    for part in ("gate_up_proj", "down_proj"):
        tensors[EXPERTS + part] = np.ascontiguousarray(tensors[EXPERTS + part].transpose(0, 2, 1))
    with pytest.raises(CheckpointError, match="different layouts"):
        convert(moe_dir, tensors, tmp_path)


def test_missing_tensor_is_named(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    del tensors["model.language_model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(CheckpointError, match=r"missing tensor language_model\.layers\.1\.self_attn\.k_norm\.weight \(expected shape \[128\]\)"):
        convert(moe_dir, tensors, tmp_path)


def test_wrong_shape_names_expected_and_actual(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    tensors["model.language_model.layers.2.mlp.up_proj.weight"] = np.zeros((81, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"layers\.2\.mlp\.up_proj\.weight has shape \[81, 64\], expected \[80, 64\]"):
        convert(moe_dir, tensors, tmp_path)


def test_unexpected_tensor_is_named(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    tensors["model.language_model.layers.0.mlp.shared_expert.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected tensor language_model\.layers\.0\.mlp\.shared_expert\.weight"):
        convert(moe_dir, tensors, tmp_path)


def test_experts_of_wrong_shape_are_rejected(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    tensors[EXPERTS + "gate_up_proj"] = np.zeros((8, 64, 90), np.float32)
    with pytest.raises(CheckpointError, match="match neither the hub layout"):
        convert(moe_dir, tensors, tmp_path)


def test_ambiguous_dims_are_refused_not_guessed(moe_dir):
    config = AutoConfig.from_pretrained(moe_dir)
    config.text_config.moe_intermediate_size = config.text_config.hidden_size // 2  # H == 2I
    with pytest.raises(CheckpointError, match="cannot be told apart|match neither"):
        convert(moe_dir, config=config)


def test_foreign_checkpoint_is_rejected(moe_dir, tmp_path):
    with pytest.raises(CheckpointError, match="not under model.language_model"):
        convert(moe_dir, {"transformer.h.0.attn.weight": np.zeros((2, 2), np.float32)}, tmp_path)


def test_pipeline_reports_a_wrong_checkpoint_before_compiling(moe_dir, tmp_path):
    """Loading a broken checkpoint fails fast, naming the tensor (the file check
    in front of MAX catches it first; the adapter's check is the second line)."""
    from qwen3vl_moe.api import Qwen3VL
    from qwen3vl_moe.checkpoints.validate import CheckpointError as CheckpointFileError

    broken = tmp_path / "broken"
    shutil.copytree(moe_dir, broken)
    [shard] = [p for p in broken.glob("*.safetensors") if "model.language_model.norm.weight" in load_file(str(p))]
    tensors = load_file(str(shard))
    del tensors["model.language_model.norm.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointFileError, match=rf"lists model\.language_model\.norm\.weight in {shard.name} but"):
        Qwen3VL(broken, devices="cpu", max_length=128, max_batch_size=1)


# ---------------------------------------------------------------------------
# Experts stored per expert: merged into transformers' fused layout


def _converted(directory: Path, **kwargs) -> dict:
    weights = load_weights(sorted(directory.glob("*.safetensors")))
    return convert_qwen3vl_model_state_dict(
        dict(weights.items()), huggingface_config=AutoConfig.from_pretrained(directory), **kwargs
    )


@pytest.mark.parametrize("storage_dtype", ["float32", "bfloat16"])
def test_per_expert_experts_merge_into_the_fused_tensors(storage_dtype):
    """gate then up along the rows, down stacked, stored in the hub layout: exactly the fused
    checkpoint's experts, in the dtype stored (bfloat16 kept under the CPU's float32 rule)."""
    from max.dtype import DType
    from qwen3vl_moe.checkpoints.convert import cached_conversion, write_bfloat16_checkpoint
    from qwen3vl_moe.weight_adapters import _bits

    fused, per_expert = tiny_checkpoint("moe"), tiny_checkpoint("moe", expert_storage="per_expert")
    kwargs = {}
    if storage_dtype == "bfloat16":
        fused, per_expert = (cached_conversion(d, "bf16", write_bfloat16_checkpoint) for d in (fused, per_expert))
        kwargs = {"dtype": DType.float32, "keep_bfloat16_matrices": True}
    want, got = _converted(fused, **kwargs), _converted(per_expert, **kwargs)
    assert set(got) == set(want)
    assert checkpoint_expert_layout(got, AutoConfig.from_pretrained(per_expert)) == "hub"
    for name, data in want.items():
        expected = _bits(data)
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            assert got[name].dtype == getattr(DType, storage_dtype), name
        assert got[name].dtype == data.dtype, name
        np.testing.assert_array_equal(_bits(got[name]), expected, err_msg=name)


def test_broken_per_expert_experts_are_named(tmp_path):
    tensors = load_all(tiny_checkpoint("moe", expert_storage="per_expert"))
    del tensors[EXPERTS + "5.up_proj.weight"]
    tensors[EXPERTS + "2.down_proj.weight"] = np.zeros((48, 64), np.float32)
    with pytest.raises(CheckpointError) as info:
        convert(tiny_checkpoint("moe", expert_storage="per_expert"), tensors, tmp_path)
    message = str(info.value)
    assert f"missing tensor {EXPERTS}5.up_proj.weight (expected shape [48, 64])" in message
    assert f"tensor {EXPERTS}2.down_proj.weight has shape [48, 64], expected [64, 48]" in message


def test_a_layer_with_both_expert_storages_is_refused(moe_dir, tmp_path):
    tensors = load_all(moe_dir)
    tensors[EXPERTS + "0.gate_proj.weight"] = np.zeros((48, 64), np.float32)
    with pytest.raises(CheckpointError) as info:
        convert(moe_dir, tensors, tmp_path)
    assert str(info.value).endswith(
        f"layer 0 stores its experts both fused ({EXPERTS}down_proj) and per expert "
        f"({EXPERTS}0.gate_proj.weight): a checkpoint holds each layer's experts one way or the other"
    )


@pytest.mark.parametrize("layout,storage_dtype", [("hub", "float32"), ("hub", "bfloat16"), ("transformers", "float32")])
def test_cpu_expert_panels(moe_dir, tmp_path, storage_dtype, layout):
    """cpu_expert_panels: every layer's experts, from either layout, in the CPU kernels'
    panels (element by element as cpu_moe.mojo indexes them), the rest unchanged."""
    from max.dtype import DType
    from qwen3vl_moe.checkpoints.convert import cached_conversion, write_bfloat16_checkpoint
    from qwen3vl_moe.kernels.moe import panel_shapes
    from qwen3vl_moe.weight_adapters import _bits

    directory = moe_dir if storage_dtype == "float32" else cached_conversion(moe_dir, "bf16", write_bfloat16_checkpoint)
    tensors = load_all(directory) if layout == "transformers" else None
    if tensors is not None:
        for name in list(tensors):
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                tensors[name] = np.ascontiguousarray(np.swapaxes(tensors[name], 1, 2))
        save_file(tensors, str(tmp_path / "model.safetensors"))
        directory_files = [tmp_path / "model.safetensors"]
    else:
        directory_files = sorted(directory.glob("*.safetensors"))
    kwargs = {"dtype": DType.float32, "keep_bfloat16_matrices": True}
    config = AutoConfig.from_pretrained(directory)
    plain = convert_qwen3vl_model_state_dict(dict(load_weights(directory_files).items()), huggingface_config=config, **kwargs)
    packed = convert_qwen3vl_model_state_dict(
        dict(load_weights(directory_files).items()), huggingface_config=config, cpu_expert_panels=True, **kwargs)
    assert checkpoint_expert_layout(packed, config) == "cpu_panels"
    assert set(packed) == set(plain)
    pairs = storage_dtype == "bfloat16"
    for name, data in plain.items():
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            np.testing.assert_array_equal(_bits(packed[name]), _bits(data), err_msg=name)
            continue
        assert packed[name].dtype == data.dtype == getattr(DType, storage_dtype)
        hub = _bits(data) if layout == "hub" else np.swapaxes(_bits(data), 1, 2)   # [E, K, groups*N]
        E, K, GN = hub.shape
        groups, width = (2, 32) if name.endswith("gate_up_proj") else (1, 64)
        N = GN // groups
        got = _bits(packed[name])
        shapes = panel_shapes(E, N if groups == 1 else K, K if groups == 1 else N, data.dtype)
        assert got.shape == shapes[0 if groups == 2 else 1]
        zero = np.zeros((), hub.dtype)
        for e, j, k, g, c in np.ndindex(min(E, 2), got.shape[1], K, groups, width):
            col = j * width + c
            want = hub[e, k, g * N + col] if col < N else zero
            at = got[e, j, k // 2, 2 * (g * width + c) + k % 2] if pairs else got[e, j, k, g * width + c]
            assert at == want, (name, e, j, k, g, c)
        if pairs and K % 2:   # the row past an odd K is 0
            assert not got[:, :, -1, 1::2].any()


@pytest.mark.parametrize("source", ["bfloat16", "float16"])
def test_widening_casts_are_exact(source):
    """The adapter's own float32 widening (no MAX cast graph) gives torch's values bit for bit,
    including infinities, subnormals and signed zeros (NaN stays NaN; payloads may differ)."""
    import torch
    from max.dtype import DType
    from max.graph.weights import WeightData
    from qwen3vl_moe.weight_adapters import _cast, _from_bits, _numpy

    bits = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)   # every 16-bit pattern
    dtype = getattr(DType, source)
    data = _from_bits(bits, dtype, "w") if source == "bfloat16" else WeightData.from_numpy(bits.view(np.float16), "w")
    wide = _cast(data, DType.float32)
    assert wide.dtype == DType.float32 and tuple(int(d) for d in wide.shape) == (256, 256) and wide.name == "w"
    want = torch.from_numpy(bits.view(np.int16)).view(getattr(torch, source)).float().numpy()
    got = _numpy(wide)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
