"""The OpenAI-compatible server: MAX serve with this architecture registered.

Defaults suited to a local, offline machine: CPU, 127.0.0.1, telemetry off,
and the tiny seeded checkpoint when no model is named. Any ``max serve`` flag
passes through.

Whichever way the server is started (``qwen3vl-moe serve`` or ``max serve
--custom-architectures qwen3vl_moe``), importing the architecture installs
two things on it: every chat/completions/embeddings request is checked
against ``request_validation`` before MAX parses it (a refusal is a 4xx that
names the field and the rule, a model the server does not serve is a 404
naming the served one). ``model.py`` makes a batch whose graph raises fail
its requests instead of ending the model worker and the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Sequence
from typing import Any

from . import TELEMETRY_OFF  # noqa: F401  (sets the no-telemetry defaults before MAX loads)

DEFAULT_PRESET = "moe"
DEFAULT_SERVED_NAME = "qwen3vl-moe-tiny"
# On CPU MAX would batch one request at a time; with continuous batching a short
# request is answered while a long one generates (measured in
# tests/test_serve_robustness.py::test_a_short_request_is_not_queued_behind_a_long_one).
DEFAULT_CPU_MAX_BATCH_SIZE = 16


def default_model_path() -> str:
    """The tiny seeded checkpoint, generated into the local cache on first use."""
    from .checkpoints.tiny import tiny_checkpoint

    return str(tiny_checkpoint(DEFAULT_PRESET))


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def serve_args(args: Sequence[str]) -> list[str]:
    """``max serve`` arguments: the user's, plus this package's defaults."""
    out = ["serve", "--custom-architectures", "qwen3vl_moe", *args]
    if not _has_flag(args, "--model-path") and not _has_flag(args, "--model"):
        out += ["--model-path", default_model_path()]
        if not _has_flag(args, "--served-model-name"):
            out += ["--served-model-name", DEFAULT_SERVED_NAME]
    if not _has_flag(args, "--devices"):
        out += ["--devices", "cpu"]
    if _flag_value(out, "--devices") == "cpu" and not _has_flag(args, "--max-batch-size"):
        out += ["--max-batch-size", str(DEFAULT_CPU_MAX_BATCH_SIZE)]
    if not _has_flag(args, "--host"):
        out += ["--host", "127.0.0.1"]
    return out


VALIDATED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# The status logged for a request whose client left before its answer began (nginx's).
CLIENT_CLOSED_REQUEST = 499
# Longest one media fetch may take, all told (MAX's own timeouts are per read).
MEDIA_FETCH_DEADLINE_S = 30.0


def server_facts(app: Any) -> Any:
    """What ``request_validation`` needs to know, read off MAX's running app."""
    from max.pipelines.modeling.types import PipelineTask

    from .request_validation import ServerFacts, image_tokens

    pipeline = app.state.pipeline
    tokenizer = pipeline.tokenizer
    processor = getattr(tokenizer, "img_processor", None)
    served = [pipeline.model_name]
    if pipeline.lora_queue:
        served += pipeline.lora_queue.list_loras()
    config = app.state.pipeline_config.model.huggingface_config
    return ServerFacts(
        served_models=tuple(served),
        vocab_size=int(getattr(config, "text_config", config).vocab_size),
        allowed_image_roots=tuple(app.state.settings.allowed_image_roots),
        serves_embeddings=app.state.task == PipelineTask.EMBEDDINGS_GENERATION,
        max_length=getattr(tokenizer, "max_length", None),
        image_tokens=functools.partial(image_tokens, processor) if processor is not None else None,
    )


class RequestValidation:
    """ASGI middleware: refuses a request that breaks a rule of ``request_validation``
    with the status and message it names, before MAX parses the body.

    Sits inside MAX's body-size limit, so the body it reads is already bounded.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in VALIDATED_PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        raw = b"".join(chunks)
        from .request_validation import Refusal, check_request, parse_body

        try:
            check_request(scope["path"], parse_body(raw), server_facts(scope["app"]))
        except Refusal as refusal:
            return await _refuse(scope, receive, send, refusal.status, str(refusal))
        await _serve_until_the_client_leaves(self.app, scope, raw, receive, send)


async def _serve_until_the_client_leaves(app: Any, scope: dict, raw: bytes, receive: Any, send: Any) -> None:
    """Runs MAX's app on the already-read body. A client that disconnects before
    its answer starts cancels the work done for it (media fetches, preprocessing,
    queueing); once the answer has started, MAX sees the disconnect itself."""
    left = asyncio.Event()
    started = False
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    async def tracked_send(message: dict) -> None:
        nonlocal started
        started = True
        await send(message)

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        left.set()

    answer = asyncio.ensure_future(app(scope, replay, tracked_send))
    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({answer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done() and not started:
            answer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await answer
        if not started:  # nobody will read it: it only tells MAX's middleware the request ended
            await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
            await send({"type": "http.response.body", "body": b""})
    finally:
        answer.cancel()  # a no-op once it is done
        watcher.cancel()


async def _refuse(scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
    """Answers with MAX's own error envelope, through the app's HTTPException handler."""
    from fastapi import HTTPException
    from starlette.requests import Request

    handler = scope["app"].exception_handlers[HTTPException]
    response = await handler(Request(scope, receive), HTTPException(status_code=status, detail=message))
    await response(scope, receive, send)


def _say_why(handler: Any) -> Any:
    """MAX answers a ValueError raised while handling a request as a bare "Value error.";
    the client gets the error's own message instead."""

    async def say_why(request: Any, exc: Any) -> Any:
        from fastapi import HTTPException

        cause = exc.__cause__
        if exc.detail == "Value error." and isinstance(cause, ValueError) and str(cause):
            exc = HTTPException(status_code=exc.status_code, detail=str(cause), headers=exc.headers)
        return await handler(request, exc)

    return say_why


def install_request_checks(app: Any) -> None:
    """Puts the request rules and the precise error messages on MAX's app."""
    from fastapi import HTTPException
    from starlette.middleware import Middleware

    app.user_middleware.append(Middleware(RequestValidation))  # innermost: after MAX's body-size limit
    app.add_exception_handler(HTTPException, _say_why(app.exception_handlers[HTTPException]))


def install_server_hooks() -> None:
    """Every ``max serve`` in this process checks requests before any graph runs.

    (A failing batch failing its requests, not the server, is installed where
    the model worker runs: on import of ``model.py``.)"""
    from .max_compat import deadline_on_media_fetches, on_serving_app

    on_serving_app(install_request_checks)
    deadline_on_media_fetches(float(os.environ.get("QWEN3VL_MOE_MEDIA_FETCH_DEADLINE_S", MEDIA_FETCH_DEADLINE_S)))


def serve(args: Sequence[str]) -> int:
    """Runs the server in this process until it is stopped."""
    from .checkpoints.validate import validate_serve_args
    from .max_compat import run_max_cli

    argv = serve_args(args)
    validate_serve_args(argv)  # before MAX starts: a broken checkpoint is one message, not a crash
    install_server_hooks()
    return run_max_cli(argv)
