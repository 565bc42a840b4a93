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
