"""The package as pip builds it: every Python package and every Mojo source ships.

pyproject.toml lists its packages (one lives outside python/), so a package
added without listing it would silently be left out of wheels; these checks
catch that without building one. CI also builds the wheel and generates from
a fresh venv with it (.ci/run).
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def source_dir(package: str) -> Path:
    """Where setuptools takes ``package`` from, by the package-dir mapping."""
    mapping = SETUPTOOLS["package-dir"]
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in mapping:
            return ROOT / mapping[prefix] / Path(*parts[n:])
    return ROOT / mapping[""] / Path(*parts)


def test_every_python_package_is_listed():
    found = {
        ".".join(init.parent.relative_to(ROOT / "python").parts)
        for init in (ROOT / "python").rglob("__init__.py")
    }
    missing = found - set(SETUPTOOLS["packages"])
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"


def test_every_mojo_source_ships_as_package_data():
    shipped = set()
    for package in SETUPTOOLS["packages"]:
        folder = source_dir(package)
        for pattern in SETUPTOOLS.get("package-data", {}).get(package, []):
            shipped |= {p.resolve() for p in folder.glob(pattern)}
    sources = {p.resolve() for p in (ROOT / "mojo_kernels").rglob("*.mojo")}
    assert sources, "no Mojo sources found"
    assert not sources - shipped, f"Mojo sources left out of the wheel: {sorted(sources - shipped)}"


@pytest.mark.parametrize("name", ["attention", "text", "vision"])
def test_kernel_packages_resolve_through_the_installed_package(name, monkeypatch):
    from qwen3vl_moe.kernels import kernel_package

    monkeypatch.delenv("QWEN3VL_MOE_KERNELS", raising=False)
    path = kernel_package(name)
    assert (path / "__init__.mojo").is_file()
    assert fnmatch.fnmatch(str(path), "*mojo_kernels*")
