"""Mojo custom ops used by the graphs, and where their sources live.

Each Mojo package under ``mojo_kernels/`` is listed in a graph's
``custom_extensions`` only when that graph uses it: a change to any op in a
package recompiles every graph that lists the package.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_KERNELS = Path(__file__).resolve().parents[3] / "mojo_kernels"


def kernels_root() -> Path:
    """The ``mojo_kernels`` directory (``$QWEN3VL_MOE_KERNELS`` overrides it)."""
    root = Path(os.environ.get("QWEN3VL_MOE_KERNELS", _REPO_KERNELS))
    if not root.is_dir():
        raise FileNotFoundError(
            f"Mojo kernel sources not found at {root}; set QWEN3VL_MOE_KERNELS "
            "to the repository's mojo_kernels directory"
        )
    return root


def kernel_package(name: str) -> Path:
    """Path of one Mojo package (``text``, ``vision`` or ``attention``) for ``custom_extensions``."""
    path = kernels_root() / name
    if not (path / "__init__.mojo").is_file():
        raise FileNotFoundError(f"Mojo package {path} has no __init__.mojo")
    return path
