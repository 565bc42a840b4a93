"""``qwen3vl-moe``: serve, generate, and make the tiny default checkpoint.

``serve`` is MAX's own OpenAI-compatible server with this package registered
as the Qwen3-VL architecture (see ``serving.py``); other flags pass straight
through to ``max serve``. Without ``--model-path`` it serves the tiny seeded
checkpoint, generated locally on first use (nothing is downloaded).
"""

from __future__ import annotations

import argparse
import json
import sys

from .serving import default_model_path, serve


def _show_progress() -> None:
    """Start-up progress (building kernels, compiling graphs) on stderr; the reply stays alone on stdout."""
    import logging

    if logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    progress = logging.getLogger("max.pipelines.qwen3vl_moe")
    progress.addHandler(handler)
    progress.setLevel(logging.INFO)
    progress.propagate = False  # MAX may configure the root logger later; one line each


def _generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="qwen3vl-moe generate")
    parser.add_argument("prompt")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    _show_progress()
    from .api import Qwen3VL

    llm = Qwen3VL(args.model_path or default_model_path(), devices=args.devices)
    [out] = llm.generate(
        [[{"role": "user", "content": args.prompt}]],
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
    )
    print(json.dumps({"text": out.text, "token_ids": out.token_ids}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve", "generate", "tiny-checkpoint"}
    if not argv or argv[0] not in commands:
        print(
            "usage: qwen3vl-moe {serve [max serve flags] | generate PROMPT [...] | "
            "tiny-checkpoint [--preset P] [--seed N] [--out DIR]}",
            file=sys.stderr,
        )
        return 2
    command, rest = argv[0], argv[1:]
    from .checkpoints.validate import CheckpointError

    try:
        if command == "serve":
            return serve(rest)
        if command == "generate":
            return _generate(rest)
    except CheckpointError as e:  # the user's files, not a bug: the message, no traceback
        print(f"qwen3vl-moe {command}: {e}", file=sys.stderr)
        return 2
    from .checkpoints.tiny import main as tiny_main

    tiny_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
