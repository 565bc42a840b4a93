"""The server survives every client (issue 12).

A corpus of bad or unusual requests, each answered with the status it
deserves and a JSON message naming the problem, after which a normal request
is still answered correctly; random chat-schema bodies from hypothesis; a
normal request's latency while the corpus runs. Shares the session server of
``conftest.py`` (no extra compile).
"""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

TINY_VOCAB = 482  # the tiny checkpoint's text_config.vocab_size
ALIVE_PROMPT = [{"role": "user", "content": "still there?"}]


# --- media for the corpus --------------------------------------------------------


def encoded(im: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def png_with_header_size(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (PIL cannot write 0x0 itself)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [noise(64, 48, seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def png16() -> bytes:
    return encoded(Image.fromarray((np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype("<u2")))


SMALL_PNG = encoded(noise(64, 48))
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def chat(content: Any = "hi", **extra: Any) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **extra}


def with_text(*parts: dict) -> list[dict]:
    return [*parts, {"type": "text", "text": "What is this?"}]


# --- the corpus --------------------------------------------------------------------


@dataclass
class Case:
    """One request: what is sent, the status it must get, and a pattern its message must match."""

    body: Any
    status: int
    pattern: str = ""
    path: str = "/v1/chat/completions"
    raw: bytes | None = None  # sent as-is instead of body
    extra: dict = field(default_factory=dict)


SSRF_REFUSAL = r"media URL host resolves to a disallowed \(internal/reserved\) address"

CORPUS: dict[str, Case] = {
    # the body itself
    "malformed_json": Case(None, 400, "not valid JSON", raw=b'{"model": '),
    "empty_body": Case(None, 400, "not valid JSON", raw=b""),
    "body_is_array": Case(None, 400, "JSON object, got an array", raw=b"[1, 2]"),
    "body_is_string": Case(None, 400, "JSON object, got a string", raw=b'"hi"'),
    "deeply_nested_json": Case(None, 400, "too deeply", raw=b"[" * 100_000),
    "not_utf8": Case(None, 400, "UTF-8", raw=b'{"messages": "\xff"}'),
    "model_missing": Case(None, 400, "model is required.*qwen3vl-moe-tiny", raw=b'{"messages": [{"role": "user", "content": "hi"}]}'),
    # messages
    "no_messages": Case({"max_tokens": 2}, 400, "messages must be a non-empty array"),
    "empty_messages": Case({"messages": [], "max_tokens": 2}, 400, "messages must be a non-empty array"),
    "messages_is_string": Case({"messages": "hi", "max_tokens": 2}, 400, "messages must be"),
    "message_is_number": Case({"messages": [7], "max_tokens": 2}, 400, r"messages\[0\] must be an object"),
    "role_missing": Case({"messages": [{"content": "hi"}], "max_tokens": 2}, 400, r"messages\[0\]\.role must be a string"),
    "role_unknown": Case({"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}, 400, "wizard"),
    "role_is_number": Case({"messages": [{"role": 3, "content": "hi"}], "max_tokens": 2}, 400, r"role must be a string"),
    "content_is_number": Case(chat(42), 400, r"content must be a string or an array"),
    "content_part_is_number": Case(chat([1, 2]), 400, r"content\[0\] must be a content part object"),
    "content_part_without_type": Case(chat([{"text": "hi"}]), 400, r"type is None"),
    "content_part_audio": Case(chat([{"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}]), 400, "'audio_url'.*accepts"),
    "content_part_input_audio": Case(chat([{"type": "input_audio", "input_audio": {"data": "AAAA"}}]), 400, "'input_audio'"),
    "text_part_text_is_number": Case(chat([{"type": "text", "text": 5}]), 400, r"\.text must be a string"),
    "image_url_is_string": Case(chat([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]), 400, r"image_url must be an object with a string 'url'"),
    "image_url_without_url": Case(chat([{"type": "image_url", "image_url": {}}]), 400, r"image_url must be an object with a string 'url'"),
    "empty_string_content": Case(chat(""), 200),
    "empty_parts_list": Case(chat([]), 200),
    "null_bytes_in_text": Case(chat("a\x00b\x00c"), 200),
    "emoji_and_rtl_text": Case(chat("🙂 שלום 你好 \u202e"), 200),
    "system_and_assistant_turns": Case({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}], "max_tokens": 2}, 200),
    "very_long_text": Case(chat("word " * 60_000), 400, r"the prompt takes \d+ tokens.*--max-length of 2048"),
    # model
    "unknown_model": Case(chat(model="gpt-17"), 404, r"gpt-17.*qwen3vl-moe-tiny"),
    "model_is_number": Case(chat(model=17), 400, "model must be a string"),
    # sampling parameters
    "temperature_negative": Case(chat(temperature=-1), 400, r"temperature must be a number in \[0\.0, 2\.0\], got -1"),
    "temperature_nan": Case(None, 400, r"temperature .*got nan", raw=b'{"model": "qwen3vl-moe-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    "temperature_infinity": Case(None, 400, r"temperature .*got inf", raw=b'{"model": "qwen3vl-moe-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}'),
    "temperature_huge": Case(chat(temperature=1e308), 400, r"temperature .*\[0\.0, 2\.0\]"),
    "temperature_is_string": Case(chat(temperature="hot"), 400, "temperature must be a number, got a string"),
    "top_p_above_one": Case(chat(top_p=1.5), 400, r"top_p must be a number in \[0\.0, 1\.0\]"),
    "top_k_negative": Case(chat(top_k=-5), 400, r"top_k must be an integer >= -1"),
    "max_tokens_negative": Case(chat(max_tokens=-1), 400, r"max_tokens must be an integer >= 1"),
    "max_tokens_zero": Case(chat(max_tokens=0), 400, r"max_tokens must be an integer >= 1"),
    "max_tokens_is_string": Case(chat(max_tokens="ten"), 400, "max_tokens must be an integer"),
    "max_tokens_is_float": Case(chat(max_tokens=2.5), 400, "max_tokens must be an integer"),
    "max_tokens_beyond_context": Case(chat(max_tokens=10**6), 400, r"max_tokens = 1000000 does not fit.*--max-length"),
    "frequency_penalty_huge": Case(chat(frequency_penalty=1e9), 400, r"frequency_penalty must be a number in \[-2\.0, 2\.0\]"),
    "presence_penalty_low": Case(chat(presence_penalty=-3), 400, r"presence_penalty must be a number in \[-2\.0, 2\.0\]"),
    "repetition_penalty_zero": Case(chat(repetition_penalty=0), 400, "repetition_penalty must be a finite number greater than 0"),
    "seed_negative": Case(chat(seed=-1), 400, r"seed must be an integer >= 0"),
    "n_two": Case(chat(n=2), 400, r"n = 2 is not supported"),
    "logprobs": Case(chat(logprobs=True, top_logprobs=3), 400, "logprobs .*not supported"),
    "stop_empty_string": Case(chat(stop=[""]), 400, r"stop\[0\] is the empty string"),
    "stop_is_number": Case(chat(stop=5), 400, "stop must be a string or an array of strings"),
    "stream_is_string": Case(chat(stream="yes"), 400, "stream must be true or false"),
    "stop_token_ids_outside_vocab": Case(chat(stop_token_ids=[999999]), 400, r"stop_token_ids\[0\] = 999999"),
    "unknown_top_level_field": Case(chat(frobnicate=1), 400, "frobnicate"),
    # token ids
    "completion_ids_past_vocab": Case({"prompt": [1, 2, 999999], "max_tokens": 4}, 400, rf"prompt\[2\] = 999999 .*\[0, {TINY_VOCAB}\)", path="/v1/completions"),
    "completion_ids_negative": Case({"prompt": [1, -2], "max_tokens": 4}, 400, r"prompt\[1\] = -2", path="/v1/completions"),
    "completion_ids_batch_past_vocab": Case({"prompt": [[1, 2], [3, 999999]], "max_tokens": 4}, 400, r"prompt\[1\]\[1\] = 999999", path="/v1/completions"),
    "completion_ids_float": Case({"prompt": [1, 2.5], "max_tokens": 4}, 400, r"prompt\[1\] must be an integer token id", path="/v1/completions"),
    "completion_prompt_object": Case({"prompt": {}, "max_tokens": 4}, 400, "prompt must be a string", path="/v1/completions"),
    "completion_prompt_empty_list": Case({"prompt": [], "max_tokens": 4}, 400, "prompt must be a string", path="/v1/completions"),
    "completion_ids_ok": Case({"prompt": [1, 2, 3], "max_tokens": 2}, 200, path="/v1/completions"),
    "chat_prompt_tokens_past_vocab": Case(chat(prompt_tokens=[1, 2, 999999]), 400, r"prompt_tokens\[2\] = 999999"),
    "chat_prompt_tokens_negative": Case(chat(prompt_tokens=[-1]), 400, r"prompt_tokens\[0\] = -1"),
    # images
    "invalid_base64": Case(chat(with_text(image_part("data:image/png;base64,@@not-base64@@"))), 400, "(?i)base64|unreadable image"),
    "non_image_bytes": Case(chat(with_text(image_part(data_url(b"hello, I am not an image")))), 400, "image"),
    "zero_byte_image": Case(chat(with_text(image_part(data_url(b"")))), 400, "(?i)base64|empty|image"),
    "truncated_png": Case(chat(with_text(image_part(data_url(SMALL_PNG[: len(SMALL_PNG) // 2])))), 400, "image"),
    "zero_by_zero_png": Case(chat(with_text(image_part(data_url(png_with_header_size(0, 0))))), 400, "image"),
    "one_by_one_png": Case(chat(with_text(image_part(data_url(encoded(noise(1, 1)))))), 200),
    "aspect_ratio_over_200": Case(chat(with_text(image_part(data_url(encoded(noise(1, 10_000)))))), 400, r"1x10000 .*aspect ratio 10000:1 exceeds 200:1"),
    "animated_gif": Case(chat(with_text(image_part(data_url(animated_gif(), "image/gif")))), 200),
    "png_16_bit": Case(chat(with_text(image_part(data_url(png16())))), 200),
    "cmyk_jpeg": Case(chat(with_text(image_part(data_url(encoded(noise(64, 48, "CMYK"), "JPEG"), "image/jpeg")))), 200),
    "svg": Case(chat(with_text(image_part(data_url(SVG, "image/svg+xml")))), 400, "image"),
    "image_5000x5000": Case(chat(with_text(image_part(data_url(encoded(Image.new("RGB", (5000, 5000), (9, 99, 199))))))), 400, r"the images alone take 16384 tokens.*--max-length >= 16384"),
    "image_8000x8000": Case(chat(with_text(image_part(data_url(encoded(Image.new("RGB", (8000, 8000), (9, 99, 199))))))), 400, "(?i)decodes to|pixels|--max-length"),
    "fifty_images": Case(chat(with_text(*[image_part(data_url(SMALL_PNG))] * 50)), 400, r"(?i)too many images|--max-length"),
    # media URLs
    "ssrf_loopback": Case(chat(with_text(image_part("http://127.0.0.1:9/x.png"))), 400, SSRF_REFUSAL),
    "ssrf_ipv6_loopback": Case(chat(with_text(image_part("http://[::1]:9/x.png"))), 400, SSRF_REFUSAL),
    "ssrf_private_10": Case(chat(with_text(image_part("http://10.0.0.1/x.png"))), 400, SSRF_REFUSAL),
    "ssrf_private_192": Case(chat(with_text(image_part("http://192.168.1.1/x.png"))), 400, SSRF_REFUSAL),
    "ssrf_metadata": Case(chat(with_text(image_part("http://169.254.169.254/latest/meta-data/"))), 400, SSRF_REFUSAL),
    "ftp_url": Case(chat(with_text(image_part("ftp://example.com/x.png"))), 400, "scheme 'ftp'.*data:, http:, https: or file:"),
    "javascript_url": Case(chat(with_text(image_part("javascript:alert(1)"))), 400, "scheme 'javascript'"),
    "url_without_scheme": Case(chat(with_text(image_part("picture.png"))), 400, "no scheme"),
    "file_outside_allowed_roots": Case(chat(with_text(image_part("file:///etc/passwd"))), 400, r"/etc/passwd is outside the allowed folders.*MAX_SERVE_ALLOWED_IMAGE_ROOTS"),
    "file_missing_inside_root": Case(chat(with_text(image_part("file://{root}/missing.png"))), 400, "(?i)not found"),
    "file_inside_root": Case(chat(with_text(image_part("file://{root}/ok.png"))), 200),
    # videos
    "garbage_video": Case(chat(with_text(video_part(data_url(b"\x1aE\xdf\xa3 not really a video" * 10, "video/x-matroska")))), 400, "(?i)video"),
    "empty_video": Case(chat(with_text(video_part(data_url(b"", "video/mp4")))), 400, "(?i)video|empty|base64"),
    # other routes
    "embeddings": Case({"input": "hello"}, 400, r"does not serve /v1/embeddings", path="/v1/embeddings"),
}


# --- helpers -------------------------------------------------------------------------


def send(server: str, case: Case, model_name: str, root: str, timeout: float = 600) -> requests.Response:
    if case.raw is not None:
        data = case.raw
    else:
        body = json.loads(json.dumps(case.body).replace("{root}", root))
        if isinstance(body, dict):
            body.setdefault("model", model_name)
        data = json.dumps(body).encode()
    return requests.post(server + case.path, data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def normal_reply(server: str, model_name: str, timeout: float = 120) -> str:
    response = requests.post(server + "/v1/chat/completions", timeout=timeout, json={
        "model": model_name, "messages": ALIVE_PROMPT, "max_tokens": 4, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


@pytest.fixture(scope="module")
def reference_reply(server, model_name, running_server) -> str:
    """The normal request's answer before any bad request was sent."""
    encoded_ok = encoded(noise(40, 30, seed=3))
    (running_server.media_root / "ok.png").write_bytes(encoded_ok)
    return normal_reply(server, model_name)


def assert_still_serving(running_server, model_name: str, reference: str, after: str) -> None:
    assert running_server.process.poll() is None, f"the server died after {after}:\n{running_server.log_tail()}"
    assert requests.get(running_server.url + "/health", timeout=30).status_code == 200, f"unhealthy after {after}"
    assert normal_reply(running_server.url, model_name) == reference, f"normal request answered differently after {after}"


# --- tests ---------------------------------------------------------------------------


def test_corpus_is_large():
    assert len(CORPUS) >= 60


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORPUS))
def test_bad_or_unusual_request(running_server, model_name, reference_reply, name):
    case = CORPUS[name]
    response = send(running_server.url, case, model_name, str(running_server.media_root))
    assert response.status_code == case.status, f"{name}: {response.status_code} {response.text[:500]}"
    body = response.json()
    if case.status >= 400:
        message = body["error"]["message"]
        assert re.search(case.pattern, message, re.DOTALL), f"{name}: message does not name the problem: {message!r}"
    else:
        assert body["choices"], body
    assert_still_serving(running_server, model_name, reference_reply, name)


@pytest.mark.slow
def test_out_of_vocabulary_ids_among_good_requests(running_server, model_name, reference_reply):
    """The request that used to kill the worker, sent 4 times alongside 4 good ones:
    the bad ones are refused, the good ones answered as if alone."""
    bad = Case({"prompt": [1, 2, 999999], "max_tokens": 4}, 400, path="/v1/completions")
    with ThreadPoolExecutor(8) as pool:
        bad_futures = [pool.submit(send, running_server.url, bad, model_name, "") for _ in range(4)]
        good_futures = [pool.submit(normal_reply, running_server.url, model_name) for _ in range(4)]
        assert [f.result().status_code for f in bad_futures] == [400] * 4
        assert [f.result() for f in good_futures] == [reference_reply] * 4
    assert_still_serving(running_server, model_name, reference_reply, "concurrent out-of-vocabulary ids")


@pytest.mark.slow
def test_normal_latency_while_the_corpus_runs(running_server, model_name, reference_reply):
    """The corpus, three times over, sent 4 requests at a time while a normal request
    repeats: none is a 5xx, the server never dies, and the normal request's p50/p99
    latency is reported."""
    server, root = running_server.url, str(running_server.media_root)
    idle = []
    for _ in range(5):
        t0 = time.perf_counter()
        assert normal_reply(server, model_name) == reference_reply
        idle.append(time.perf_counter() - t0)
    loaded: list[float] = []
    with ThreadPoolExecutor(4) as pool:
        rounds = [{name: pool.submit(send, server, case, model_name, root) for name, case in CORPUS.items()} for _ in range(3)]
        while not all(f.done() for futures in rounds for f in futures.values()):
            t0 = time.perf_counter()
            assert normal_reply(server, model_name) == reference_reply
            loaded.append(time.perf_counter() - t0)
        results = [{name: f.result().status_code for name, f in futures.items()} for futures in rounds]
    assert results[0] == results[1] == results[2]
    statuses = results[0]
    server_errors = {name: s for name, s in statuses.items() if s >= 500}
    clean_4xx = sum(400 <= s < 500 for s in statuses.values())
    p50, p99 = statistics.median(loaded), float(np.percentile(loaded, 99))
    print(f"\ncorpus: {len(statuses)} cases, {clean_4xx} 4xx, {len(server_errors)} 5xx; normal request "
          f"idle p50 {statistics.median(idle):.3f}s, under the corpus p50 {p50:.3f}s p99 {p99:.3f}s over {len(loaded)} requests")
    assert not server_errors
    assert statuses == {name: case.status for name, case in CORPUS.items()}
    assert_still_serving(running_server, model_name, reference_reply, "the concurrent corpus")


# --- random chat-schema bodies -----------------------------------------------------------

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
part_types = st.sampled_from(["text", "image_url", "video_url", "audio_url", "", "TEXT"])
urls = st.sampled_from([data_url(SMALL_PNG), "data:image/png;base64,!!", "ftp://x/y", "http://10.1.2.3/a.png", "file:///etc/hosts", "", "data:,"])
content_parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=60), json_values)}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.one_of(st.fixed_dictionaries({"url": urls}), json_values)}),
    st.fixed_dictionaries({"type": part_types}, optional={"text": json_values, "image_url": json_values, "video_url": json_values}),
    json_values,
)
messages = st.lists(
    st.one_of(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "bot", ""]),
                               "content": st.one_of(st.text(max_size=80), st.lists(content_parts, max_size=3), json_values)}),
        json_values,
    ),
    max_size=3,
)
small_numbers = st.one_of(st.integers(-3, 6), st.floats(-3, 3), json_values)
chat_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.just("qwen3vl-moe-tiny"), st.just("qwen3vl-moe-tiny"), json_values),
     "messages": st.one_of(messages, messages, json_values),
     "max_tokens": st.one_of(st.integers(-2, 4), json_values.filter(lambda v: v is not None))},
    optional={"temperature": small_numbers,
              "top_p": small_numbers, "top_k": small_numbers, "n": small_numbers, "stop": json_values,
              "seed": small_numbers, "logprobs": json_values, "frequency_penalty": small_numbers},
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(body=chat_bodies)
def test_random_chat_bodies_never_5xx(running_server, model_name, body):
    response = requests.post(running_server.url + "/v1/chat/completions", timeout=300,
                             data=json.dumps(body, allow_nan=True), headers={"Content-Type": "application/json"})
    assert response.status_code < 500, f"{response.status_code} {response.text[:500]} for {body!r:.500}"
    payload = response.json()
    assert ("error" in payload) == (response.status_code >= 400), payload
    assert running_server.process.poll() is None, running_server.log_tail()
    assert requests.get(running_server.url + "/health", timeout=30).status_code == 200


def test_missing_allowed_roots_names_the_setting():
    """A server with no allowed folder refuses file:// and says how to allow one (no server needed)."""
    from qwen3vl_moe.request_validation import Refusal, ServerFacts, check_request

    facts = ServerFacts(served_models=("m",), vocab_size=TINY_VOCAB)
    with pytest.raises(Refusal, match=r"no folder is allowed; start the server with MAX_SERVE_ALLOWED_IMAGE_ROOTS"):
        check_request("/v1/chat/completions", chat(with_text(image_part("file:///tmp/a.png")), model="m"), facts)


def test_a_failing_batch_fails_its_requests_not_the_worker():
    """MAX's scheduler, with this package's model, turns an exception from the batch's
    execute into a failed result for each of the batch's requests and keeps going."""
    from types import SimpleNamespace

    from max.serve.scheduler.text_generation_scheduler import TokenGenerationScheduler
    from qwen3vl_moe.model import (
        Qwen3VLModel,  # importing it installs the hook, as in the worker
    )

    class Pipeline:
        def __init__(self, model: object) -> None:
            self._pipeline_model = model

        def execute(self, inputs: object) -> dict:
            raise IndexError("gather index out of bounds")

    class Requests:
        def __init__(self) -> None:
            self.live = {"a", "b"}

        def contains(self, request_id: str) -> bool:
            return request_id in self.live

        def release_request(self, request_id: str) -> None:
            self.live.remove(request_id)

    def scheduler(model: object) -> TokenGenerationScheduler:
        s = object.__new__(TokenGenerationScheduler)
        s.__dict__.update(pipeline=Pipeline(model), batch_constructor=Requests(), _batch_counter=0,
                          _kernel_capture=None, _batch_spans_enabled=False, _tracing=False,
                          response_queue=SimpleNamespace(items=[]))
        s.response_queue.put_nowait = s.response_queue.items.append
        return s

    inputs = SimpleNamespace(flat_batch=[SimpleNamespace(request_id=r) for r in "ab"], batch_type=None, batches=[])
    ours = scheduler(object.__new__(Qwen3VLModel))
    assert ours._schedule(inputs) == 2
    assert ours.batch_constructor.live == set()
    [results] = ours.response_queue.items
    assert sorted(results) == ["a", "b"]
    assert all(r.is_done and "IndexError: gather index out of bounds" in r.error for r in results.values())

    other = scheduler(object())  # another architecture's model: MAX's behaviour is left alone
    with pytest.raises(IndexError):
        other._schedule(inputs)


# --- no client stalls the others -------------------------------------------------------


class ImageHost:
    """A local image host: /ok.png answers at once, /slow.png?NAME sends one byte every
    0.5 s (forever) and records, under NAME, how long it dripped before its client went away."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                body = SMALL_PNG if self.path.startswith("/ok.png") else None
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body) if body else 10**6))
                self.end_headers()
                if body:
                    self.wfile.write(body)
                    return
                started = time.monotonic()
                try:
                    for byte in SMALL_PNG * 100:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.5)
                except OSError:
                    host.drip_lasted[self.path.partition("?")[2]] = time.monotonic() - started

        self.drip_lasted: dict[str, float] = {}
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        from conftest import MEDIA_HOST

        return f"http://{MEDIA_HOST}:{self.http.server_address[1]}{path}"


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    yield host
    host.http.shutdown()


def image_chat(model_name: str, url: str) -> dict:
    return {"model": model_name, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": with_text(image_part(url))}]}


def timed_normal_replies(server: str, model_name: str, reference: str, count: int) -> list[float]:
    took = []
    for _ in range(count):
        t0 = time.perf_counter()
        assert normal_reply(server, model_name) == reference
        took.append(time.perf_counter() - t0)
    return took


@pytest.mark.slow
def test_an_allowed_image_host_is_fetched(server, model_name, reference_reply, image_host):
    response = requests.post(server + "/v1/chat/completions", json=image_chat(model_name, image_host.url("/ok.png")), timeout=120)
    assert response.status_code == 200, response.text


@pytest.mark.slow
def test_a_slow_image_host_meets_the_fetch_deadline(server, model_name, reference_reply, image_host):
    from conftest import MEDIA_FETCH_DEADLINE_S

    t0 = time.perf_counter()
    response = requests.post(server + "/v1/chat/completions", json=image_chat(model_name, image_host.url("/slow.png")), timeout=120)
    took = time.perf_counter() - t0
    assert response.status_code == 400, response.text
    assert f"took longer than {MEDIA_FETCH_DEADLINE_S} s" in response.json()["error"]["message"]
    assert MEDIA_FETCH_DEADLINE_S <= took < MEDIA_FETCH_DEADLINE_S + 3


@pytest.mark.slow
def test_a_client_that_leaves_cancels_its_media_fetch(server, model_name, reference_reply, image_host):
    from conftest import MEDIA_FETCH_DEADLINE_S

    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(server + "/v1/chat/completions", json=image_chat(model_name, image_host.url("/slow.png?leaver")), timeout=1)
    deadline = time.monotonic() + MEDIA_FETCH_DEADLINE_S + 5
    while "leaver" not in image_host.drip_lasted and time.monotonic() < deadline:
        time.sleep(0.1)
    lasted = image_host.drip_lasted["leaver"]
    assert lasted < MEDIA_FETCH_DEADLINE_S - 2, f"the fetch went on {lasted:.1f}s after the client left at 1s"


@pytest.mark.slow
def test_normal_latency_with_a_huge_image_and_a_slow_host_in_flight(running_server, model_name, reference_reply, image_host):
    """The issue's stall: a 112 KB 5000x5000 PNG (refused from its header now, before any
    pixel is decoded) sent alongside each normal request, while a host that drips bytes
    holds a fetch open; the normal request's median latency stays within 2x idle."""
    server = running_server.url
    idle = statistics.median(timed_normal_replies(server, model_name, reference_reply, 9))
    huge = image_chat(model_name, data_url(encoded(Image.new("RGB", (5000, 5000), (9, 99, 199)))))
    slow = image_chat(model_name, image_host.url("/slow.png?latency"))
    loaded, statuses = [], []
    with ThreadPoolExecutor(2) as pool:
        dripping = pool.submit(requests.post, server + "/v1/chat/completions", json=slow, timeout=120)
        time.sleep(0.5)
        for _ in range(9):
            refused = pool.submit(requests.post, server + "/v1/chat/completions", json=huge, timeout=120)
            loaded += timed_normal_replies(server, model_name, reference_reply, 1)
            statuses.append(refused.result().status_code)
        assert not dripping.done(), "the slow host's request ended before the measurement did"
        assert dripping.result().status_code == 400
    print(f"\nnormal request: idle p50 {idle:.3f}s; beside a 5000x5000 image and a slow host "
          f"p50 {statistics.median(loaded):.3f}s p99 {float(np.percentile(loaded, 99)):.3f}s")
    assert statuses == [400] * 9
    assert statistics.median(loaded) <= 2 * idle


@pytest.mark.slow
def test_a_request_arriving_while_the_worker_runs_a_big_image_is_answered(server, model_name, reference_reply):
    big = image_chat(model_name, data_url(encoded(noise(1200, 1100, seed=5))))  # about 1,300 image tokens
    big["max_tokens"] = 8
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(requests.post, server + "/v1/chat/completions", json=big, timeout=600)
        time.sleep(0.3)
        assert normal_reply(server, model_name) == reference_reply
        assert busy.result().status_code == 200, busy.result().text


@pytest.mark.slow
def test_streaming_clients_that_disconnect_leave_the_server_serving(server, model_name, reference_reply):
    idle = statistics.median(timed_normal_replies(server, model_name, reference_reply, 5))

    def leave_mid_stream(_: int) -> bool:
        body = {"model": model_name, "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "Count to a hundred."}]}
        with requests.post(server + "/v1/chat/completions", json=body, stream=True, timeout=120) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            return any(line.startswith(b"data:") for line in (next(lines), next(lines), next(lines)))

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(leave_mid_stream, range(8)))
    time.sleep(1)  # the disconnects reach the worker
    after = timed_normal_replies(server, model_name, reference_reply, 3)
    assert statistics.median(after) <= 3 * idle + 0.5, (after, idle)


@pytest.mark.slow
def test_a_short_request_is_not_queued_behind_a_long_one(server, model_name, reference_reply):
    """qwen3vl-moe serve batches continuously on CPU by default: a short request sent
    while a 1,000-token generation runs is answered long before that one ends."""
    idle = statistics.median(timed_normal_replies(server, model_name, reference_reply, 5))
    long = {"model": model_name, "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": "Tell me everything."}]}
    with ThreadPoolExecutor(1) as pool:
        t0 = time.perf_counter()
        running = pool.submit(requests.post, server + "/v1/chat/completions", json=long, timeout=600)
        time.sleep(1.0)
        short = timed_normal_replies(server, model_name, reference_reply, 3)
        assert not running.done(), "the long generation ended before the short requests were sent"
        assert running.result().status_code == 200
        long_took = time.perf_counter() - t0
    print(f"\nshort request: idle {idle:.3f}s, beside a 1000-token generation ({long_took:.1f}s) "
          f"{statistics.median(short):.3f}s")
    assert statistics.median(short) < long_took / 4


def test_max_serve_with_the_custom_architecture_gets_the_checks():
    """Plain ``max serve --custom-architectures qwen3vl_moe``: MAX's own import of the
    architecture puts the request checks and the precise messages on the app it builds."""
    from fastapi import HTTPException
    from max._entrypoints.cli.serve import serve_api_and_model_worker as entry
    from max.pipelines.lib.arch_lookup import import_custom_architectures
    from max.serve.config import Settings
    from qwen3vl_moe.serving import RequestValidation

    import_custom_architectures(["qwen3vl_moe"])
    app = entry.fastapi_app(Settings(), None)  # the serving settings are read only once it serves
    assert app.user_middleware[-1].cls is RequestValidation  # innermost: after MAX's body-size limit
    assert app.exception_handlers[HTTPException].__name__ == "say_why"
