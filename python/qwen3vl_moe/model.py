"""The Qwen3-VL pipeline model: loads weights, compiles graphs, runs steps.

It keeps the public surface of MAX's built-in ``Qwen3VLModel`` (same inputs,
same contract with the built-in batch processor and tokenizer) and replaces
what cannot run on CPU or loses precision there: the graphs are this
package's, the weights keep the checkpoint's float32 when asked to, and the
expert layout is checked rather than assumed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any, ClassVar

import numpy as np
from max import tree
from max.driver import CPU, Buffer
from max.engine import InferenceSession, Model
from max.graph.weights import WeightData
from max.nn.layer import Module
from max.pipelines.lib import ModelInputs, ModelOutputs
from max.pipelines.lib.graph_specs import GraphRole, GraphSpec

from .cpu_threads import place_cpu_workers
from .kernels import kernel_extension
from .max_compat import (
    BuiltinQwen3VLModel,
    GroupMemberSpec,
    Qwen3VLBatchProcessor,
    Qwen3VLInputs,
    Qwen3VLMoeBatchProcessor,
    fail_batch_on_execute_error,
)
from .memory import estimate_activation_memory
from .model_config import ModelArgs, Qwen3VLConfig
from .nn.text_decoder import Qwen3VLTextDecoder
from .nn.vision import Qwen3VLVisionEncoder
from .weight_adapters import checkpoint_expert_layout, convert_qwen3vl_model_state_dict, text_matrix_dtype

__all__ = ["Qwen3VLInputs", "Qwen3VLModel"]

_COMPILE_GROUP = "qwen3vl_moe"

# The start-up progress lines go to MAX's logger tree, which `max serve` shows.
_logger = logging.getLogger("max.pipelines.qwen3vl_moe")
_STILL_COMPILING_EVERY_S = 30.0


@contextmanager
def _compile_progress(devices: str) -> Iterator[None]:
    """Logs a line before the graphs load, one every 30 s while they compile, and the time it took.

    Whether MAX's cache holds the graphs is only known once it compiles, so
    the first line says both cases; the 30 s reminders come only from a real
    compile (a cached load takes seconds).
    """
    _logger.info("loading the Qwen3-VL graphs for %s: the first load with this model and these settings compiles "
                 "them (minutes on a CPU), later loads take them from MAX's cache ...", devices)
    start = time.perf_counter()
    done = threading.Event()

    def remind() -> None:
        while not done.wait(_STILL_COMPILING_EVERY_S):
            _logger.info("... still compiling the Qwen3-VL graphs (%.0f s so far; cached afterwards)",
                         time.perf_counter() - start)

    reminder = threading.Thread(target=remind, name="qwen3vl-compile-progress", daemon=True)
    reminder.start()
    try:
        yield
    finally:
        done.set()
        reminder.join()
    _logger.info("Qwen3-VL graphs for %s ready in %.1f s", devices, time.perf_counter() - start)


class Qwen3VLGraphs(Module):
    """Holds the graph modules under the names their weights carry."""

    def __init__(self, vision_encoder: Qwen3VLVisionEncoder, language_model: Qwen3VLTextDecoder) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.language_model = language_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Qwen3VLGraphs is a container; trace its graph modules instead")


class Qwen3VLModel(BuiltinQwen3VLModel):
    """Qwen3-VL (MoE or dense) on MAX, CPU and GPU."""

    model_config_cls: ClassVar[type[Any]] = Qwen3VLConfig
    # MAX binds an architecture's ``batching`` onto its pipeline model class when the registry
    # registers it (``arch_lookup._bind_batch_processor``); `max serve`'s model worker builds the
    # model without that registration, and the class would inherit the built-in's binding (MAX's
    # batch processor, absolute CPU positions) from ``BuiltinQwen3VLModel``. The graphs need this one.
    batch_processor_cls: ClassVar[type[Any]] = Qwen3VLBatchProcessor

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if all(device.is_host for device in self.devices):
            # MAX's spinning CPU workers otherwise steal time slices from the
            # thread that drives each step, and stack on one core beside an
            # outside busy process (see cpu_threads).
            place_cpu_workers()

    @cached_property
    def signal_buffers(self) -> list[Buffer]:
        """MAX's allreduce signal buffers, one per GPU, when the decoder is tensor parallel.

        None on one device, whose graphs never all-reduce (the built-in
        allocates them always, which crashes on CPU).
        """
        return super().signal_buffers if len(self.devices) > 1 else []

    @classmethod
    def estimate_activation_memory(cls, pipeline_config: Any, huggingface_config: Any) -> int:
        """Activation bytes of the largest step the pipeline admits (what the memory planner reserves)."""
        return estimate_activation_memory(pipeline_config, huggingface_config)

    @classmethod
    def calculate_max_seq_len(cls, pipeline_config: Any, huggingface_config: Any) -> int:
        """The resolved maximum sequence length (the seed API's signature; MAX 26.7 asks the config class)."""
        return Qwen3VLConfig.calculate_max_seq_len(huggingface_config, pipeline_config.model)

    def load_graphs(self, session: InferenceSession) -> dict[str, Model]:
        """MAX's load (weights, then the graphs compiled or taken from its cache), with progress lines."""
        devices = ", ".join(sorted({"cpu" if device.is_host else f"gpu:{device.id}" for device in self.devices}))
        with _compile_progress(devices):
            return super().load_graphs(session)

    def load_model(self, session: InferenceSession) -> tuple[Model, Model]:
        """(vision_model, language_model), compiled (or loaded from MAX's cache) in ``session``."""
        models = self.load_graphs(session)
        return models[GraphRole.VISION], models[GraphRole.DECODER]

    def prepare_next_token_inputs(self, next_tokens: Buffer, prev_model_inputs: ModelInputs) -> Qwen3VLInputs:
        """Inputs of the decode step after ``prev_model_inputs``: one token per row.

        Each row's new token sits one past the largest 3-D position of its
        row's last step, in all three sections, as MAX's batch processor and
        transformers place text after text or images. Positions are relative
        to the row's KV cache length (see ``Qwen3VLBatchProcessor``), which
        grows by the row's tokens of the previous step, so the new relative
        position is the last token's largest one + 1 - that step's length of
        the row. The KV cache inputs are the previous step's: the caller
        advances them through its KV cache manager (in MAX 26.7 the batch
        processor builds decode inputs; this keeps the seed API's single-step
        helper).
        """
        assert isinstance(prev_model_inputs, Qwen3VLInputs)
        host = CPU()
        offsets = prev_model_inputs.input_row_offsets[0].to(host).to_numpy().astype(np.int64)
        positions = prev_model_inputs.decoder_position_ids.to(host).to_numpy()
        batch = len(offsets) - 1
        if int(next_tokens.shape[0]) != batch:
            raise ValueError(f"next_tokens has {next_tokens.shape[0]} rows; the previous step had {batch}")
        following = positions[:, offsets[1:] - 1].max(axis=0) + 1 - np.diff(offsets)
        row_offsets = Buffer.from_numpy(np.arange(batch + 1, dtype=np.uint32))
        batch_processor = self.batch_processor
        assert isinstance(batch_processor, Qwen3VLMoeBatchProcessor)
        return Qwen3VLInputs(
            tokens=next_tokens,
            input_row_offsets=[row_offsets.to(device) for device in self.devices],
            signal_buffers=self.signal_buffers,
            decoder_position_ids=Buffer.from_numpy(np.ascontiguousarray(
                np.broadcast_to(following, (positions.shape[0], batch)), dtype=np.int64,
            )).to(self.devices[0]),
            return_n_logits=prev_model_inputs.return_n_logits,
            kv_cache_inputs=prev_model_inputs.kv_cache_inputs,
            image_token_indices=batch_processor.empty_image_token_indices(),
        )

    def _load_state_dict(self) -> dict[str, Any]:
        adapter = self.adapter or convert_qwen3vl_model_state_dict
        state_dict = adapter(
            dict(self.weights.items()),
            huggingface_config=self.huggingface_config,
            dtype=self.dtype,
            # the CPU kernels read bfloat16 text matrices as they are (float32 compute)
            keep_bfloat16_matrices=all(device.is_host for device in self.devices),
            # experts packed into the CPU MoE kernels' column panels
            cpu_expert_panels=all(device.is_host for device in self.devices),
        )
        self._vision_weights_dict = {k: v for k, v in state_dict.items() if k.startswith("vision_encoder.")}
        self._language_weights_dict = {k: v for k, v in state_dict.items() if k.startswith("language_model.")}
        return state_dict

    def _create_model_config(self, model_state_dict: dict[str, WeightData]) -> Qwen3VLConfig:
        config = Qwen3VLConfig.initialize_from_config(
            pipeline_config=self.pipeline_config,
            huggingface_config=self.huggingface_config,
            max_seq_len=self.max_seq_len,
        )
        config.finalize(
            huggingface_config=self.huggingface_config,
            llm_state_dict=self._language_weights_dict,
            vision_state_dict=self._vision_weights_dict,
            return_logits=self.return_logits,
        )
        self.model_config = config
        hf = self.huggingface_config
        weights_dtype = text_matrix_dtype(self._language_weights_dict, config.dtype)
        self.model_args = ModelArgs.from_config(
            hf, expert_layout=checkpoint_expert_layout(self._language_weights_dict, hf),
            text_weight_dtype=weights_dtype if weights_dtype != config.dtype else None,
        )
        self.model = Qwen3VLGraphs(
            Qwen3VLVisionEncoder(self.model_args.vision, config.dtype, config.devices),
            Qwen3VLTextDecoder(config, self.model_args, self.return_logits),
        )
        self.model.load_state_dict(model_state_dict, weight_alignment=1, strict=True)
        return config

    def graph_specs(self, model_config: Qwen3VLConfig) -> dict[str, GraphSpec]:
        """The vision encoder and the text decoder, compiled as one group.

        The Mojo packages are listed as built ``.mojoc`` files from the kernel
        cache (``kernel_extension``), not as source directories, which MAX
        re-packages at every trace and compile: with them a cached load
        compiles nothing (MAX's cache hits for the group as a whole). Both
        graphs trace with all three packages (each lists its own, names the
        others): MAX analyses a graph's kernel libraries at its first custom
        op (~1 s) and reuses the analysis only for the same set of paths.
        """
        del model_config
        vision, decoder = self.model.vision_encoder, self.model.language_model
        vision_packages = (kernel_extension("vision"), kernel_extension("attention"))
        text_packages = (kernel_extension("text"),)
        return {
            GraphRole.VISION: GroupMemberSpec(
                vision,
                "qwen3vl_vision",
                tuple(tree.leaves(vision.input_tree())),
                weights=self._vision_weights_dict,
                group=_COMPILE_GROUP,
                custom_extensions=vision_packages,
                listed_by_group=text_packages,
            ),
            GraphRole.DECODER: GroupMemberSpec(
                decoder,
                "qwen3vl_language",
                tuple(tree.leaves(decoder.input_tree(self.kv_params))),
                weights=self._language_weights_dict,
                group=_COMPILE_GROUP,
                custom_extensions=text_packages,
                listed_by_group=vision_packages,
            ),
        }

    def execute(self, model_inputs: ModelInputs) -> ModelOutputs:
        """Encodes the batch's images/videos if any, then runs the decoder step."""
        assert isinstance(model_inputs, Qwen3VLInputs)
        if model_inputs.has_vision_inputs:
            assert model_inputs.grid_thw and model_inputs.vision_position_ids and model_inputs.cu_seqlens
            assert model_inputs.pixel_values and model_inputs.image_token_indices is not None
            # Runs on the first device and returns a copy per device: merged, then deepstack
            # levels, device-minor (the built-in's order).
            outputs = self.vision_model.execute(
                model_inputs.pixel_values[0],
                model_inputs.grid_thw[0],
                model_inputs.vision_position_ids[0],
                model_inputs.cu_seqlens[0],
            )
            n = len(self.devices)
            image_embeddings, deepstack_embeddings = list(outputs[:n]), list(outputs[n:])
            image_token_indices = model_inputs.image_token_indices
            if int(image_token_indices[0].shape[0]) != int(image_embeddings[0].shape[0]):
                raise ValueError(
                    f"{image_token_indices[0].shape[0]} image/video placeholder tokens "
                    f"but the vision encoder produced {image_embeddings[0].shape[0]} embeddings"
                )
        else:
            batch_processor = self.batch_processor
            assert isinstance(batch_processor, Qwen3VLMoeBatchProcessor)
            image_embeddings, deepstack_embeddings = batch_processor.empty_image_embeddings()
            image_token_indices = batch_processor.empty_image_token_indices()

        outputs = self.language_model.execute(
            model_inputs.tokens,
            model_inputs.return_n_logits,
            *model_inputs.input_row_offsets,
            *image_embeddings,
            *deepstack_embeddings,
            *image_token_indices,
            model_inputs.decoder_position_ids,
            *model_inputs.signal_buffers,
            *tree.leaves(model_inputs.kv_cache_inputs),
        )
        if len(outputs) == 3:
            return ModelOutputs(next_token_logits=outputs[0], logits=outputs[1], logit_offsets=outputs[2])
        return ModelOutputs(next_token_logits=outputs[0], logits=outputs[0])


# The model worker imports this module (the pipeline names this class), so this
# is where a failing batch is made to fail its requests rather than the worker.
fail_batch_on_execute_error(Qwen3VLModel)
