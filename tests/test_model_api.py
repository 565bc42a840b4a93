"""The seed's documented ``Qwen3VLModel`` API, which MAX 26.7 renamed or dropped.

``prepare_next_token_inputs`` must build what MAX's own batch processor
builds for the decode step (tokens, row offsets, 3-D positions relative to the
KV cache, including a row whose image shifts its positions); ``load_model`` returns the two
compiled graphs; ``calculate_max_seq_len`` bounds by the checkpoint;
``estimate_activation_memory`` is tested in test_memory_estimate.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint
from media import ONE_IMAGE

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(load_engine):
    return load_engine(tiny_checkpoint("moe"))


@pytest.fixture(scope="module")
def model(engine):
    from qwen3vl_moe.max_compat import pipeline_model_of

    return pipeline_model_of(engine.pipeline)


def host(buffer) -> np.ndarray:
    from max.driver import CPU

    return buffer.to(CPU()).to_numpy().copy()


def test_prepare_next_token_inputs_equals_the_batch_processors_decode_step(engine, model):
    steps = []
    execute = model.execute

    def recording(model_inputs):
        steps.append((model_inputs, *(host(b) for b in (
            model_inputs.tokens, model_inputs.input_row_offsets[0], model_inputs.decoder_position_ids))))
        return execute(model_inputs)

    model.execute = recording
    try:
        text = [{"role": "user", "content": "Tell me about lighthouses."}]
        engine.generate([ONE_IMAGE, text], max_new_tokens=3, ignore_eos=True)
    finally:
        del model.execute
    (prefill, *_), (decode, tokens, offsets, positions) = steps[0], steps[1]
    assert prefill.has_vision_inputs and not decode.has_vision_inputs

    mine = model.prepare_next_token_inputs(decode.tokens, prefill)
    np.testing.assert_array_equal(host(mine.tokens), tokens)
    np.testing.assert_array_equal(host(mine.input_row_offsets[0]), offsets)
    np.testing.assert_array_equal(host(mine.decoder_position_ids), positions)
    # Positions are relative to the cache, which holds each row's prompt at the first decode step: the
    # image row's next position is not its prompt length (its image shifted it), the text row's is.
    prompt_lengths = np.diff(host(prefill.input_row_offsets[0]))
    absolute = positions + prompt_lengths
    assert absolute[0, 0] != prompt_lengths[0] and absolute[0, 1] == prompt_lengths[1]


def test_prepare_next_token_inputs_refuses_a_wrong_row_count(engine, model):
    from max.driver import Buffer

    steps = []
    execute = model.execute
    model.execute = lambda model_inputs: (steps.append(model_inputs), execute(model_inputs))[1]
    try:
        engine.generate([[{"role": "user", "content": "hi"}]], max_new_tokens=1)
    finally:
        del model.execute
    with pytest.raises(ValueError, match="2 rows; the previous step had 1"):
        model.prepare_next_token_inputs(Buffer.from_numpy(np.zeros(2, np.int64)), steps[0])


def test_load_model_returns_the_vision_and_language_graphs(model):
    from max.engine import InferenceSession

    vision, language = model.load_model(InferenceSession(devices=model.devices))
    assert [t.name for t in vision.input_metadata] == [t.name for t in model.vision_model.input_metadata]
    assert [t.name for t in language.input_metadata] == [t.name for t in model.language_model.input_metadata]


def test_calculate_max_seq_len_bounds_by_the_checkpoint(engine, model):
    config = engine.pipeline_config
    hf = config.model.huggingface_config
    assert model.calculate_max_seq_len(config, hf) == 1024
    too_long = config.model.model_copy(update={"max_length": hf.text_config.max_position_embeddings + 1})
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.calculate_max_seq_len(SimpleNamespace(model=too_long), hf)
