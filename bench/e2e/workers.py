"""The in-process contenders: this package through MAX (``ours``) and transformers (``hf``).

Each runs inside a worker subprocess (``protocol.serve``); the public methods
are the ops the driver calls.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from typing import Any, ClassVar, Self

HF_IMPLS = ("grouped_mm", "eager")


def hide_torch() -> None:
    """Makes torch (and what needs it) unimportable in this process, as in the package's base install.

    ``pip install qwen3vl-moe`` brings no torch; the benchmark's environment
    has it for the transformers contender, and MAX imports transformers,
    which imports torch whenever it is installed: 0.65 GiB of RSS (torch,
    triton, the CUDA libraries) that our worker never uses. With the modules
    set to None, ``import torch`` raises ImportError and
    ``importlib.util.find_spec`` returns None, so transformers sees no torch.
    """
    for name in ("torch", "torchvision", "triton"):
        sys.modules[name] = None  # type: ignore[assignment]


def is_gpu(devices: str) -> bool:
    return devices.startswith("gpu")


def torch_device(devices: str) -> str:
    if not is_gpu(devices):
        return "cpu"
    index = devices.split(":", 1)[1].split(",")[0] if ":" in devices else "0"
    return f"cuda:{index}"


def image_448(size: int) -> Any:
    """A deterministic RGB test image (smooth gradients plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def step_stats(t0: float, marks: list[tuple[float, int]]) -> dict[str, float]:
    """Prefill seconds and decode tokens/s from (time, tokens returned) per step.

    The first step that returns tokens ends the prefill; decode counts the
    tokens of the later steps over the time from that step to the last.
    """
    first = next(i for i, (_, n) in enumerate(marks) if n > 0)
    t_first = marks[first][0]
    later = marks[first + 1:]
    decode_tokens = sum(n for _, n in later)
    decode_s = marks[-1][0] - t_first
    return {
        "prefill_s": t_first - t0,
        "decode_tokens": decode_tokens,
        "decode_steps": len(later),
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        "step_ms": 1e3 * decode_s / max(len(later), 1),
    }


class CompileTimes(logging.Handler):
    """MAX's own compile timing, read from its log.

    MAX's ``CompilationTimer`` (used by ``PipelineModel.load_graphs``) logs on
    the ``max.pipelines`` logger, at INFO: "Building <name> graph took X
    seconds", "Compiling <name> took X", "Initializing <name> took X" (engine
    measured) and "Building, compiling, and initializing <name> took X". This
    handler keeps those figures: seconds per timer name ("model", "sampler")
    and phase.
    """

    PATTERN = re.compile(r"^(Building, compiling, and initializing|Building|Compiling|Initializing) "
                         r"(.+?)(?: graph)? took ([0-9.]+) seconds")
    PHASES: ClassVar[dict[str, str]] = {"Building": "build_s", "Compiling": "compile_s", "Initializing": "init_s",
              "Building, compiling, and initializing": "total_s"}

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: dict[str, dict[str, float]] = {}
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        match = self.PATTERN.match(record.getMessage())
        if match:
            phases = self.times.setdefault(match.group(2), {})
            phases[self.PHASES[match.group(1)]] = float(match.group(3))
            self.lines.append(record.getMessage())

    def __enter__(self) -> Self:
        logger = logging.getLogger("max.pipelines")
        self._level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logger = logging.getLogger("max.pipelines")
        logger.removeHandler(self)
        logger.setLevel(self._level)


class OursWorker:
    """This package: MAX's pipeline (tokenizer contexts, paged KV cache, sampler) and our graphs."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from qwen3vl_moe.api import Qwen3VL
        from qwen3vl_moe.max_compat import pipeline_model_of

        t = time.perf_counter()
        with CompileTimes() as compile_times:
            self.llm = Qwen3VL(
                spec["model_path"],
                devices=spec["devices"],
                quantization_encoding=spec["encoding"],
                max_length=spec["max_length"],
                max_batch_size=spec["max_batch_size"],
                **({"kv_cache_format": spec["kv_cache_format"]} if spec.get("kv_cache_format") else {}),
            )
        if "total_s" not in compile_times.times.get("model", {}):
            print("warning: MAX logged no 'Building, compiling, and initializing ... took' line on the "
                  "max.pipelines logger (its compile timer changed?): no compile times", file=sys.stderr)
        self.setup = {"load_s": time.perf_counter() - t, "max_timer": compile_times.times,
                      "max_timer_log": compile_times.lines}
        self.spec = spec
        self.model = pipeline_model_of(self.llm.pipeline)
        self.device = self.model.devices[0]
        self.vision_inputs: list[Any] | None = None

    def sync(self) -> None:
        self.device.synchronize()

    def _context(self, ids: list[int], new_tokens: int) -> Any:
        import asyncio

        from max.pipelines.context import SamplingParams
        from max.pipelines.modeling.types import RequestID, TextGenerationRequest

        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_k=1, ignore_eos=True)
        request = TextGenerationRequest(
            request_id=RequestID(), model_name=self.llm.model_name, prompt=list(ids), sampling_params=sampling,
        )
        context = asyncio.run(self.llm.tokenizer.new_context(request))
        if len(context.tokens) != len(ids):
            raise RuntimeError(f"the tokenizer turned {len(ids)} prompt ids into {len(context.tokens)}")
        return context

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        from max.pipelines.lib.generate import GenerateIterator

        contexts = [self._context(ids, new_tokens) for ids in prompts]  # tokenization is not timed
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        with GenerateIterator.from_contexts(self.llm.pipeline, contexts) as batch:
            while not batch.done:
                tokens = batch.step()
                marks.append((time.perf_counter(), sum(len(v) for v in tokens.values())))
            sequences = batch.sequences
        generated = [len(seq) - len(p) for seq, p in zip(sequences, prompts, strict=True)]
        if generated != [new_tokens] * len(prompts):
            raise RuntimeError(f"generated {generated} tokens, expected {new_tokens} per row")
        return step_stats(t0, marks)

    def vision(self) -> dict[str, Any]:
        import numpy as np
        from max.driver import Buffer
        from max.pipelines.context import SamplingParams

        if self.vision_inputs is None:
            size = self.spec["image_size"]
            messages = [{"role": "user", "content": [
                {"type": "image", "image": image_448(size)}, {"type": "text", "text": "Describe the image."}]}]
            data = self.llm._context(messages, SamplingParams(max_new_tokens=1)).vision_data
            arrays = [
                np.ascontiguousarray(data.concatenated_pixel_values, dtype=np.float32),
                np.ascontiguousarray(data.image_grid_thw, dtype=np.int64),
                np.ascontiguousarray(data.vision_position_ids, dtype=np.int32),
                np.ascontiguousarray(data.cu_seqlens, dtype=np.uint32),
            ]
            self.vision_inputs = [Buffer.from_numpy(a).to(self.device) for a in arrays]
            self.patches = int(arrays[0].shape[0])
        self.sync()
        t = time.perf_counter()
        outputs = self.model.vision_model.execute(*self.vision_inputs)
        self.sync()
        elapsed = time.perf_counter() - t
        return {"s": elapsed, "patches": self.patches, "merged_tokens": int(outputs[0].shape[0])}


class HFWorker:
    """transformers: one model, switched between experts implementations per call."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        import transformers

        torch.set_grad_enabled(False)
        self.torch = torch
        self.spec = spec
        self.device = torch_device(spec["devices"])
        dtype = torch.bfloat16 if spec["encoding"] == "bfloat16" else torch.float32
        config = transformers.AutoConfig.from_pretrained(spec["model_path"])
        model_class = getattr(transformers, config.architectures[0])
        t = time.perf_counter()
        self.model = model_class.from_pretrained(
            spec["model_path"], dtype=dtype, experts_implementation=HF_IMPLS[0],
        ).to(self.device).eval()  # .to rather than device_map, which needs accelerate
        self.setup = {
            "load_s": time.perf_counter() - t,
            "default_experts_implementation": self.model.config._experts_implementation,
            "attn_implementation": self.model.config._attn_implementation,
            "torch_threads": torch.get_num_threads(),
        }
        if self.device == "cpu":
            self.setup["torch_gemm_gflop_s"] = self._gemm_rate(dtype)
        self.dtype = dtype
        self.vision_inputs: tuple[Any, Any] | None = None

    def _gemm_rate(self, dtype: Any, n: int = 1024) -> float:
        """torch's n x n x n matmul rate in GFLOP/s (best of 10): transformers' compute ceiling here."""
        a = self.torch.randn(n, n, dtype=dtype)
        b = self.torch.randn(n, n, dtype=dtype)
        best = math.inf
        for _ in range(10):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best / 1e9

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def set_impl(self, impl: str) -> None:
        if self.model.config._experts_implementation != impl:
            self.model.set_experts_implementation(impl)
        if self.model.config._experts_implementation != impl:
            raise RuntimeError(f"experts implementation {impl!r} did not take: "
                               f"{self.model.config._experts_implementation!r}")

    def generate(self, prompts: list[list[int]], new_tokens: int, impl: str) -> dict[str, Any]:
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch
        self.set_impl(impl)
        batch = len(prompts)
        worker = self

        class StepClock(LogitsProcessor):
            def __init__(self) -> None:
                self.marks: list[tuple[float, int]] = []

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                worker.sync()
                self.marks.append((time.perf_counter(), batch))
                return scores

        clock = StepClock()
        input_ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # equal lengths: no padding
        attention_mask = torch.ones_like(input_ids)
        self.sync()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            use_cache=True, logits_processor=LogitsProcessorList([clock]),
        )
        self.sync()
        if out.shape[1] - input_ids.shape[1] != new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
        return step_stats(t0, clock.marks)

    def greedy_text(self, text: str, new_tokens: int) -> dict[str, Any]:
        """Greedy continuation of plain ``text`` (no chat template), stopping at EOS; the text it decodes to."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.spec["model_path"])
        prompt = tokenizer(text)["input_ids"]
        out = self.model.generate(
            input_ids=self.torch.tensor([prompt], device=self.device), max_new_tokens=new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None,
        )
        ids = out[0, len(prompt):].tolist()
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        stopped = bool(ids) and ids[-1] in eos
        if stopped:  # llama.cpp stops before printing an end-of-generation token
            ids = ids[:-1]
        return {"prompt_ids": prompt, "ids": ids, "text": tokenizer.decode(ids), "stopped_at_eos": stopped}

    def vision(self, impl: str) -> dict[str, Any]:
        from transformers import AutoImageProcessor

        torch = self.torch
        self.set_impl(impl)  # the encoder has no experts; kept for symmetry
        if self.vision_inputs is None:
            processor = AutoImageProcessor.from_pretrained(self.spec["model_path"])
            inputs = processor(images=[image_448(self.spec["image_size"])], return_tensors="pt")
            self.vision_inputs = (
                inputs["pixel_values"].to(self.device, self.dtype), inputs["image_grid_thw"].to(self.device),
            )
        pixel_values, grid_thw = self.vision_inputs
        self.sync()
        t = time.perf_counter()
        out = self.model.model.visual(pixel_values, grid_thw=grid_thw)
        self.sync()
        elapsed = time.perf_counter() - t
        merged = out.pooler_output if hasattr(out, "pooler_output") else out[0]
        if isinstance(merged, list | tuple):
            merged = torch.cat(list(merged))
        return {"s": elapsed, "patches": int(pixel_values.shape[0]), "merged_tokens": int(merged.shape[0])}


WORKERS = {"ours": OursWorker, "compile": OursWorker, "hf": HFWorker}
