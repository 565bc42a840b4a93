"""bfloat16 checkpoints (as the releases store them) on CPU with no encoding flag.

The engine resolves float32 on CPU by itself: the text decoder's matrices stay
bfloat16 (the CPU kernels read them as they are and compute in float32), the
rest is upcast at load. The reference is transformers loaded in float32 from
the same bfloat16 files: both compute in float32 on identical values (bf16 ->
f32 is exact), so the float32 tolerance of tests/test_text_model.py applies
unchanged and 32 greedy tokens must be identical.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from max.dtype import DType

from reference import (
    assert_close_to_reference,
    compute_in_float32_layer_by_layer,
    reference_greedy,
    reference_logits,
)
from qwen3vl_moe.checkpoints.convert import bfloat16_checkpoint
from qwen3vl_moe.checkpoints.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits, read_safetensors
from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. What did the fox do?"}],
]
NEW_TOKENS = 32


def test_bf16_rounding_matches_torch():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * np.float32(7),
        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, 1e-40, -1e-40], dtype=np.float32),
        # Exact ties between two bfloat16 values, both parities of the kept bit.
        bf16_bits_to_float32(np.arange(0x3F80, 0x3F90, dtype=np.uint16)) + np.float32(2.0**-8),
    ])
    x = np.tile(x, 50)  # > 4M elements: the rounding works in blocks of 4M, and crosses a block boundary
    ours = float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(bf16_bits_to_float32(ours), torch.from_numpy(x).to(torch.bfloat16).float().numpy())


def test_bf16_copy_keeps_layout_and_rounds_every_float(tmp_path):
    src = tiny_checkpoint("moe")
    dst = bfloat16_checkpoint("moe")
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    src_files = sorted(p.name for p in src.iterdir())
    assert sorted(p.name for p in dst.iterdir()) == src_files
    for shard in sorted(p.name for p in src.glob("*.safetensors")):
        before, _ = read_safetensors(src / shard)
        after, _ = read_safetensors(dst / shard)
        assert set(before) == set(after)
        for name, t in before.items():
            assert after[name].dtype == "BF16", name
            want = torch.from_numpy(t.float32()).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(after[name].float32(), want, err_msg=name)


@pytest.fixture(scope="module")
def checkpoint():
    return bfloat16_checkpoint("moe")


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()


def test_layer_by_layer_float32_equals_loading_in_float32(checkpoint, reference, tmp_path):
    """The 235B-A22B test's reference (bfloat16 load, one layer in float32 at a time) is transformers' float32 model."""
    from transformers import AutoModelForImageTextToText

    bf16 = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    layers = bf16.model.language_model.layers
    compute_in_float32_layer_by_layer(bf16, layers, tmp_path)
    for ids in (list(range(3, 40)), [7]):  # twice: each layer is read back for every forward
        np.testing.assert_array_equal(reference_logits(bf16, ids), reference_logits(reference, ids))
    assert {p.device.type for p in layers.parameters()} == {"meta"}  # dropped after the forward
    outside = {p.dtype for n, p in bf16.named_parameters() if ".language_model.layers." not in n}
    assert outside == {torch.float32}


@pytest.fixture(scope="module")
def engine_and_log(checkpoint):
    """The engine with no encoding flag, and what it logged while loading."""
    from qwen3vl_moe.api import Qwen3VL

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("max.pipelines.qwen3vl_moe")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        engine = Qwen3VL(checkpoint, devices="cpu", max_length=512, max_batch_size=4, echo=True)
    finally:
        logger.removeHandler(handler)
    return engine, records


@pytest.mark.slow
def test_no_flag_resolves_float32_and_says_so(engine_and_log):
    engine, records = engine_and_log
    assert engine.pipeline_config.model.quantization_encoding == "float32"
    upcasts = [r for r in records if "bfloat16" in r and "float32" in r]
    assert len(upcasts) == 1, records
    assert "text-decoder matrices stay bfloat16" in upcasts[0], upcasts


@pytest.mark.slow
def test_text_matrices_stay_bfloat16(engine_and_log):
    """The decoder's matrices are bfloat16 graph weights (read as they are), the rest float32."""
    from qwen3vl_moe.max_compat import pipeline_model_of

    engine, _ = engine_and_log
    model = pipeline_model_of(engine.pipeline)
    assert model.model_args.text_weight_dtype == DType.bfloat16
    weights = model._language_weights_dict
    matrices = {n: w.dtype for n, w in weights.items() if len(w.shape) >= 2}
    assert matrices and set(matrices.values()) == {DType.bfloat16}, matrices
    assert {w.dtype for n, w in weights.items() if len(w.shape) < 2} == {DType.float32}


@pytest.mark.slow
def test_prefill_logits_match_transformers_float32(engine_and_log, reference):
    engine, _ = engine_and_log
    prompts = [out.prompt_token_ids for out in engine.generate(CONVERSATIONS, max_new_tokens=1)]
    for ids, got in zip(prompts, engine.prefill_logits(CONVERSATIONS), strict=True):
        assert_close_to_reference(got, reference_logits(reference, ids), f"prefill over {len(ids)} tokens")


@pytest.mark.slow
def test_greedy_matches_transformers_float32(engine_and_log, reference):
    engine, _ = engine_and_log
    [out] = engine.generate([CONVERSATIONS[1]], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == reference_greedy(reference, out.prompt_token_ids, NEW_TOKENS)
