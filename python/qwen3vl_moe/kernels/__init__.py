"""Mojo custom ops used by the graphs, and where their sources live.

The Mojo packages (``attention``, ``text``, ``vision``) ship inside this
Python package as ``qwen3vl_moe.mojo_kernels`` (the repository's top-level
``mojo_kernels/``, mapped there by pyproject.toml), so an installed wheel
compiles its graphs like a checkout does. Each package is listed in a graph's
``custom_extensions`` only when that graph uses it: a change to any op in a
package recompiles every graph that lists the package.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path


def kernels_root() -> Path:
    """The directory holding the Mojo packages (``$QWEN3VL_MOE_KERNELS`` overrides it)."""
    override = os.environ.get("QWEN3VL_MOE_KERNELS")
    root = Path(override) if override else Path(str(importlib.resources.files("qwen3vl_moe.mojo_kernels")))
    if not root.is_dir():
        raise FileNotFoundError(
            f"Mojo kernel sources not found at {root}: the qwen3vl_moe install is incomplete "
            "(reinstall it), or QWEN3VL_MOE_KERNELS points to the wrong place"
        )
    return root


def kernel_package(name: str) -> Path:
    """Path of one Mojo package (``text``, ``vision`` or ``attention``) for ``custom_extensions``."""
    path = kernels_root() / name
    if not (path / "__init__.mojo").is_file():
        raise FileNotFoundError(f"Mojo package {path} has no __init__.mojo")
    return path
