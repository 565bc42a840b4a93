"""Shared test setup: offline, no telemetry, tiny checkpoints made locally,
one loaded engine per checkpoint and settings, and one OpenAI-compatible
server per test session.

Loading an engine compiles its graphs (minutes when MAX's cache is cold, tens
of seconds from the cache), so test modules that need the same checkpoint
with the same settings share one through ``load_engine``.

The server (``qwen3vl-moe serve`` on the tiny checkpoint, 127.0.0.1, a free
port) is shared by test_serve.py and test_serve_robustness.py: its graphs
compile once, minutes when MAX's cache is cold.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MODULAR_TELEMETRY_ENABLED", "0")

SERVER_MAX_LENGTH = 2048
# The one host the server may fetch media from, for tests that run a local image host.
MEDIA_HOST = "localhost"
MEDIA_FETCH_DEADLINE_S = 6  # short, so the slow-host test is quick


# Set in the C environment (not os.environ) by Mojo's Python interop when MAX
# loads a custom architecture in-process; a later `sys.executable` subprocess
# would then start as the base interpreter, outside the venv
# (PYTHONEXECUTABLE=~/.pyenv/shims/python3, PYTHONPATH=":").
_INTEROP_ENVIRONMENT = ("PYTHONEXECUTABLE", "PYTHONPATH", "PYTHONHOME", "MOJO_PYTHON_LIBRARY")


@pytest.fixture(autouse=True)
def _subprocesses_see_os_environ():
    """After each test, the process environment subprocesses inherit is os.environ again."""
    yield
    for name in _INTEROP_ENVIRONMENT:
        if name in os.environ:
            os.putenv(name, os.environ[name])
        else:
            os.unsetenv(name)


# The settings the model tests load engines with (max_length covers the largest test prompt).
ENGINE_SETTINGS = {"max_length": 1024, "max_batch_size": 4, "echo": True}


@pytest.fixture(scope="session")
def load_engine():
    """``load_engine(checkpoint)``: this session's CPU engine for ``checkpoint`` with ENGINE_SETTINGS."""
    engines = {}

    def load(checkpoint):
        from qwen3vl_moe.api import Qwen3VL

        key = str(checkpoint)
        if key not in engines:
            engines[key] = Qwen3VL(checkpoint, devices="cpu", **ENGINE_SETTINGS)
        return engines[key]

    return load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A running server: its base URL, process, log, and the folder file:// URLs may read."""

    url: str
    process: subprocess.Popen
    log: Path
    media_root: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


@pytest.fixture(scope="session")
def running_server(tmp_path_factory) -> Server:
    import requests

    port = free_port()
    folder = tmp_path_factory.mktemp("serve")
    media_root = folder / "media"
    media_root.mkdir()
    log = folder / "server.log"
    env = dict(
        os.environ,
        MAX_SERVE_ALLOWED_IMAGE_ROOTS=f'["{media_root}"]',
        MAX_SERVE_MEDIA_URL_ALLOWED_HOSTS=f'["{MEDIA_HOST}"]',
        QWEN3VL_MOE_MEDIA_FETCH_DEADLINE_S=str(MEDIA_FETCH_DEADLINE_S),
    )
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwen3vl_moe.cli", "serve", "--port", str(port),
             "--max-length", str(SERVER_MAX_LENGTH)],  # and qwen3vl-moe serve's CPU batch size
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log, media_root)
    deadline = time.time() + 1500
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not become healthy in time")
            time.sleep(2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert "telemetry.modular.com" not in log.read_text(), "the server tried to reach the telemetry endpoint"


@pytest.fixture(scope="session")
def server(running_server) -> str:
    """The server's base URL."""
    return running_server.url


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="session")
def model_name(client) -> str:
    return client.models.list().data[0].id
