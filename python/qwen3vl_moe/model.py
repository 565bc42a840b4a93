"""The Qwen3-VL pipeline model: loads weights, compiles graphs, runs steps.

It keeps the public surface of MAX's built-in ``Qwen3VLModel`` (same inputs,
same contract with the built-in batch processor and tokenizer) and replaces
what cannot run on CPU or loses precision there: the graphs are this
package's, the weights keep the checkpoint's float32 when asked to, and the
expert layout is checked rather than assumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

from max import tree
from max.driver import Buffer
from max.graph import Graph
from max.graph import Module as GraphModule
from max.graph.weights import WeightData
from max.nn.layer import Module
from max.pipelines.architectures.qwen3vl_moe import model as _builtin
from max.pipelines.architectures.qwen3vl_moe.batch_processor import Qwen3VLMoeBatchProcessor
from max.pipelines.architectures.qwen3vl_moe.model import Qwen3VLInputs
from max.pipelines.lib import ModelInputs, ModelOutputs
from max.pipelines.lib.graph_specs import GraphRole, GraphSpec

from .cpu_threads import lower_cpu_worker_priority
from .kernels import kernel_package
from .max_compat import fail_batch_on_execute_error
from .memory import estimate_activation_bytes, largest_step
from .model_config import Qwen3VLConfig
from .nn.text_decoder import Qwen3VLTextDecoder
from .nn.vision import Qwen3VLVisionEncoder
from .weight_adapters import checkpoint_expert_layout, convert_qwen3vl_model_state_dict

__all__ = ["Qwen3VLInputs", "Qwen3VLModel"]

_COMPILE_GROUP = "qwen3vl_moe"


@dataclass(frozen=True)
class _GroupMemberSpec(GraphSpec):
    """A graph that also uses packages another graph of its group lists.

    A graph is traced with its own extension list, but a group compiles with
    the concatenation of its members' lists, where a package listed twice
    fails ("kernel ... registered multiple times"). So a shared package is
    listed by one member and named here, for tracing only, by the others.
    """

    listed_by_group: tuple[Path, ...] = ()

    def trace(self, module: GraphModule | None = None) -> Graph:
        return self.module.trace(
            *self.input_types,
            name=self.name,
            module=module,
            custom_extensions=(*self.custom_extensions, *self.listed_by_group),
            is_device_graph=self.is_device_graph,
        )


class Qwen3VLGraphs(Module):
    """Holds the graph modules under the names their weights carry."""

    def __init__(self, vision_encoder: Qwen3VLVisionEncoder, language_model: Qwen3VLTextDecoder) -> None:
        super().__init__()
        self.vision_encoder = vision_encoder
        self.language_model = language_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Qwen3VLGraphs is a container; trace its graph modules instead")


class Qwen3VLModel(_builtin.Qwen3VLModel):
    """Qwen3-VL (MoE or dense) on MAX, CPU and GPU."""

    model_config_cls: ClassVar[type[Any]] = Qwen3VLConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if all(device.is_host for device in self.devices):
            # MAX's spinning CPU workers otherwise steal time slices from the
            # thread that drives each step (see cpu_threads).
            lower_cpu_worker_priority()

    @cached_property
    def signal_buffers(self) -> list[Buffer]:
        """None: the graphs run on one device and never all-reduce.

        (The built-in allocates GPU allreduce signal buffers, which crashes on CPU.)
        """
        return []

    @classmethod
    def estimate_activation_memory(cls, pipeline_config: Any, huggingface_config: Any) -> int:
        """Activation bytes of the largest step the pipeline admits (what the memory planner reserves)."""
        return estimate_activation_bytes(huggingface_config, largest_step(pipeline_config))

    def _load_state_dict(self) -> dict[str, Any]:
        adapter = self.adapter or convert_qwen3vl_model_state_dict
        state_dict = adapter(
            dict(self.weights.items()),
            huggingface_config=self.huggingface_config,
            dtype=self.dtype,
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
        layout = checkpoint_expert_layout(self._language_weights_dict, hf.text_config)
        self.model = Qwen3VLGraphs(
            Qwen3VLVisionEncoder(hf.vision_config, config.dtype, config.devices[0]),
            Qwen3VLTextDecoder(config, hf, layout, self.return_logits),
        )
        self.model.load_state_dict(model_state_dict, weight_alignment=1, strict=True)
        return config

    def graph_specs(self, model_config: Qwen3VLConfig) -> dict[str, GraphSpec]:
        """The vision encoder and the text decoder, compiled as one group."""
        del model_config
        vision, decoder = self.model.vision_encoder, self.model.language_model
        return {
            GraphRole.VISION: GraphSpec(
                vision,
                "qwen3vl_vision",
                tuple(tree.leaves(vision.input_tree())),
                weights=self._vision_weights_dict,
                group=_COMPILE_GROUP,
                custom_extensions=(kernel_package("vision"), kernel_package("attention")),
            ),
            GraphRole.DECODER: _GroupMemberSpec(
                decoder,
                "qwen3vl_language",
                tuple(tree.leaves(decoder.input_tree(self.kv_params))),
                weights=self._language_weights_dict,
                group=_COMPILE_GROUP,
                custom_extensions=(kernel_package("text"),),
                listed_by_group=(kernel_package("attention"),),
            ),
        }

    def execute(self, model_inputs: ModelInputs) -> ModelOutputs:
        """Encodes the batch's images/videos if any, then runs the decoder step."""
        assert isinstance(model_inputs, Qwen3VLInputs)
        if model_inputs.has_vision_inputs:
            assert model_inputs.grid_thw and model_inputs.vision_position_ids and model_inputs.cu_seqlens
            assert model_inputs.pixel_values and model_inputs.image_token_indices is not None
            merged, *deepstack = self.vision_model.execute(
                model_inputs.pixel_values[0],
                model_inputs.grid_thw[0],
                model_inputs.vision_position_ids[0],
                model_inputs.cu_seqlens[0],
            )
            image_embeddings, deepstack_embeddings = [merged], deepstack
            image_token_indices = model_inputs.image_token_indices
            if int(image_token_indices[0].shape[0]) != int(merged.shape[0]):
                raise ValueError(
                    f"{image_token_indices[0].shape[0]} image/video placeholder tokens "
                    f"but the vision encoder produced {merged.shape[0]} embeddings"
                )
        else:
            assert isinstance(self._batch_processor, Qwen3VLMoeBatchProcessor)
            image_embeddings, deepstack_embeddings = self._batch_processor.empty_image_embeddings()
            image_token_indices = self._batch_processor.empty_image_token_indices()

        outputs = self.language_model.execute(
            model_inputs.tokens,
            model_inputs.return_n_logits,
            *model_inputs.input_row_offsets,
            *image_embeddings,
            *deepstack_embeddings,
            *image_token_indices,
            model_inputs.decoder_position_ids,
            *tree.leaves(model_inputs.kv_cache_inputs),
        )
        if len(outputs) == 3:
            return ModelOutputs(next_token_logits=outputs[0], logits=outputs[1], logit_offsets=outputs[2])
        return ModelOutputs(next_token_logits=outputs[0], logits=outputs[0])


# The model worker imports this module (the pipeline names this class), so this
# is where a failing batch is made to fail its requests rather than the worker.
fail_batch_on_execute_error(Qwen3VLModel)
