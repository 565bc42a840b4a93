"""Fine-grained FP8 checkpoints: the numpy quantizer, the loader's dequantization, the model on CPU.

References: torch's float8_e4m3fn cast; transformers 5.12.1's own
``Fp8Quantize`` / ``Fp8Dequantize`` ops where their block handling applies
(dims that are multiples of the block, or one block); a torch formula with
ragged edge blocks elsewhere. transformers cannot load these checkpoints here
(its FP8 quantizer needs ``accelerate``, which is not a dependency), so the
whole-model reference is transformers in float32 loaded from the torch
formula's dequantized weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from max.graph.weights import load_weights
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from kernel_harness import hypothesis_settings
from reference import assert_close_to_reference, reference_greedy, reference_logits
from qwen3vl_moe.checkpoints.fp8 import (
    _TABLE,
    dequantize_blockwise,
    e4m3fn_to_float32,
    float32_to_e4m3fn,
    fp8_checkpoint,
    is_not_converted,
    quantize_blockwise,
)
from qwen3vl_moe.weight_adapters import CheckpointError, convert_qwen3vl_model_state_dict, graph_name

NEW_TOKENS = 32
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. What did the fox do?"}],
]


def torch_dequantize(bits: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    """The reference formula: fp8 value times its block's scale_inv, edge blocks ragged."""
    rows, cols = bits.shape[-2:]
    s = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :rows, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :cols]
    return bits.view(torch.float8_e4m3fn).float() * s


def transformers_fp8_ops():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    quantizer = SimpleNamespace(quantization_config=SimpleNamespace(weight_block_size=(128, 128), scale_fmt="float"))
    return Fp8Quantize(quantizer), Fp8Dequantize(quantizer)


# ---------------------------------------------------------------------------
# The numpy quantizer


def test_e4m3fn_table_matches_torch():
    theirs = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(_TABLE, theirs)


def test_cast_matches_torch_including_ties_and_subnormals():
    rng = np.random.default_rng(0)
    finite = _TABLE[:0x7F].astype(np.float64)
    midpoints = ((finite[:-1] + finite[1:]) / 2).astype(np.float32)  # exact ties, both parities
    x = np.concatenate([
        np.clip(rng.standard_normal(200_000).astype(np.float32) * np.float32(60), -448, 448),
        rng.uniform(-2.0**-6, 2.0**-6, 10_000).astype(np.float32),  # subnormal range
        midpoints, -midpoints,
        np.nextafter(midpoints, np.float32(0)), np.nextafter(midpoints, np.float32(np.inf)),
        np.float32([0.0, -0.0, 448.0, -448.0, 2.0**-10, -(2.0**-10), 1e-30]),
    ])
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(float32_to_e4m3fn(x), theirs)
    np.testing.assert_array_equal(e4m3fn_to_float32(float32_to_e4m3fn(x)), torch.from_numpy(x).to(torch.float8_e4m3fn).float().numpy())
    with pytest.raises(ValueError, match="clamped"):
        float32_to_e4m3fn(np.float32([449.0]))


