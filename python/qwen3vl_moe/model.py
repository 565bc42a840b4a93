"""The Qwen3-VL pipeline model: loads weights, compiles graphs, runs steps.

It keeps the public surface of MAX's built-in ``Qwen3VLModel`` (same inputs,
same execute contract with the built-in batch processor and tokenizer) and
replaces what cannot run on CPU or loses precision there: the graphs are this
package's, the weights keep the checkpoint's float32 when asked to, and the
expert layout is checked rather than assumed.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar

from max.driver import Buffer

from max.graph.weights import WeightData
from max.nn.layer import Module
from max.pipelines.architectures.qwen3vl_moe import model as _builtin
from max.pipelines.architectures.qwen3vl_moe.model import Qwen3VLInputs
from max.pipelines.lib import ModelInputs, ModelOutputs
from max.pipelines.lib.graph_specs import GraphRole, GraphSpec
from max import tree

from .model_config import Qwen3VLConfig
from .nn.text_decoder import Qwen3VLTextDecoder
from .weight_adapters import checkpoint_expert_layout, convert_qwen3vl_model_state_dict

__all__ = ["Qwen3VLInputs", "Qwen3VLModel"]

_COMPILE_GROUP = "qwen3vl_moe"


class Qwen3VLGraphs(Module):
    """Holds the graph modules under the names their weights carry."""

    def __init__(self, language_model: Qwen3VLTextDecoder) -> None:
        super().__init__()
        self.language_model = language_model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("Qwen3VLGraphs is a container; trace its graph modules instead")


class Qwen3VLModel(_builtin.Qwen3VLModel):
    """Qwen3-VL (MoE or dense) on MAX, CPU and GPU."""

    model_config_cls: ClassVar[type[Any]] = Qwen3VLConfig

    @cached_property
    def signal_buffers(self) -> list[Buffer]:
        """None: the graphs run on one device and never all-reduce.

        (The built-in allocates GPU allreduce signal buffers, which crashes on CPU.)
        """
        return []

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
        layout = checkpoint_expert_layout(self._language_weights_dict, self.huggingface_config.text_config)
        self.model = Qwen3VLGraphs(
            Qwen3VLTextDecoder(config, self.huggingface_config, layout, self.return_logits)
        )
        self.model.load_state_dict(self._language_weights_dict, weight_alignment=1, strict=True)
        return config

    def graph_specs(self, model_config: Qwen3VLConfig) -> dict[str, GraphSpec]:
        """The text decoder graph (the vision encoder graph joins it in one compile group)."""
        del model_config
        decoder = self.model.language_model
        return {
            GraphRole.DECODER: GraphSpec(
                decoder,
                "qwen3vl_language",
                tuple(tree.leaves(decoder.input_tree(self.kv_params))),
                weights=self._language_weights_dict,
                group=_COMPILE_GROUP,
            ),
        }

    def execute(self, model_inputs: ModelInputs) -> ModelOutputs:
        assert isinstance(model_inputs, Qwen3VLInputs)
        if model_inputs.has_vision_inputs and GraphRole.VISION not in self._models:
            raise NotImplementedError(
                "image and video inputs are not supported yet by this build of "
                "qwen3vl-moe: the vision encoder graph is not implemented"
            )
        return super().execute(model_inputs)
