"""Request processing: chat template, image preprocessing, placeholders, 3-D positions.

MAX's built-in Qwen3-VL tokenizer already renders the chat template, expands
image/video placeholders and computes ``get_rope_index`` exactly as
transformers does (checked in tests). Its image pixels differ from
transformers' by one float32 ulp (it normalises in a fused float32 formula) and
it hard-codes the pixel budget; this subclass preprocesses images exactly as
transformers' PIL-backend processor does, with the checkpoint's own
``preprocessor_config.json``.
"""

from __future__ import annotations

import asyncio
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import av
import numpy as np
import numpy.typing as npt
from max.pipelines.context import InputError, PromptTooLongError
from PIL import Image

from .chat_template import find_chat_template
from .max_compat import BuiltinQwen3VLTokenizer, smart_resize
from .request_validation import (
    check_image_sizes,
    check_token_ids,
    image_tokens,
    too_long,
)

__all__ = ["ImageProcessor", "Qwen3VLTokenizer"]


@dataclass(frozen=True)
class ImageProcessor:
    """transformers' ``Qwen2VLImageProcessorPil`` for Qwen3-VL, in numpy + PIL.

    smart_resize (factor patch*merge, banker's rounding, pixel budget), PIL
    bicubic resize of the uint8 RGB image, rescale in float64 then float32,
    normalise in float32, frame duplicated into the temporal slots, patches in
    merge-window order with columns (c, t, py, px).
    """

    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    resample: int = Image.Resampling.BICUBIC

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImageProcessor:
        size = config.get("size") or {}
        return cls(
            patch_size=config.get("patch_size", 16),
            temporal_patch_size=config.get("temporal_patch_size", 2),
            merge_size=config.get("merge_size", 2),
            min_pixels=size.get("shortest_edge", config.get("min_pixels", 65536)),
            max_pixels=size.get("longest_edge", config.get("max_pixels", 16777216)),
            rescale_factor=config.get("rescale_factor", 1 / 255),
            image_mean=tuple(config.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(config.get("image_std", (0.5, 0.5, 0.5))),
            resample=config.get("resample", Image.Resampling.BICUBIC),
        )

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> ImageProcessor:
        from transformers.utils import cached_file

        path = cached_file(str(model_path), "preprocessor_config.json")
        return cls.from_config(json.loads(Path(path).read_text()) if path else {})

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to: multiples of
        patch*merge within the pixel budget (what fixes its token count)."""
        factor = self.patch_size * self.merge_size
        return smart_resize(height, width, factor=factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def preprocess_one(self, image: Image.Image) -> tuple[npt.NDArray[np.float32], tuple[int, int, int]]:
        """One image -> (pixel rows [gh*gw, C*Tp*P*P] float32, (1, gh, gw))."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        width, height = image.size
        h, w = self.resized_size(width, height)
        if (h, w) != (height, width):
            image = image.resize((w, h), resample=self.resample)
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)  # [C, H, W]
        x = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
        P, Tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        gh, gw, C = h // P, w // P, x.shape[0]
        frames = np.broadcast_to(x, (Tp, *x.shape))  # the image fills every temporal slot
        patches = frames.reshape(Tp, C, gh // m, m, P, gw // m, m, P).transpose(2, 5, 3, 6, 1, 0, 4, 7)
        return np.ascontiguousarray(patches.reshape(gh * gw, C * Tp * P * P)), (1, gh, gw)

    def __call__(self, images: list[Image.Image] | Image.Image, return_tensors: str = "np"):
        """The built-in processor's interface: (stacked rows, grids [n, 3], rows per image)."""
        del return_tensors
        images = [images] if isinstance(images, Image.Image) else images
        rows, grids = zip(*(self.preprocess_one(image) for image in images))
        return np.vstack(rows), np.asarray(grids, dtype=np.int32), list(rows)


class Qwen3VLTokenizer(BuiltinQwen3VLTokenizer):
    """MAX's Qwen3-VL tokenizer with transformers-exact image preprocessing
    and precise errors for media that cannot be used."""

    def __init__(self, model_path: str, pipeline_config: Any, **kwargs: Any) -> None:
        super().__init__(model_path, pipeline_config, **kwargs)
        self.img_processor = ImageProcessor.from_pretrained(model_path)
        # AutoTokenizer alone misses chat_template.json (the Qwen3-VL hub layout).
        self.delegate.chat_template = find_chat_template(model_path).template

    def _preprocess_one_clip(self, video_hash: int | None, raw_bytes: bytes) -> Any:
        if not raw_bytes:
            raise ValueError("video is empty (0 bytes)")
        try:
            return super()._preprocess_one_clip(video_hash, raw_bytes)
        except av.error.FFmpegError as e:
            raise ValueError(f"could not decode video ({len(raw_bytes)} bytes): {e}") from e

    # --- request checks before any preprocessing (issue 12) ---

    async def new_context(self, request: Any) -> Any:
        """MAX's context, after the checks that need this model: token ids inside
        the vocabulary, images the processor can resize and whose tokens fit the
        context (from their headers, before any pixel is preprocessed), and
        ``max_tokens`` that fits after the prompt. Errors name ``--max-length``."""
        if request.prompt is not None and not isinstance(request.prompt, str):
            check_token_ids(request.prompt, self._model_vocab_size)
        if request.images:
            sizes = [_header_size(image, i) for i, image in enumerate(request.images)]
            check_image_sizes(sizes)
            self._check_fits(sum(image_tokens(self.img_processor, w, h) for w, h in sizes), "the images alone take")
        build = super().new_context(request)
        try:
            if request.images or request.videos:
                # Preprocessing media is seconds of CPU for a large photo or a clip: a
                # bounded pool keeps it off the event loop, so other clients and /health
                # are not stalled. (MAX's preprocess caches are thread-safe.)
                context = await asyncio.get_running_loop().run_in_executor(_MEDIA_WORKERS, asyncio.run, build)
            else:
                context = await build
        except PromptTooLongError as e:
            self._check_fits(e.num_tokens, "the prompt takes")
            raise
        wanted = request.sampling_params.max_new_tokens
        prompt_tokens = context.tokens.prompt_length
        if wanted is not None and self.max_length and prompt_tokens + wanted > self.max_length:
            raise InputError(
                f"max_tokens = {wanted} does not fit: the prompt takes {prompt_tokens} of the server's "
                f"--max-length {self.max_length} tokens, leaving {self.max_length - prompt_tokens}; ask for "
                f"at most that many, or restart the server with --max-length >= {prompt_tokens + wanted}"
            )
        return context

    def _check_fits(self, tokens: int, what: str) -> None:
        if self.max_length and tokens > self.max_length:
            raise too_long(what, tokens, self.max_length)

    @cached_property
    def _model_vocab_size(self) -> int:
        """Rows of the embedding table that both the model and the tokenizer know."""
        from transformers.utils import cached_file

        path = cached_file(str(self.model_path), "config.json")
        config = json.loads(Path(path).read_text()) if path else {}
        rows = config.get("text_config", config).get("vocab_size", self.tokenizer_vocab_size)
        return min(int(rows), self.tokenizer_vocab_size)


# At most this many requests preprocess media at once; the rest wait their turn.
_MEDIA_WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qwen3vl-media")


def _header_size(image: bytes | Image.Image, index: int) -> tuple[int, int]:
    """An image's (width, height) from its header; no pixel is decoded."""
    if isinstance(image, Image.Image):
        return image.size
    try:
        with Image.open(io.BytesIO(image)) as opened:
            return opened.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"image {index} is not a readable image ({e})") from e
