"""The text model on CPU float32 against transformers, for each tiny preset.

One pipeline is compiled per preset (module-scoped): tens of seconds to minutes
cold on a 2-core machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reference import assert_close_to_reference, reference_greedy, reference_logits
from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

PRESETS = ["moe", "dense", "moe-sparse2"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. What did the fox do?"}],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours, then count to five, then say goodbye to everyone here."},
    ],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=PRESETS)
def preset(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(preset):
    return tiny_checkpoint(preset)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' model, float32, eager experts and sdpa attention (its defaults)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine(load_engine, checkpoint):
    return load_engine(checkpoint)


def test_prompt_tokens_match_transformers_chat_template(engine, checkpoint):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    for conv, out in zip(CONVERSATIONS, engine.generate(CONVERSATIONS, max_new_tokens=1)):
        expected = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)
        if hasattr(expected, "input_ids") or isinstance(expected, dict):
            expected = expected["input_ids"]
        assert out.prompt_token_ids == list(expected)


def test_prefill_logits_match_transformers(engine, reference):
    prompts = [out.prompt_token_ids for out in engine.generate(CONVERSATIONS, max_new_tokens=1)]
    ours = engine.prefill_logits(CONVERSATIONS)
    for ids, got in zip(prompts, ours, strict=True):
        assert_close_to_reference(got, reference_logits(reference, ids), f"prefill over {len(ids)} tokens")


def test_greedy_continuation_matches_transformers(engine, reference):
    [out] = engine.generate([CONVERSATIONS[1]], max_new_tokens=NEW_TOKENS, ignore_eos=True, output_logits=True)
    expected = reference_greedy(reference, out.prompt_token_ids, NEW_TOKENS)
    assert out.token_ids == expected
    # The decode steps' logits (KV cache path) match too, not only their argmax.
    seq = out.prompt_token_ids + out.token_ids
    ref = reference_logits(reference, seq)
    n = len(out.prompt_token_ids)
    for step, got in enumerate(out.logits):
        assert_close_to_reference(got.reshape(-1), ref[n - 1 + step], f"decode step {step}")


def test_batched_equals_one_at_a_time(engine):
    batched = engine.generate(CONVERSATIONS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for conv, together in zip(CONVERSATIONS, batched, strict=True):
        [alone] = engine.generate([conv], max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert together.token_ids == alone.token_ids
        assert len(together.token_ids) == NEW_TOKENS


def test_sampling_is_seeded_and_varies(engine):
    a = engine.generate([CONVERSATIONS[0]], max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)[0]
    b = engine.generate([CONVERSATIONS[0]], max_new_tokens=16, temperature=1.0, seed=7, ignore_eos=True)[0]
    c = engine.generate([CONVERSATIONS[0]], max_new_tokens=16, temperature=1.0, seed=8, ignore_eos=True)[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_per_expert_checkpoint_computes_what_the_fused_one_does(load_engine):
    """Experts stored per expert (as Qwen's FP8 releases store them) are merged at load into the
    hub's fused layout: the same graph as the fused checkpoint's and the same weights
    (test_weight_adapter), so the same logits to the last bit, and greedy tokens identical to
    transformers on the fused files."""
    from transformers import AutoModelForImageTextToText

    fused = load_engine(tiny_checkpoint("moe"))
    per_expert = load_engine(tiny_checkpoint("moe", expert_storage="per_expert"))
    for ours, theirs in zip(per_expert.prefill_logits(CONVERSATIONS), fused.prefill_logits(CONVERSATIONS), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    reference = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("moe"), dtype=torch.float32).eval()
    [out] = per_expert.generate([CONVERSATIONS[1]], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == reference_greedy(reference, out.prompt_token_ids, NEW_TOKENS)


def test_bfloat16_kv_cache_matches_transformers_with_rounded_keys_and_values(load_engine, monkeypatch):
    """``kv_cache_format="bfloat16"`` (MAX's option) on a float32 model: the cache holds
    bfloat16 (half the bytes a token) and every attention, the fresh prefill's and each
    decode step's over the cache, sees k/v rounded to bfloat16. transformers' float32
    model with its attention inputs k and v rounded the same way is the reference:
    prefill logits within the float32 tolerance, greedy tokens identical."""
    import transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe as modeling
    from transformers import AutoModelForImageTextToText
    from max.dtype import DType

    from conftest import ENGINE_SETTINGS
    from qwen3vl_moe.api import Qwen3VL
    from qwen3vl_moe.max_compat import pipeline_model_of

    engine = Qwen3VL(tiny_checkpoint("moe"), devices="cpu", kv_cache_format="bfloat16", **ENGINE_SETTINGS)
    assert pipeline_model_of(engine.pipeline).kv_params.dtype == DType.bfloat16
    eager = modeling.eager_attention_forward

    def rounded_kv(module, query, key, value, *args, **kwargs):
        return eager(module, query, key.to(torch.bfloat16).float(), value.to(torch.bfloat16).float(), *args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", rounded_kv)
    reference = AutoModelForImageTextToText.from_pretrained(
        tiny_checkpoint("moe"), dtype=torch.float32, attn_implementation="eager").eval()
    outs = engine.generate(CONVERSATIONS, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    for out, logits in zip(outs, engine.prefill_logits(CONVERSATIONS), strict=True):
        assert out.token_ids == reference_greedy(reference, out.prompt_token_ids, NEW_TOKENS)
        # A k or v element that float32 summation order moves by an ulp can round to the
        # neighbouring bfloat16 (2**-8 relative), so the float32 tolerance (1e-4) becomes
        # 1e-3 here, which still tells the rounding apart (below).
        ref = reference_logits(reference, out.prompt_token_ids)
        assert float(np.abs(logits - ref).max()) <= 1e-3 * max(1.0, float(np.abs(ref).max()))
    exact = load_engine(tiny_checkpoint("moe")).prefill_logits(CONVERSATIONS[:1])[0]
    rounded = engine.prefill_logits(CONVERSATIONS[:1])[0]
    assert np.abs(rounded - exact).max() > 1e-3 * max(1.0, np.abs(exact).max())  # beyond the tolerance above
