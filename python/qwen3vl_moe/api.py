"""Python entry point: load a checkpoint on a device and generate from chat messages.

>>> from qwen3vl_moe.api import Qwen3VL
>>> llm = Qwen3VL("path/to/checkpoint", devices="cpu")
>>> [out] = llm.generate([[{"role": "user", "content": "Hello"}]], max_new_tokens=16)
>>> out.text, out.token_ids
>>> llm.generate([[{"role": "user", "content": [
...     {"type": "image", "image": "cat.png"}, {"type": "text", "text": "What is this?"}]}]])

Images are PIL images, encoded bytes or file paths; videos are encoded bytes or
file paths.

Everything runs through MAX's pipeline (the same tokenizer, KV cache manager
and sampler as ``max serve``), with this package registered as the
architecture, so the script path and the server path cannot drift apart.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import TELEMETRY_OFF  # noqa: F401  (sets the no-telemetry defaults first)
from .checkpoints.validate import validate_checkpoint

from max.pipelines.context import SamplingParams  # noqa: E402
from max.pipelines.lib import PIPELINE_REGISTRY, PipelineArgs, PipelineConfig  # noqa: E402
from max.pipelines.lib.generate import GenerateIterator  # noqa: E402
from max.pipelines.modeling.types import RequestID, TextGenerationRequest  # noqa: E402

from .max_compat import pipeline_model_of  # noqa: E402

Message = Mapping[str, Any]


@dataclass
class Generation:
    """One row's result."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    logits: list[np.ndarray] = field(default_factory=list)
    """Per generated token, the [vocab] logits it was sampled from (``output_logits=True``)."""


_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


def _media_bytes(value: Any, kind: str) -> bytes:
    """Encoded bytes of an image/video given as bytes, a path, or (images) a PIL image."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str | Path):
        return Path(value).read_bytes()
    if kind == "image" and isinstance(value, Image.Image):
        buffer = io.BytesIO()
        # Lossless, keeping the mode: the pixels reach the model unchanged.
        value.save(buffer, format="PNG" if value.mode in _PNG_MODES else "TIFF")
        return buffer.getvalue()
    raise TypeError(f"unsupported {kind} value of type {type(value).__name__}")


def _split_media(messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[bytes], list[bytes]]:
    """Moves image/video payloads out of the messages, leaving placeholders in order."""
    chat, images, videos = [], [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            chat.append(dict(message))
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind in ("image", "video") and kind in part:
                (images if kind == "image" else videos).append(_media_bytes(part[kind], kind))
                parts.append({"type": kind})
            else:
                parts.append(dict(part))
        chat.append({**message, "content": parts})
    return chat, images, videos


class _LogitsRecorder:
    """A logits processor that copies what the sampler sees."""

    def __init__(self) -> None:
        self.logits: list[np.ndarray] = []

    def __call__(self, inputs: Any) -> None:
        self.logits.append(np.array(inputs.logits.to_numpy(), dtype=np.float32))


class Qwen3VL:
    """A loaded Qwen3-VL model and its MAX pipeline."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        devices: str = "cpu",
        quantization_encoding: str | None = None,
        max_length: int = 4096,
        max_batch_size: int = 8,
        echo: bool = False,
        **pipeline_kwargs: Any,
    ) -> None:
        """Loads weights and compiles the graphs (tens of seconds on CPU when not cached).

        Args:
            model_path: A local checkpoint directory or a Hugging Face repo id.
            devices: ``cpu``, ``gpu``, ``gpu:0``, ...
            quantization_encoding: ``float32`` or ``bfloat16``; default: the
                checkpoint's dtype on CPU, bfloat16 on GPU.
            echo: Return logits for every prompt position (costs an lm_head
                over the whole prompt).
        """
        kwargs: dict[str, Any] = dict(
            model_path=str(model_path),
            device_specs=devices,
            max_length=max_length,
            max_batch_size=max_batch_size,
            custom_architectures=["qwen3vl_moe"],
            enable_echo=echo,
            enable_prefix_caching=False,
            **pipeline_kwargs,
        )
        if quantization_encoding is not None:
            kwargs["quantization_encoding"] = quantization_encoding
        validate_checkpoint(model_path)  # every problem in one message, before MAX touches it
        self.pipeline_config = PipelineConfig.from_args(PipelineArgs.from_flat_kwargs(**kwargs))
        self.tokenizer, self.pipeline = PIPELINE_REGISTRY.retrieve(self.pipeline_config)
        self.model_name = str(model_path)

    def prefill_logits(self, conversations: Sequence[Sequence[Message]]) -> list[np.ndarray]:
        """Logits at every prompt position, [prompt_len, vocab] per conversation, from one batched prefill.

        Needs ``echo=True`` at load time (the graph then returns all positions).
        """
        if not self.pipeline_config.model.enable_echo:
            raise ValueError("prefill_logits needs a model loaded with echo=True")
        model = pipeline_model_of(self.pipeline)
        captured: list[tuple[np.ndarray, np.ndarray]] = []
        execute = model.execute

        def recording_execute(model_inputs: Any) -> Any:
            outputs = execute(model_inputs)
            if not captured:
                captured.append((outputs.logits.to_numpy().copy(), outputs.logit_offsets.to_numpy().copy()))
            return outputs

        model.execute = recording_execute
        try:
            self.generate(conversations, max_new_tokens=1, ignore_eos=True)
        finally:
            del model.execute
        logits, offsets = captured[0]
        offsets = offsets.reshape(-1)
        return [logits[offsets[i]:offsets[i + 1]] for i in range(len(conversations))]

    def _context(self, messages: Sequence[Message], sampling: SamplingParams) -> Any:
        chat, images, videos = _split_media(messages)
        request = TextGenerationRequest(
            request_id=RequestID(),
            model_name=self.model_name,
            messages=chat,  # type: ignore[arg-type]
            images=images,
            videos=videos,
            sampling_params=sampling,
        )
        return asyncio.run(self.tokenizer.new_context(request))

    def generate(
        self,
        conversations: Sequence[Sequence[Message]],
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
        ignore_eos: bool = False,
        output_logits: bool = False,
    ) -> list[Generation]:
        """Generates for each conversation (OpenAI-style message lists), as one batch.

        ``temperature=0`` is greedy decoding.
        """
        contexts, recorders = [], []
        for row, messages in enumerate(conversations):
            sampling = SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k if top_k is not None else (1 if temperature == 0 else -1),
                top_p=top_p,
                seed=seed + row,
                ignore_eos=ignore_eos,
            )
            context = self._context(messages, sampling)
            if output_logits:
                recorder = _LogitsRecorder()
                context.sampling_params.logits_processors = [
                    *(context.sampling_params.logits_processors or ()), recorder,
                ]
                recorders.append(recorder)
            contexts.append(context)
        prompts = [[int(t) for t in context.tokens.all[: len(context.tokens)]] for context in contexts]
        with GenerateIterator.from_contexts(self.pipeline, contexts) as batch:
            while not batch.done:
                batch.step()
            sequences = batch.sequences
        generated = [seq[len(prompt):] for seq, prompt in zip(sequences, prompts, strict=True)]
        return [
            Generation(
                text=self.tokenizer.delegate.decode(ids, skip_special_tokens=True),
                token_ids=list(ids),
                prompt_token_ids=prompt,
                logits=recorders[row].logits if output_logits else [],
            )
            for row, (ids, prompt) in enumerate(zip(generated, prompts, strict=True))
        ]
