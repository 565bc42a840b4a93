"""Mojo custom ops used by the graphs, and where their sources live.

The Mojo packages (``attention``, ``text``, ``vision``) ship inside this
Python package as ``qwen3vl_moe.mojo_kernels`` (the repository's top-level
``mojo_kernels/``, mapped there by pyproject.toml), so an installed wheel
compiles its graphs like a checkout does. Each package is listed in a graph's
``custom_extensions`` only when that graph uses it: a change to any op in a
package recompiles every graph that lists the package.

The graphs list each package as a built ``.mojoc`` (:func:`kernel_extension`),
not as its source directory: given a source directory, MAX re-runs
``mojo precompile`` on it at every graph build and again at every compile
(seconds per package, on every load). The built file lives in a cache keyed
by the package's sources and the MAX/Mojo release, so a package is built once
per content and an edit to any of its ``.mojo`` files builds it anew.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.resources
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ..cache import cache_root

logger = logging.getLogger("max.pipelines.qwen3vl_moe")

# The distributions whose release decides what a built package is: its bytes
# are the Mojo compiler's serialization, read back by MAX's graph compiler.
_TOOLCHAIN = ("max-core", "mojo-compiler", "modular")


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
    """Path of one Mojo package's sources (``text``, ``vision`` or ``attention``)."""
    path = kernels_root() / name
    if not (path / "__init__.mojo").is_file():
        raise FileNotFoundError(f"Mojo package {path} has no __init__.mojo")
    return path


def kernel_cache_dir() -> Path:
    """Where built packages are kept: ``$QWEN3VL_MOE_CACHE/kernels`` (default ``~/.cache/qwen3vl_moe/kernels``)."""
    return cache_root() / "kernels"


def _toolchain_versions() -> str:
    versions = []
    for dist in _TOOLCHAIN:
        try:
            versions.append(f"{dist}={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist}=none")
    return ";".join(versions)


def package_digest(name: str) -> str:
    """Hash of one package's ``.mojo`` sources (paths and bytes) and the MAX/Mojo release."""
    source = kernel_package(name)
    digest = hashlib.sha256(_toolchain_versions().encode())
    for path in sorted(source.rglob("*.mojo")):
        digest.update(b"\0" + path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def kernel_extension(name: str) -> Path:
    """The built ``.mojoc`` of one Mojo package, for a graph's ``custom_extensions``.

    Built with ``mojo precompile`` the first time these sources are seen (a
    few seconds; the one for ``text`` ~10 s, as it imports MAX's matmul) and
    reused by every later load. The file name carries the package name and
    the hash (``qwen3vl_moe_text_<hash>.mojoc``; the Mojo compiler names the
    module after the file's stem, so it is an identifier): the same sources
    give the same path in every process, so MAX's compile cache hits (a
    second load compiles nothing), and edited sources a new one. Concurrent
    builders are safe: each builds in its own directory and renames the
    finished file into place.
    """
    from ..max_compat import mojo_precompile

    digest = package_digest(name)
    target = kernel_cache_dir() / f"qwen3vl_moe_{name}_{digest}.mojoc"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=target.parent))
    except OSError as e:  # a read-only cache: MAX packages the sources itself, on every load
        logger.warning("cannot write the kernel cache %s (%s); MAX will re-package %s on every load",
                       target.parent, e, name)
        return kernel_package(name)
    try:
        start = time.perf_counter()
        mojo_precompile(kernel_package(name), staging / target.name)  # the stem names the module
        os.replace(staging / target.name, target)
        logger.info("built Mojo package %s in %.1f s: %s", name, time.perf_counter() - start, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
