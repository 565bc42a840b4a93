"""Deterministic test media (images, conversations, lossless video) shared by the test modules."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth-ish content so resizing does real interpolation work.
    base = rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 4), dtype=np.uint8)
    big = Image.fromarray(base, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
    return big.convert(mode)


def conversation(images: list[Image.Image], text: str) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


ONE_IMAGE = conversation([image(64, 96, 0)], "What is in the picture?")
TWO_IMAGES = conversation([image(300, 170, 1), image(40, 72, 2, "L")], "Compare these two images.")


def make_video(n_frames: int, fps: int, h: int, w: int, seed: int = 0) -> bytes:
    """A lossless (FFV1) clip of moving smooth noise, so both sides decode identical frames."""
    import av

    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (h // 4 + 2, w // 4 + 2, 3), dtype=np.uint8))
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv444p"
        for i in range(n_frames):
            frame = base.rotate(3 * i).resize((w, h), Image.Resampling.BILINEAR)
            for packet in stream.encode(av.VideoFrame.from_image(frame)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
