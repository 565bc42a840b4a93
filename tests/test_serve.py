"""The OpenAI-compatible server, driven by the real openai client on 127.0.0.1.

One server process per test session (``conftest.py``; the graphs compile
once, minutes when cold). Greedy outputs must equal the Python API's for the
same inputs.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import SERVER_MAX_LENGTH
from PIL import Image
from media import image, make_video

NEW_TOKENS = 16

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(server):
    """The Python API on the same checkpoint and settings (a compile-cache hit after the server)."""
    from qwen3vl_moe.api import Qwen3VL
    from qwen3vl_moe.serving import DEFAULT_CPU_MAX_BATCH_SIZE, default_model_path

    return Qwen3VL(default_model_path(), devices="cpu", max_length=SERVER_MAX_LENGTH, max_batch_size=DEFAULT_CPU_MAX_BATCH_SIZE)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


IMG_A, IMG_B = image(64, 96, 0), image(300, 170, 1)
VIDEO = make_video(30, 10, 96, 128)


def openai_messages(kind: str) -> list[dict]:
    text = {"type": "text", "text": "Describe what you see."}
    if kind == "text":
        return [{"role": "user", "content": "Tell me a short story about a lighthouse."}]
    if kind == "one_image":
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(IMG_A))}}, text]}]
    if kind == "two_images":
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(IMG_A))}},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes(IMG_B))}}, text]}]
    if kind == "video":
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(VIDEO, "video/x-matroska")}}, text]}]
    raise ValueError(kind)


def api_messages(kind: str) -> list[dict]:
    text = {"type": "text", "text": "Describe what you see."}
    if kind == "text":
        return openai_messages("text")
    media = {
        "one_image": [{"type": "image", "image": png_bytes(IMG_A)}],
        "two_images": [{"type": "image", "image": png_bytes(IMG_A)}, {"type": "image", "image": png_bytes(IMG_B)}],
        "video": [{"type": "video", "video": VIDEO}],
    }[kind]
    return [{"role": "user", "content": [*media, text]}]


def chat(client, model_name, kind: str, **kw) -> str:
    response = client.chat.completions.create(
        model=model_name, messages=openai_messages(kind), max_tokens=NEW_TOKENS, temperature=0, **kw
    )
    return response.choices[0].message.content


KINDS = ["text", "one_image", "two_images", "video"]


def test_models_and_health(server, model_name):
    assert model_name == "qwen3vl-moe-tiny"
    assert requests.get(server + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_equals_python_api(client, model_name, engine, kind):
    served = chat(client, model_name, kind)
    [direct] = engine.generate([api_messages(kind)], max_new_tokens=NEW_TOKENS)
    assert served == direct.text
    assert served  # something was generated


@pytest.mark.parametrize("kind", ["text", "one_image"])
def test_stream_equals_non_stream(client, model_name, kind):
    whole = chat(client, model_name, kind)
    stream = client.chat.completions.create(
        model=model_name, messages=openai_messages(kind), max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def streamed(client, model_name, kind: str) -> str:
    stream = client.chat.completions.create(
        model=model_name, messages=openai_messages(kind), max_tokens=NEW_TOKENS, temperature=0, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_32_concurrent_mixed_requests_equal_each_alone(client, model_name):
    """Text, one image and two images, streaming and not: 32 at once, each equal to the same request sent alone."""
    requests_ = [(kind, stream) for kind in ["text", "one_image", "two_images", "text"] for stream in (False, True)] * 4
    alone = {k: chat(client, model_name, k) for k, _ in set(requests_)}
    send = lambda r: streamed(client, model_name, r[0]) if r[1] else chat(client, model_name, r[0])
    with ThreadPoolExecutor(len(requests_)) as pool:
        results = list(pool.map(send, requests_))
    assert len(results) == 32
    assert results == [alone[k] for k, _ in requests_]
