"""Every rule a request to the server must meet, checked before any graph runs.

The server (``serving.py``) applies ``check_request`` to each OpenAI request
body before MAX parses it (inline images are measured from their headers
there, before any pixel is decoded), and the tokenizer (``processing.py``)
applies ``check_token_ids``, ``check_image_sizes`` and the token budget to
what reaches it from any route, fetched images included. A request that
breaks a rule is refused with a 4xx whose message names the field, the rule
and what is allowed; nothing here fetches media or touches the model.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from max.pipelines.context import InputError

__all__ = [
    "CHAT_PART_TYPES",
    "Refusal",
    "ServerFacts",
    "check_image_sizes",
    "check_request",
    "check_token_ids",
    "image_tokens",
    "parse_body",
    "too_long",
]

CHAT_PART_TYPES = ("text", "image_url", "video_url")
MEDIA_SCHEMES = ("data", "http", "https", "file")
# smart_resize's limit: Qwen3-VL's processor refuses images more elongated than this.
MAX_ASPECT_RATIO = 200
ALLOWED_ROOTS_SETTING = "MAX_SERVE_ALLOWED_IMAGE_ROOTS"


class Refusal(InputError):
    """A request the server refuses, with the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerFacts:
    """What the rules need to know about the running server."""

    served_models: tuple[str, ...]
    vocab_size: int
    allowed_image_roots: tuple[str, ...] = ()
    serves_embeddings: bool = False
    max_length: int | None = None
    image_tokens: Callable[[int, int], int] | None = None  # placeholder tokens of a width x height image


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a Refusal saying why it is not one."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise Refusal("the request body nests JSON arrays/objects too deeply to parse") from None
    except UnicodeDecodeError as e:
        raise Refusal(f"the request body is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise Refusal(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(body, dict):
        raise Refusal(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


def check_request(path: str, body: dict[str, Any], facts: ServerFacts) -> None:
    """Refuses a chat/completions/embeddings request that breaks a rule."""
    _check_model(body, facts)
    if path.endswith("/embeddings"):
        if not facts.serves_embeddings:
            raise Refusal(
                f"model {facts.served_models[0]!r} generates text; it does not serve /v1/embeddings "
                "(use /v1/chat/completions or /v1/completions)"
            )
        return
    _check_sampling(body, facts)
    if path.endswith("/chat/completions"):
        _check_messages(body.get("messages"), facts)
        if body.get("prompt_tokens") is not None:
            check_token_ids(_int_list(body["prompt_tokens"], "prompt_tokens"), facts.vocab_size, "prompt_tokens")
    elif path.endswith("/completions"):
        _check_prompt(body.get("prompt"), facts)


def check_token_ids(ids: Iterable[Any], vocab_size: int, field: str = "prompt") -> None:
    """Every id an integer in [0, vocab_size): the embedding gather has no other bound."""
    for position, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise Refusal(f"{field}[{position}] must be an integer token id, got {_json_type(token)}")
        if not 0 <= token < vocab_size:
            raise Refusal(
                f"{field}[{position}] = {token} is not a token id of this model: ids are in [0, {vocab_size})"
            )


def image_tokens(processor: Any, width: int, height: int) -> int:
    """The placeholder tokens an image of this size expands to, as the processor resizes it."""
    factor = processor.patch_size * processor.merge_size
    h, w = processor.resized_size(width, height)
    return (h // factor) * (w // factor)


def too_long(what: str, tokens: int, max_length: int) -> Refusal:
    """The refusal for a prompt that does not fit, naming the flag and the tokens needed."""
    return Refusal(
        f"Prompt is too long: {what} {tokens} tokens, more than the server's --max-length of "
        f"{max_length}; send fewer or smaller images or shorter text, or restart the server "
        f"with --max-length >= {tokens} (plus room for the reply)"
    )


def check_image_sizes(sizes: Sequence[tuple[int, int]]) -> None:
    """Refuses images the Qwen3-VL processor cannot resize (empty, or too elongated)."""
    for index, (width, height) in enumerate(sizes):
        if width < 1 or height < 1:
            raise Refusal(f"image {index} is {width}x{height} pixels; an image needs at least 1x1")
        ratio = max(width, height) / min(width, height)
        if ratio > MAX_ASPECT_RATIO:
            raise Refusal(
                f"image {index} is {width}x{height} pixels: its aspect ratio {ratio:.0f}:1 exceeds "
                f"{MAX_ASPECT_RATIO}:1, the most the Qwen3-VL image processor accepts"
            )


# --- the rules, field by field -------------------------------------------------

# (field, lowest, highest): MAX's own sampling ranges (OpenAI's where they agree).
_FLOAT_RANGES = (
    ("temperature", 0.0, 2.0),
    ("thinking_temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
    ("min_p", 0.0, 1.0),
    ("frequency_penalty", -2.0, 2.0),
    ("presence_penalty", -2.0, 2.0),
)
# (field, lowest): integer fields.
_INT_MINIMA = (("max_tokens", 1), ("max_completion_tokens", 1), ("min_tokens", 0), ("top_k", -1), ("seed", 0))


def _check_model(body: dict[str, Any], facts: ServerFacts) -> None:
    model = body.get("model")
    served = ", ".join(repr(m) for m in facts.served_models)
    if model is None:
        raise Refusal(f"model is required; this server serves {served}")
    if not isinstance(model, str):
        raise Refusal(f"model must be a string, got {_json_type(model)}")
    if model and model not in facts.served_models:  # "" means the served model
        raise Refusal(f"model {model!r} is not served here; this server serves {served}", status=404)


def _check_sampling(body: dict[str, Any], facts: ServerFacts) -> None:
    for field, low, high in _FLOAT_RANGES:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refusal(f"{field} must be a number, got {_json_type(value)}")
        if not math.isfinite(value) or not low <= value <= high:
            raise Refusal(f"{field} must be a number in [{low}, {high}], got {value}")
    repetition = body.get("repetition_penalty")
    if repetition is not None:
        if isinstance(repetition, bool) or not isinstance(repetition, (int, float)):
            raise Refusal(f"repetition_penalty must be a number, got {_json_type(repetition)}")
        if not math.isfinite(repetition) or repetition <= 0:
            raise Refusal(f"repetition_penalty must be a finite number greater than 0, got {repetition}")
    for field, low in _INT_MINIMA:
        value = body.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise Refusal(f"{field} must be an integer, got {_json_type(value)}")
        if value < low or (field == "seed" and value >= 2**63):
            high = " and below 2**63" if field == "seed" else ""
            raise Refusal(f"{field} must be an integer >= {low}{high}, got {value}")
    n = body.get("n")
    if n is not None and n != 1:
        raise Refusal(f"n = {n!r} is not supported: this server returns one choice per request (send the request n times)")
    logprobs = body.get("logprobs")
    if logprobs not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise Refusal("logprobs and top_logprobs are not supported by this model; leave them out")
    if body.get("echo") not in (None, False):
        raise Refusal("echo is not supported by this model; leave it out")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise Refusal(f"stream must be true or false, got {_json_type(stream)}")
    _check_stop(body.get("stop"))
    if body.get("stop_token_ids") is not None:
        stop_ids = _int_list(body["stop_token_ids"], "stop_token_ids")
        check_token_ids(stop_ids, facts.vocab_size, "stop_token_ids")


def _check_stop(stop: Any) -> None:
    if stop is None:
        return
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list):
        raise Refusal(f"stop must be a string or an array of strings, got {_json_type(stop)}")
    for index, s in enumerate(stops):
        if not isinstance(s, str):
            raise Refusal(f"stop[{index}] must be a string, got {_json_type(s)}")
        if s == "":
            raise Refusal(f"stop[{index}] is the empty string, which would end every generation at once")


def _check_messages(messages: Any, facts: ServerFacts) -> None:
    if not isinstance(messages, list) or not messages:
        raise Refusal(f"messages must be a non-empty array of messages, got {_json_type(messages)}")
    image_sizes: list[tuple[int, int] | None] = []  # data: images, from their headers
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise Refusal(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}")
        if not isinstance(message.get("role"), str):
            raise Refusal(f"{where}.role must be a string, got {_json_type(message.get('role'))}")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise Refusal(f"{where}.content must be a string or an array of content parts, got {_json_type(content)}")
        for j, part in enumerate(content):
            _check_part(part, f"{where}.content[{j}]", facts, image_sizes)
    _check_images_fit(image_sizes, facts)


def _check_part(part: Any, where: str, facts: ServerFacts, image_sizes: list[tuple[int, int] | None]) -> None:
    if not isinstance(part, dict):
        raise Refusal(f"{where} must be a content part object, got {_json_type(part)}")
    kind = part.get("type")
    if kind not in CHAT_PART_TYPES:
        allowed = ", ".join(repr(t) for t in CHAT_PART_TYPES)
        raise Refusal(f"{where}.type is {kind!r}; this model accepts content parts of type {allowed}")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise Refusal(f"{where}.text must be a string, got {_json_type(part.get('text'))}")
        return
    media = part.get(kind)
    if not isinstance(media, dict) or not isinstance(media.get("url"), str):
        raise Refusal(f"{where}.{kind} must be an object with a string 'url', got {_json_type(media)}")
    check_media_url(media["url"], f"{where}.{kind}.url", facts.allowed_image_roots)
    if kind == "image_url":
        image_sizes.append(_data_url_image_size(media["url"]))


def _check_images_fit(sizes: list[tuple[int, int] | None], facts: ServerFacts) -> None:
    """Images given inline are refused from their headers, before any pixel is decoded
    (images behind URLs are checked the same way by the tokenizer, once fetched)."""
    known = [size for size in sizes if size is not None]
    check_image_sizes([size if size is not None else (1, 1) for size in sizes])
    if facts.image_tokens is None or not facts.max_length or not known:
        return
    tokens = sum(facts.image_tokens(w, h) for w, h in known)
    if tokens > facts.max_length:
        raise too_long("the images alone take", tokens, facts.max_length)


def _data_url_image_size(url: str) -> tuple[int, int] | None:
    """(width, height) from a base64 data: URL's image header; None when it is not one
    (the media resolver then says precisely what is wrong with it)."""
    from PIL import Image

    header, _, payload = url.partition(",")
    if not header.lower().startswith("data:") or not header.lower().endswith(";base64"):
        return None
    try:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as image:
            return image.size
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError):
        return None


def check_media_url(url: str, where: str, allowed_roots: Sequence[str]) -> None:
    """data:, http(s): or file: under an allowed root; nothing else is fetched."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme not in MEDIA_SCHEMES:
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise Refusal(f"{where} has {shown}; media URLs must be data:, http:, https: or file:")
    if scheme != "file":
        return
    enable = f'start the server with {ALLOWED_ROOTS_SETTING}=\'["/a/folder"]\' to allow files under /a/folder'
    if not allowed_roots:
        raise Refusal(f"{where}: file:// URLs are refused because no folder is allowed; {enable}")
    parsed = urlparse(url)
    if parsed.netloc not in ("", "localhost"):
        raise Refusal(f"{where}: a file:// URL must name a local path, not host {parsed.netloc!r}")
    path = Path(unquote(parsed.path)).resolve()
    if not any(path.is_relative_to(Path(root).resolve()) for root in allowed_roots):
        roots = ", ".join(str(PurePosixPath(r)) for r in allowed_roots)
        raise Refusal(f"{where}: {path} is outside the allowed folders ({roots}); {enable}")


def _check_prompt(prompt: Any, facts: ServerFacts) -> None:
    if isinstance(prompt, str):
        return
    if not isinstance(prompt, list) or not prompt:
        raise Refusal(
            "prompt must be a string, an array of strings, an array of token ids, "
            f"or an array of arrays of token ids; got {_json_type(prompt)}"
        )
    if all(isinstance(p, str) for p in prompt):
        return
    if all(isinstance(p, list) for p in prompt):
        for i, ids in enumerate(prompt):
            check_token_ids(ids, facts.vocab_size, f"prompt[{i}]")
        return
    check_token_ids(prompt, facts.vocab_size, "prompt")


def _int_list(value: Any, field: str) -> list[Any]:
    if not isinstance(value, list):
        raise Refusal(f"{field} must be an array of token ids, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a value's type, as a client would say it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
