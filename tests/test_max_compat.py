"""The compat module's own machinery (what does not need a graph)."""

from __future__ import annotations

import sys

from qwen3vl_moe.max_compat import patch_when_imported


def test_a_patch_runs_once_the_module_is_imported(tmp_path, monkeypatch):
    (tmp_path / "qwen3vl_compat_probe.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "qwen3vl_compat_probe", raising=False)
    seen = []

    def patch(module):
        seen.append(module.VALUE)
        module.VALUE = 2

    patch_when_imported("qwen3vl_compat_probe", patch)
    patch_when_imported("qwen3vl_compat_probe", patch)   # registered once
    assert seen == [] and "qwen3vl_compat_probe" not in sys.modules
    import qwen3vl_compat_probe

    assert seen == [1] and qwen3vl_compat_probe.VALUE == 2
    assert not any(getattr(f, "name", None) == "qwen3vl_compat_probe" for f in sys.meta_path)   # one-shot
    patch_when_imported("qwen3vl_compat_probe", lambda m: seen.append("now"))   # already imported: at once
    assert seen == [1, "now"]
    del sys.modules["qwen3vl_compat_probe"]


def test_the_server_hooks_wait_for_the_server_modules():
    """Importing the architecture (every model load) does not import MAX's server (~1 s),
    and the hooks are in place once the server module is imported."""
    import subprocess

    code = (
        "import sys, qwen3vl_moe.arch\n"
        "assert 'max._entrypoints.cli.serve.serve_api_and_model_worker' not in sys.modules\n"
        "assert 'max.serve.router.openai_routes' not in sys.modules\n"
        "from max._entrypoints.cli.serve import serve_api_and_model_worker as entry\n"
        "from max.serve.router import openai_routes\n"
        "assert entry.fastapi_app._qwen3vl_moe_installs\n"
        "assert openai_routes.resolve_image_from_url._qwen3vl_moe\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
