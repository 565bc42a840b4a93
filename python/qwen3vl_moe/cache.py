"""Where the package keeps what it writes once and reuses: ``$QWEN3VL_MOE_CACHE``.

Default ``~/.cache/qwen3vl_moe``; the tiny checkpoints live in ``checkpoints/``
below it, the built Mojo packages in ``kernels/``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$QWEN3VL_MOE_CACHE``, else ``~/.cache/qwen3vl_moe``."""
    return Path(os.environ.get("QWEN3VL_MOE_CACHE") or "~/.cache/qwen3vl_moe").expanduser()
