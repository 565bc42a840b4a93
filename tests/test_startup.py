"""Start-up: the Mojo packages are built once per content, and a second load reuses everything.

The fast checks build a one-function Mojo package (seconds). The slow check
loads the tiny model in a fresh process after this session loaded it, with
the same caches, and asserts that nothing was rebuilt or recompiled there: no
``mojo precompile`` run, and MAX's compile phase a cache hit.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qwen3vl_moe import kernels, max_compat


@pytest.fixture
def package_root(tmp_path, monkeypatch) -> Path:
    """A kernels root holding one trivial package named ``attention``, and an empty cache."""
    root = tmp_path / "kernels"
    (root / "attention").mkdir(parents=True)
    (root / "attention" / "__init__.mojo").write_text("def answer() -> Int:\n    return 42\n")
    monkeypatch.setenv("QWEN3VL_MOE_KERNELS", str(root))
    monkeypatch.setenv("QWEN3VL_MOE_CACHE", str(tmp_path / "cache"))
    return root


def counting_precompile(monkeypatch) -> list[Path]:
    calls: list[Path] = []
    real = max_compat.mojo_precompile

    def precompile(source: Path, out: Path) -> None:
        calls.append(source)
        real(source, out)

    monkeypatch.setattr(max_compat, "mojo_precompile", precompile)
    return calls


def test_a_package_is_built_once_per_content(package_root, monkeypatch):
    calls = counting_precompile(monkeypatch)
    first = kernels.kernel_extension("attention")
    assert first.is_file() and first.suffix == ".mojoc"
    assert first.parent == kernels.kernel_cache_dir()
    assert first.stem.isidentifier() and first.stem.startswith("qwen3vl_moe_attention_")
    assert kernels.kernel_extension("attention") == first
    assert calls == [package_root / "attention"], "the second call rebuilt an unchanged package"

    # an edit to any source of the package builds it anew, under a new name
    (package_root / "attention" / "more.mojo").write_text("def other() -> Int:\n    return 7\n")
    second = kernels.kernel_extension("attention")
    assert second != first and second.is_file() and len(calls) == 2
    assert sorted(p.name for p in kernels.kernel_cache_dir().iterdir()) == sorted([first.name, second.name])


def test_the_digest_covers_sources_and_the_toolchain(package_root, monkeypatch):
    before = kernels.package_digest("attention")
    (package_root / "attention" / "__init__.mojo").write_text("def answer() -> Int:\n    return 43\n")
    edited = kernels.package_digest("attention")
    assert edited != before
    monkeypatch.setattr(kernels, "_toolchain_versions", lambda: "max-core=0.0.0")
    assert kernels.package_digest("attention") != edited


def test_a_read_only_cache_falls_back_to_the_sources(package_root, monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("QWEN3VL_MOE_CACHE", str(blocker))  # kernels/ cannot be created under a file
    assert kernels.kernel_extension("attention") == package_root / "attention"


def test_a_package_that_does_not_compile_raises_and_leaves_nothing(package_root):
    from mojo.paths import MojoCompilationError

    (package_root / "attention" / "__init__.mojo").write_text("def answer() -> Int:\n    return undefined_name\n")
    with pytest.raises(MojoCompilationError, match="undefined_name"):
        kernels.kernel_extension("attention")
    assert list(kernels.kernel_cache_dir().iterdir()) == []


def test_the_progress_lines(caplog, monkeypatch):
    from qwen3vl_moe import model

    monkeypatch.setattr(model, "_STILL_COMPILING_EVERY_S", 0.05)
    with caplog.at_level(logging.INFO, logger="max.pipelines.qwen3vl_moe"):
        with model._compile_progress("cpu"):
            time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "max.pipelines.qwen3vl_moe"]
    assert lines[0].startswith("loading the Qwen3-VL graphs for cpu") and "MAX's cache" in lines[0]
    assert any(line.startswith("... still compiling the Qwen3-VL graphs") for line in lines[1:-1])
    assert re.fullmatch(r"Qwen3-VL graphs for cpu ready in \d+\.\d s", lines[-1])


# What the fresh process runs: load the tiny model with the test settings,
# recording every `mojo` run (MAX runs `mojo precompile` through this function).
_SECOND_LOAD = textwrap.dedent("""
    import json, sys, time
    import mojo.paths, mojo.run
    runs = []
    real = mojo.run.subprocess_run_mojo
    def counting(args, **kwargs):
        runs.append(list(args))
        return real(args, **kwargs)
    mojo.run.subprocess_run_mojo = mojo.paths.subprocess_run_mojo = counting
    from qwen3vl_moe.api import Qwen3VL
    start = time.perf_counter()
    Qwen3VL(sys.argv[1], devices="cpu", **json.loads(sys.argv[2]))
    print(json.dumps({"mojo_runs": runs, "load_s": time.perf_counter() - start}))
""")


@pytest.mark.slow
def test_a_second_load_rebuilds_and_recompiles_nothing(load_engine, tmp_path):
    from conftest import ENGINE_SETTINGS
    from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

    checkpoint = tiny_checkpoint("moe")
    load_engine(checkpoint)  # this session's load: MAX's cache and the kernel cache now hold everything
    built = sorted(kernels.kernel_cache_dir().glob("qwen3vl_moe_*.mojoc"))
    assert {kernels.kernel_extension(name) for name in ("attention", "text", "vision")} <= set(built)
    stamps = {p: p.stat().st_mtime_ns for p in built}

    script = tmp_path / "second_load.py"
    script.write_text(_SECOND_LOAD)
    # MAX's cache logging prints one "findSyncImpl: cache hit" or "... miss" line per compile
    env = dict(os.environ, MODULAR_ENABLE_CACHE_LOGGING="1")
    run = subprocess.run([sys.executable, str(script), str(checkpoint), json.dumps(ENGINE_SETTINGS)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["mojo_runs"] == [], f"the second load ran mojo: {result['mojo_runs']}"
    assert {p: p.stat().st_mtime_ns for p in built} == stamps, "a built package was rewritten"
    lookups = [line for line in run.stderr.splitlines() if "findSyncImpl:" in line]
    assert lookups and all("cache hit" in line for line in lookups), "\n".join(lookups) or run.stderr[-4000:]
