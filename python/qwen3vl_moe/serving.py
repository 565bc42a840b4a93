"""The OpenAI-compatible server: MAX serve with this architecture registered.

Defaults suited to a local, offline machine: CPU, 127.0.0.1, telemetry off,
and the tiny seeded checkpoint when no model is named. Any ``max serve`` flag
passes through. One MAX behaviour is sharpened: a request naming a model the
server does not serve gets a 404 that says which model is served, instead of
MAX's bare "Value error.".
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import TELEMETRY_OFF  # noqa: F401  (sets the no-telemetry defaults before MAX loads)

DEFAULT_PRESET = "moe"
DEFAULT_SERVED_NAME = "qwen3vl-moe-tiny"


def default_model_path() -> str:
    """The tiny seeded checkpoint, generated into the local cache on first use."""
    from .checkpoints.tiny import tiny_checkpoint

    return str(tiny_checkpoint(DEFAULT_PRESET))


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def serve_args(args: Sequence[str]) -> list[str]:
    """``max serve`` arguments: the user's, plus this package's defaults."""
    out = ["serve", "--custom-architectures", "qwen3vl_moe", *args]
    if not _has_flag(args, "--model-path") and not _has_flag(args, "--model"):
        out += ["--model-path", default_model_path()]
        if not _has_flag(args, "--served-model-name"):
            out += ["--served-model-name", DEFAULT_SERVED_NAME]
    if not _has_flag(args, "--devices"):
        out += ["--devices", "cpu"]
    if not _has_flag(args, "--host"):
        out += ["--host", "127.0.0.1"]
    return out


def _report_unknown_models() -> None:
    """Unknown model names become a 404 naming the served model."""
    from fastapi import HTTPException
    from max.serve.router import openai_routes

    lookup = openai_routes.get_pipeline
    if getattr(lookup, "_qwen3vl_moe", False):
        return

    def get_pipeline(request, model_name):  # type: ignore[no-untyped-def]
        try:
            return lookup(request, model_name)
        except ValueError as e:
            if str(e).startswith("Unknown model"):
                raise HTTPException(status_code=404, detail=str(e)) from e
            raise

    get_pipeline._qwen3vl_moe = True  # type: ignore[attr-defined]
    openai_routes.get_pipeline = get_pipeline


def serve(args: Sequence[str]) -> int:
    """Runs the server in this process until it is stopped."""
    from max._entrypoints.pipelines import main as max_main

    from .checkpoints.validate import validate_serve_args

    argv = serve_args(args)
    validate_serve_args(argv)  # before MAX starts: a broken checkpoint is one message, not a crash
    _report_unknown_models()
    sys.argv = ["max", *argv]
    return int(max_main() or 0)
