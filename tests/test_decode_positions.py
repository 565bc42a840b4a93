"""Decode positions are built in the graph from the KV cache lengths.

The decoder graph takes each token's 3-D position relative to its sequence's
KV cache length and adds the cache length itself, so that a decode step's
position input (each row's rope delta) stays the same from step to step and
needs no host-to-device copy (issue 16 item 3). These tests check the
graph's sum on ragged batches (prefill rows of several tokens, empty-cache
rows, a row with no tokens, rope deltas) and that the batch processor's
decode inputs are reused buffers while the batch is unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # compiles one small graph


@pytest.fixture(scope="module")
def positions_model():
    from max.driver import CPU
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    from qwen3vl_moe.nn.rotary import absolute_positions

    cpu = DeviceRef.CPU()
    graph = Graph(
        "absolute_positions",
        lambda rel, cache, offsets: absolute_positions(rel.tensor, cache.tensor, offsets.tensor),
        input_types=[
            TensorType(DType.int64, [3, "tokens"], cpu),
            TensorType(DType.uint32, ["batch"], cpu),
            TensorType(DType.uint32, ["rows"], cpu),
        ],
    )
    return InferenceSession(devices=[CPU()]).load(graph)


def run(model, relative, cache_lengths, lengths):
    from max.driver import Buffer

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.uint32)
    (out,) = model.execute(
        Buffer.from_numpy(np.ascontiguousarray(relative, dtype=np.int64)),
        Buffer.from_numpy(np.asarray(cache_lengths, dtype=np.uint32)),
        Buffer.from_numpy(offsets),
    )
    return out.to_numpy()


def test_decode_rows_add_their_cache_length(positions_model):
    deltas = np.array([0, -37, 5, 0])
    cache = np.array([12, 300, 1, 0])
    relative = np.broadcast_to(deltas, (3, 4))
    np.testing.assert_array_equal(run(positions_model, relative, cache, [1, 1, 1, 1]), relative + cache)


@pytest.mark.parametrize("seed", range(5))
def test_ragged_rows_add_their_own_cache_length(positions_model, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 7, size=rng.integers(1, 9))
    lengths[rng.integers(len(lengths))] += 1  # at least one token
    cache = rng.integers(0, 1000, size=len(lengths))
    relative = rng.integers(-500, 500, size=(3, int(lengths.sum())))
    expected = relative + np.repeat(cache, lengths)
    np.testing.assert_array_equal(run(positions_model, relative, cache, lengths), expected)


def test_decode_inputs_are_reused_while_the_batch_is_unchanged():
    """The decode shortcut copies only the tokens; positions change only with the batch's rope deltas."""
    from max.driver import CPU

    from qwen3vl_moe.max_compat import Qwen3VLBatchProcessor

    processor = Qwen3VLBatchProcessor.__new__(Qwen3VLBatchProcessor)
    processor._decode_step_buffers = {}
    processor._decode_positions = None
    processor.runtime = SimpleNamespace(devices=[CPU()], signal_buffers=[])
    processor._mrope_section_length = lambda: 3
    processor.empty_image_token_indices = lambda: []

    def context(delta, processed):
        tokens = SimpleNamespace(active=np.array([7], np.int64), active_length=1, processed_length=processed)
        return SimpleNamespace(needs_vision_encoding=False, tokens=tokens, rope_delta=delta)

    kv = object()
    first = processor.prepare_initial_token_inputs([[context(-4, 10), context(0, 3)]], kv)
    second = processor.prepare_initial_token_inputs([[context(-4, 11), context(0, 4)]], kv)
    assert second.decoder_position_ids is first.decoder_position_ids
    assert second.input_row_offsets is first.input_row_offsets
    np.testing.assert_array_equal(first.decoder_position_ids.to_numpy(), [[-4, 0]] * 3)
    other = processor.prepare_initial_token_inputs([[context(-4, 12), context(2, 5)]], kv)
    np.testing.assert_array_equal(other.decoder_position_ids.to_numpy(), [[-4, 2]] * 3)


def test_the_model_builds_its_inputs_with_this_packages_batch_processor():
    """Whatever registered last: `max serve`'s model worker builds the model without re-registering it."""
    from max.pipelines.architectures.qwen3vl_moe.arch import qwen3vl_moe_arch as builtin  # binds MAX's processor

    from qwen3vl_moe.arch import qwen3vl_moe_arch
    from qwen3vl_moe.max_compat import Qwen3VLBatchProcessor
    from qwen3vl_moe.model import Qwen3VLModel

    assert builtin.pipeline_model.batch_processor_cls is not Qwen3VLBatchProcessor
    assert Qwen3VLModel.batch_processor_cls is qwen3vl_moe_arch.batching is Qwen3VLBatchProcessor
