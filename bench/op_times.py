"""Where a decode step's graph time goes, op by op (CPU), from MAX's own op log.

    python bench/op_times.py --weights bfloat16 --filler-words 100 --runs 40

MAX 26.7 logs every op it launches and completes (``MODULAR_DEBUG=op-log-level=TRACE``:
``[OP] LAUNCH name [id=N]`` / ``[OP] COMPLETE ...`` on stderr), without timestamps.
This runs the decoder graph alone on one decode step's inputs (as ``decode_step.py``
does), with stderr in a file and ``perf record -e syscalls:sys_enter_write`` on the
process, so each log line gets the time of its write. Each op's share of a step is
the time it was running, split evenly with any op running beside it; the table sums
it per op name. Needs ``perf`` with tracepoint access (root, or
``kernel.perf_event_paranoid <= 1``). The op log's writes slow a step by ~10%
(about 280 lines a step at medium's 8 layers); the shares are what to compare.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOG_ENV = "op-log-level=TRACE"
MARK = "MARK"


def _measure(args: argparse.Namespace, perf_data: Path) -> float:
    """Runs the decoder graph ``args.runs`` times under the op log and perf; median graph ms."""
    from decode_step import decode_step_inputs  # bench/ is on sys.path when run as a script

    from qwen3vl_moe.api import Qwen3VL
    from qwen3vl_moe.checkpoints.convert import bfloat16_checkpoint
    from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

    path = bfloat16_checkpoint(args.preset) if args.weights == "bfloat16" else tiny_checkpoint(args.preset)
    engine = Qwen3VL(path, devices="cpu", max_length=512 + 8 * args.filler_words, max_batch_size=args.batch)
    decoder, inputs = decode_step_inputs(engine, args.batch, args.filler_words)
    for _ in range(10):
        decoder.execute(*inputs)
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "syscalls:sys_enter_write", "-p", str(os.getpid()),
                             "-o", str(perf_data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # perf attaches
    times = []
    for _ in range(args.runs):
        os.write(2, f"{MARK}\n".encode())
        t0 = time.perf_counter()
        decoder.execute(*inputs)
        times.append(time.perf_counter() - t0)
        time.sleep(0.002)
    os.write(2, f"{MARK}\n".encode())
    time.sleep(0.5)
    perf.send_signal(signal.SIGINT)
    perf.wait(timeout=60)
    return 1e3 * sorted(times)[len(times) // 2]


def _write_times(perf_data: Path) -> list[tuple[float, int]]:
    """(seconds, bytes) of every write(2, ...) perf recorded, in order."""
    script = subprocess.run(["perf", "script", "-i", str(perf_data)], capture_output=True, text=True, check=True)
    pattern = re.compile(r"(\d+\.\d+): syscalls:sys_enter_write: fd: 0x0*2, .*count: (0x[0-9a-f]+)")
    return [(float(m.group(1)), int(m.group(2), 16)) for m in map(pattern.search, script.stdout.splitlines()) if m]


def op_shares(lines: list[str], writes: list[tuple[float, int]]) -> tuple[int, dict[str, list[float]]]:
    """Runs seen and, per op name, [ms running (shared evenly with concurrent ops), calls]."""
    start = lines.index(MARK)
    first = next(i for i, (_, n) in enumerate(writes) if n == len(MARK) + 1)
    lines, writes = lines[start:], writes[first:]
    running: dict[str, str] = {}
    shares: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    runs, last = 0, None
    for line, (t, _) in zip(lines, writes):
        if last is not None and running:
            for name in running.values():
                shares[name][0] += 1e3 * (t - last) / len(running)
        last = t
        if line == MARK:
            runs += 1
            running.clear()
            continue
        m = re.match(r"\[OP\] (LAUNCH|COMPLETE) (.*) \[id=(\d+)\]", line)
        if not m:
            continue
        kind, name, op_id = m.groups()
        name = re.sub(r"\s+", " ", name)
        if kind == "LAUNCH":
            running[op_id] = name
            shares[name][1] += 1
        else:
            running.pop(op_id, None)
    return runs - 1, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--weights", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--filler-words", type=int, default=100,
                        help="words added to the prompt (~100: a ~500-token cache, as the e2e's decode)")
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # the measuring process: MAX reads MODULAR_DEBUG when it starts
        work = Path(args.child)
        print(_measure(args, work / "perf.data"), file=sys.stdout, flush=True)
        return
    if shutil.which("perf") is None:
        sys.exit("op_times.py needs `perf` (linux-tools)")
    with tempfile.TemporaryDirectory(prefix="op-times-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, MODULAR_DEBUG=LOG_ENV)
        with open(work / "ops.log", "w") as log:
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", tmp], env=env,
                                   stderr=log, stdout=subprocess.PIPE, text=True)
        if child.returncode != 0:
            sys.exit(f"measuring process failed ({child.returncode}); its stderr: {work / 'ops.log'}")
        graph_ms = float(child.stdout.strip().splitlines()[-1])
        runs, shares = op_shares((work / "ops.log").read_text().splitlines(), _write_times(work / "perf.data"))
    total = sum(ms for ms, _ in shares.values())
    print(f"{args.preset}, {args.weights} weights, batch {args.batch}, {args.filler_words} filler words: "
          f"graph {graph_ms:.2f} ms a step under the op log (median of {args.runs}); ops running {total / runs:.2f} ms")
    print(f"{'ms/step':>8} {'calls':>6} {'us/call':>8}  op")
    for name, (ms, calls) in sorted(shares.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{ms / runs:8.3f} {calls / runs:6.1f} {1e3 * ms / max(calls, 1):8.1f}  {name[:100]}")


if __name__ == "__main__":
    main()
