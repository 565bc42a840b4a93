"""MAX architecture registrations (``max serve/generate --custom-architectures qwen3vl_moe``).

The request context and batch processor are MAX's own Qwen3-VL ones: they
define the inputs contract this package's model honours. The tokenizer is
MAX's with transformers-exact image preprocessing (``processing.py``).
"""

from __future__ import annotations

from max.graph.weights import WeightsFormat
from max.pipelines.lib import SupportedArchitecture
from max.pipelines.modeling.types import InputModality, PipelineTask

from .max_compat import Qwen3VLBatchProcessor, Qwen3VLTextAndVisionContext, default_cpu_encoding_to_float32
from .memory import Qwen3VLMemoryPlanner
from .model import Qwen3VLModel
from .model_config import Qwen3VLConfig
from .processing import Qwen3VLTokenizer
from .serving import install_server_hooks
from .weight_adapters import convert_qwen3vl_model_state_dict


def _architecture(name: str, example_repo_ids: list[str]) -> SupportedArchitecture:
    return SupportedArchitecture(
        name=name,
        task=PipelineTask.TEXT_GENERATION,
        example_repo_ids=example_repo_ids,
        default_weights_format=WeightsFormat.safetensors,
        multi_gpu_supported=True,  # tensor parallel text decoder over GPUs (nn/text_decoder)
        input_modalities={InputModality.TEXT, InputModality.IMAGE, InputModality.VIDEO},
        default_encoding=Qwen3VLConfig.DEFAULT_ENCODING,
        # float8_e4m3fn: FP8 checkpoints on GPU (MAX's blockwise FP8 kernels, nn/fp8); on
        # CPU, MAX refuses the encoding and no flag means float32 (dequantized at load).
        supported_encodings=Qwen3VLConfig.SUPPORTED_ENCODINGS,
        weight_adapters={WeightsFormat.safetensors: convert_qwen3vl_model_state_dict},
        pipeline_model=Qwen3VLModel,
        batching=Qwen3VLBatchProcessor,
        tokenizer=Qwen3VLTokenizer,
        context_type=Qwen3VLTextAndVisionContext,
        required_arguments={"enable_chunked_prefill": False},
        config=Qwen3VLConfig,
        memory_planner=Qwen3VLMemoryPlanner,
        # MAX 26.7 captures device graphs only under its overlap pipeline, whose capture
        # warm-up this two-graph vision model does not yet fit (docs/STATUS.md, "Decode
        # without host work"); its decode inputs are capture-stable already.
        supports_overlap_scheduler=False,
        supports_device_graph_capture=False,
    )


qwen3vl_moe_arch = _architecture(
    "Qwen3VLMoeForConditionalGeneration",
    ["Qwen/Qwen3-VL-30B-A3B-Instruct", "Qwen/Qwen3-VL-235B-A22B-Instruct"],
)
qwen3vl_arch = _architecture(
    "Qwen3VLForConditionalGeneration",
    ["Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"],
)

ARCHITECTURES = [qwen3vl_moe_arch, qwen3vl_arch]

# bfloat16 and FP8 checkpoints on CPU run float32 with no encoding flag
# (upcast or dequantized at load by the weight adapter); GPUs keep bfloat16.
default_cpu_encoding_to_float32(Qwen3VLModel)

# `max serve --custom-architectures qwen3vl_moe` imports this module: the one
# point where the package can put its request checks on the server.
install_server_hooks()