@pytest.mark.parametrize("shape", [(256, 384), (3, 128, 256), (64, 96), (8, 48, 64)])
def test_quantize_matches_transformers_fp8quantize(shape):
    """Where transformers' op applies (dims divisible by the block, or a single block)."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 10, shape[:-2] + (1, 1))).astype(np.float32)
    w[..., :5, :7] = 0.0
    quantize, dequantize = transformers_fp8_ops()
    bits, scale_inv = quantize_blockwise(w)
    if shape[-2] % 128 == 0 and shape[-1] % 128 == 0:
        out = quantize._quantize_one("x.weight", torch.from_numpy(w))
        np.testing.assert_array_equal(bits, out["x.weight"].view(torch.uint8).numpy())
        np.testing.assert_array_equal(scale_inv, out["x.weight_scale_inv"].numpy())
    # transformers' dequantizer derives the block from the scale grid: right for these shapes.
    theirs = dequantize._dequantize_one(torch.from_numpy(bits).view(torch.float8_e4m3fn), torch.from_numpy(scale_inv),
                                        output_dtype=torch.float32)
    np.testing.assert_array_equal(dequantize_blockwise(bits, scale_inv), theirs.numpy())


@pytest.mark.parametrize("shape", [(432, 144), (2, 200, 300), (129, 1)])
def test_ragged_blocks_match_reference_formula(shape):
    rng = np.random.default_rng(2)
    w = rng.standard_normal(shape).astype(np.float32)
    bits, scale_inv = quantize_blockwise(w)
    grid = (math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
    assert scale_inv.shape == (*shape[:-2], *grid)
    # Each block's scale is 448 / its own amax (the ragged block's too), so its amax lands on +-448.
    padded = np.zeros((*shape[:-2], grid[0] * 128, grid[1] * 128), np.float32)
    padded[..., : shape[-2], : shape[-1]] = w
    amax = np.abs(padded.reshape(*shape[:-2], grid[0], 128, grid[1], 128)).max(axis=(-3, -1))
    scale = torch.tensor(448.0) * (1.0 / torch.from_numpy(amax))  # transformers' 448 / amax, as torch computes it
    np.testing.assert_array_equal(scale_inv, (1.0 / scale).numpy())
    ours = dequantize_blockwise(bits, scale_inv)
    ref = torch_dequantize(torch.from_numpy(bits), torch.from_numpy(scale_inv)).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert np.abs(ours - w).max() <= np.abs(w).max() / 16  # 3 mantissa bits
    with pytest.raises(ValueError, match="expected"):
        dequantize_blockwise(bits, np.concatenate([scale_inv, scale_inv[..., :1, :]], axis=-2))


def test_modules_to_not_convert_rule_is_transformers():
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = ["lm_head", "model.visual", "mlp.gate"]
    for name in [
        "lm_head.weight", "model.visual.blocks.0.attn.qkv.weight", "model.language_model.layers.3.mlp.gate.weight",
        "model.language_model.layers.3.mlp.gate_proj.weight", "model.language_model.layers.0.mlp.experts.gate_up_proj",
        "model.language_model.layers.0.self_attn.q_proj.weight",
    ]:
        module = name.rsplit(".", 1)[0]
        assert is_not_converted(name, skip) == (not should_convert_module(module, skip)), name


# ---------------------------------------------------------------------------
# The checkpoint and the loader


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return fp8_checkpoint("moe")


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors |= load_file(str(shard))
    return tensors


def reference_float32(directory: Path) -> dict[str, torch.Tensor]:
    """Every weight of an FP8 checkpoint in float32, by the torch formula."""
    block = json.loads((directory / "config.json").read_text())["quantization_config"]["weight_block_size"]
    tensors = file_tensors(directory)
    out = {}
    for name, t in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            out[name] = torch_dequantize(t.view(torch.uint8), tensors[name + "_scale_inv"], block)
        else:
            out[name] = t.float()
    return out


def test_checkpoint_quantizes_what_the_config_says(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    q = config["quantization_config"]
    assert (q["quant_method"], q["fmt"], q["activation_scheme"], q["weight_block_size"]) == ("fp8", "e4m3", "dynamic", [128, 128])
    tensors = file_tensors(checkpoint)
    fp8 = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert any("experts.gate_up_proj" in n for n in fp8) and any("self_attn.q_proj" in n for n in fp8)
    for name in fp8:
        assert not is_not_converted(name, q["modules_to_not_convert"]), name
        assert tensors[name + "_scale_inv"].dtype == torch.float32
    for name, t in tensors.items():
        if name not in fp8 and not name.endswith("_scale_inv"):
            assert t.dtype == torch.bfloat16, name


def test_adapter_dequantizes_like_the_reference(checkpoint):
    weights = load_weights(sorted(checkpoint.glob("*.safetensors")))
    from max.dtype import DType

    got = convert_qwen3vl_model_state_dict(dict(weights.items()), huggingface_config=AutoConfig.from_pretrained(checkpoint),
                                           dtype=DType.float32)
    ref = reference_float32(checkpoint)
    assert set(got) == {graph_name(n) for n in ref}
    for name, want in ref.items():
        value = np.from_dlpack(got[graph_name(name)].data)
        if name.endswith("patch_embed.proj.weight"):
            want = want.reshape(want.shape[0], -1)
        np.testing.assert_array_equal(value, want.numpy(), err_msg=name)


def _broken_copy(checkpoint: Path, tmp: Path, edit) -> Path:
    shutil.copytree(checkpoint, tmp, dirs_exist_ok=True)
    for shard in sorted(tmp.glob("*.safetensors")):
        tensors = load_file(str(shard))
        edit(tensors)
        save_file(tensors, str(shard))
    return tmp


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.language_model.layers.0.self_attn.q_proj.weight_scale_inv", None),
     "model.language_model.layers.0.self_attn.q_proj.weight is float8_e4m3fn but "
     "model.language_model.layers.0.self_attn.q_proj.weight_scale_inv is missing"),
    (lambda t: t.update({k: v[:1] for k, v in t.items() if k == "model.language_model.layers.1.self_attn.q_proj.weight_scale_inv"}),
     "tensor model.language_model.layers.1.self_attn.q_proj.weight_scale_inv: weight_scale_inv has shape [1, 1], expected [4, 1]"),
    (lambda t: t.update({k: v.float().to(torch.float8_e4m3fn) for k, v in t.items() if k == "lm_head.weight"}),
     "tensor lm_head.weight is float8_e4m3fn but config.json's quantization_config.modules_to_not_convert"),
])
def test_adapter_names_what_is_wrong(checkpoint, tmp_path, edit, message):
    broken = _broken_copy(checkpoint, tmp_path, edit)
    weights = load_weights(sorted(broken.glob("*.safetensors")))
    with pytest.raises(CheckpointError) as info:
        convert_qwen3vl_model_state_dict(dict(weights.items()), huggingface_config=AutoConfig.from_pretrained(broken))
    assert message in str(info.value)


# ---------------------------------------------------------------------------
# The whole model on CPU, no encoding flag


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory):
    """transformers in float32 on the torch formula's dequantized weights."""
    from transformers import AutoModelForImageTextToText

    directory = tmp_path_factory.mktemp("fp8-dequantized")
    for item in checkpoint.iterdir():
        if item.suffix != ".safetensors" and item.name != "model.safetensors.index.json":
            shutil.copyfile(item, directory / item.name)
    config = json.loads((checkpoint / "config.json").read_text())
    del config["quantization_config"]
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in reference_float32(checkpoint).items()}, str(directory / "model.safetensors"))
    return AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(checkpoint):
    from qwen3vl_moe.api import Qwen3VL

    return Qwen3VL(checkpoint, devices="cpu", max_length=512, max_batch_size=4, echo=True)


