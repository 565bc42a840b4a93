"""The one boundary to MAX internals.

Everything this package needs from MAX beyond its public API (underscore
modules, private attributes, classes of another architecture, patched
routes) is reached from here, each use with a comment naming the MAX
behaviour it depends on. Porting to a new MAX release starts in this file:
the version check below says which releases these assumptions were tested
against.
"""

from __future__ import annotations

import importlib.metadata

# Releases of the `modular` package whose internals this module was checked against.
TESTED_MAX_VERSIONS = ("26.7.0",)


def check_max_version() -> str:
    """The installed MAX version; raises a clear error for one this package was not tested with.

    ``QWEN3VL_MOE_ALLOW_UNTESTED_MAX=1`` turns the error into a warning, for
    someone porting the package to a new release.
    """
    import os
    import warnings

    try:
        version = importlib.metadata.version("modular")
    except importlib.metadata.PackageNotFoundError:
        try:
            version = importlib.metadata.version("max")
        except importlib.metadata.PackageNotFoundError as e:
            raise ImportError("qwen3vl_moe needs MAX: pip install modular==26.7.0") from e
    if version not in TESTED_MAX_VERSIONS:
        message = (
            f"qwen3vl_moe was tested with MAX {', '.join(TESTED_MAX_VERSIONS)}, but MAX {version} is "
            "installed; its use of MAX internals (python/qwen3vl_moe/max_compat.py) may not hold. "
            "Install modular==26.7.0, or set QWEN3VL_MOE_ALLOW_UNTESTED_MAX=1 to try anyway."
        )
        if os.environ.get("QWEN3VL_MOE_ALLOW_UNTESTED_MAX") != "1":
            raise ImportError(message)
        warnings.warn(message, stacklevel=2)
    return version


MAX_VERSION = check_max_version()
