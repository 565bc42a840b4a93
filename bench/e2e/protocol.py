"""Worker subprocesses and the interleaved, one-at-a-time timing protocol.

A worker (``ours``, ``hf``) is this directory run with ``--worker KIND``: it
reads one JSON command per stdin line and answers one JSON line on its
original stdout (library output goes to its log). The driver holds a
:class:`Worker` per process and times contenders round-robin, stopping every
other worker while one runs (:func:`run_rounds`).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

E2E_DIR = Path(__file__).resolve().parent
REPO = E2E_DIR.parents[1]


def peak_rss_bytes() -> int:
    """This process's peak RSS.

    On Linux, VmHWM of /proc/self/status: ``getrusage(RUSAGE_SELF).ru_maxrss``
    keeps the high-water mark of the parent across fork + exec, so a worker
    would report at least the driver's peak (its 1 GiB bandwidth buffers).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def serve(make_worker: Callable[[dict[str, Any]], Any], spec: dict[str, Any], one_shot: bool) -> None:
    """The worker side: builds the worker, then serves commands until ``exit`` (or returns at once if ``one_shot``)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to the log, not into the protocol
    sys.stdout = os.fdopen(1, "w", buffering=1)

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        worker = make_worker(spec)
    except BaseException as exc:  # report, then die
        reply({"error": f"{type(exc).__name__}: {exc}"})
        raise
    reply({"ready": True, "setup": worker.setup, "rss_bytes": peak_rss_bytes()})
    if one_shot:
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "exit":
                reply({"rss_bytes": peak_rss_bytes()})
                return
            reply(getattr(worker, op)(**cmd))
        except BaseException as exc:
            reply({"error": f"{type(exc).__name__}: {exc}"})
            raise


class Worker:
    """A worker subprocess, driven one command at a time."""

    def __init__(self, name: str, kind: str, spec: dict[str, Any], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(E2E_DIR), "--worker", kind, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO,
        )
        self.hello = self._read()

    def _read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"worker {self.name} died (rc {self.proc.returncode}); log {self.log_path}:\n"
                               + tail(self.log_path))
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"worker {self.name}: {reply['error']}; log {self.log_path}:\n" + tail(self.log_path))
        return reply

    def call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def pause(self) -> None:
        """Stops the process (POSIX) so that its runtime threads cannot slow a timed call elsewhere."""
        if hasattr(signal, "SIGSTOP") and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if hasattr(signal, "SIGCONT") and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> dict[str, Any]:
        reply = self.call("exit")
        self.proc.stdin.close()
        self.proc.wait(timeout=120)
        self.log.close()
        return reply

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.kill()
            self.proc.wait()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Contender:
    """One column of the results: runs a named benchmark, inside ``owner`` (a worker) or in processes of its own."""

    name: str
    run: Callable[[str], dict[str, Any]]
    owner: Worker | None = None
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)  # the latest result per bench, warm-up included


def run_rounds(contenders: list[Contender], workers: list[Worker], benches: list[str],
               warmup: int, repeats: int, progress: Callable[[str, list[Contender]], None]) -> None:
    """``warmup + repeats`` rounds; in each, every bench on every contender in turn, the other workers stopped.

    Samples of the rounds after the warm-up go to ``contender.samples[bench]``.
    """
    for c in contenders:
        c.samples = {b: [] for b in benches}
    for r in range(warmup + repeats):
        label = "warmup" if r < warmup else f"round {r - warmup + 1}/{repeats}"
        t_round = time.perf_counter()
        for bench in benches:
            for c in contenders:
                others = [w for w in workers if w is not c.owner]
                for w in others:
                    w.pause()
                try:
                    out = c.run(bench)
                finally:
                    for w in others:
                        w.resume()
                c.last[bench] = out
                if r >= warmup:
                    c.samples[bench].append(out)
        progress(f"{label}: {time.perf_counter() - t_round:.1f} s", contenders)