@pytest.mark.slow
def test_fp8_prefill_logits_match_dequantized_reference(engine, reference):
    assert engine.pipeline_config.model.quantization_encoding == "float32"
    prompts = [out.prompt_token_ids for out in engine.generate(CONVERSATIONS, max_new_tokens=1)]
    for ids, got in zip(prompts, engine.prefill_logits(CONVERSATIONS), strict=True):
        assert_close_to_reference(got, reference_logits(reference, ids), f"prefill over {len(ids)} tokens")


@pytest.mark.slow
def test_fp8_greedy_matches_dequantized_reference(engine, reference):
    [out] = engine.generate([CONVERSATIONS[1]], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == reference_greedy(reference, out.prompt_token_ids, NEW_TOKENS)


# ---------------------------------------------------------------------------
# Experts stored per expert, as Qwen's FP8 releases store them


@pytest.fixture(scope="module")
def per_expert_checkpoint() -> Path:
    return fp8_checkpoint("moe", expert_storage="per_expert")


def test_per_expert_weights_are_quantized_with_their_own_scales(per_expert_checkpoint):
    from qwen3vl_moe.checkpoints.validate import checkpoint_problems

    tensors = file_tensors(per_expert_checkpoint)
    expert = "model.language_model.layers.0.mlp.experts.3."
    for proj, shape in (("gate_proj", (48, 64)), ("up_proj", (48, 64)), ("down_proj", (64, 48))):
        assert tensors[f"{expert}{proj}.weight"].dtype == torch.float8_e4m3fn
        assert tuple(tensors[f"{expert}{proj}.weight"].shape) == shape
        assert tuple(tensors[f"{expert}{proj}.weight_scale_inv"].shape) == (1, 1)
    assert not any(n.endswith(("gate_up_proj", "down_proj")) for n in tensors)
    assert checkpoint_problems(per_expert_checkpoint) == []


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_adapter_dequantizes_per_expert_then_merges(per_expert_checkpoint, tmp_path, scale_dtype):
    """CPU: each expert by the torch formula, then merged as transformers merges Qwen3-MoE
    experts: gate and up concatenated along the rows, experts stacked. Releases store float32
    or bfloat16 scales."""
    from max.dtype import DType

    directory = _broken_copy(per_expert_checkpoint, tmp_path, lambda t: t.update(
        {k: v.to(scale_dtype) for k, v in t.items() if k.endswith("_scale_inv")}))
    weights = load_weights(sorted(directory.glob("*.safetensors")))
    got = convert_qwen3vl_model_state_dict(dict(weights.items()), huggingface_config=AutoConfig.from_pretrained(directory),
                                           dtype=DType.float32)
    ref = reference_float32(directory)
    from qwen3vl_moe.checkpoints.layout import expert_storage_of

    layers = {expert_storage_of(n)[0] for n in ref if expert_storage_of(n)}
    assert len(layers) > 1
    for layer in layers:
        p = f"model.language_model.layers.{layer}.mlp.experts."
        experts = range(AutoConfig.from_pretrained(directory).text_config.num_experts)
        gate_up = torch.stack([torch.cat([ref[f"{p}{e}.gate_proj.weight"], ref[f"{p}{e}.up_proj.weight"]]) for e in experts])
        down = torch.stack([ref[f"{p}{e}.down_proj.weight"] for e in experts])
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # stored in the hub layout
        for part, want in (("gate_up_proj", gate_up), ("down_proj", down)):
            np.testing.assert_array_equal(np.from_dlpack(got[graph_name(p + part)].data), want.numpy())
    assert not any(".experts.0." in n for n in got)


def test_gpu_encoding_merges_float8_bits_and_scales_as_the_fused_release():
    """float8_e4m3fn (GPU): whole-block per-expert experts stay float8, merged with their block
    scales into the [E, 2I, H] / [E, H, I] tensors MAX's grouped FP8 matmul takes, bit for bit
    what the fused FP8 checkpoint of the same draw gives (a 128x128 block never straddles two
    experts or gate and up when I and H are whole blocks)."""
    from max.dtype import DType
    from qwen3vl_moe.checkpoints.fp8 import fp8_blocks_checkpoint
    from qwen3vl_moe.weight_adapters import _bits

    def convert(directory):
        weights = load_weights(sorted(directory.glob("*.safetensors")))
        return convert_qwen3vl_model_state_dict(
            dict(weights.items()), huggingface_config=AutoConfig.from_pretrained(directory), dtype=DType.float8_e4m3fn)

    fused, per_expert = convert(fp8_blocks_checkpoint()), convert(fp8_blocks_checkpoint(expert_storage="per_expert"))
    assert set(per_expert) == set(fused)
    assert per_expert["language_model.layers.0.mlp.experts.gate_up_proj"].dtype == DType.float8_e4m3fn
    for name, data in fused.items():
        assert per_expert[name].dtype == data.dtype, name
        np.testing.assert_array_equal(_bits(per_expert[name]), _bits(data), err_msg=name)


@hypothesis_settings()
@given(experts=st.integers(1, 3), inter=st.sampled_from([128, 256]), hidden=st.sampled_from([128, 384]),
       seed=st.integers(0, 2**16))
def test_merged_expert_blocks_equal_the_fused_tensor_quantized(experts, inter, hidden, seed):
    from qwen3vl_moe.weight_adapters import _merge_gate_up

    rng = np.random.default_rng(seed)
    gate_up = (rng.standard_normal((experts, 2 * inter, hidden)) * rng.uniform(0.01, 10, (experts, 1, 1))).astype(np.float32)
    down = rng.standard_normal((experts, hidden, inter)).astype(np.float32)
    gates = [quantize_blockwise(w[:inter]) for w in gate_up]
    ups = [quantize_blockwise(w[inter:]) for w in gate_up]
    for fused, parts in (
        (quantize_blockwise(gate_up), [_merge_gate_up([g[i] for g in gates], [u[i] for u in ups]) for i in (0, 1)]),
        (quantize_blockwise(down), [np.stack([quantize_blockwise(w)[i] for w in down]) for i in (0, 1)]),
    ):
        np.testing.assert_array_equal(parts[0], fused[0])
        np.testing.assert_array_equal(parts[1], fused[1])
