"""Cached start-up: how long ``Qwen3VL(...)`` takes when MAX's cache already holds the graphs.

    python bench/startup.py                                   # medium preset, float32 and bfloat16 weights
    python bench/startup.py --weights float32 --runs 5
    python bench/startup.py --model-path /path/to/checkpoint --runs 3

Issue 14's target is a cached load of at most 5 s. Each run is a fresh Python
process (as ``serve`` and ``generate`` start), timed in two parts: importing
the Python API (``qwen3vl_moe.api``: MAX's pipelines, tokenizers, ...), and
the load itself, ``Qwen3VL(...)`` (architecture import, weights, graph trace,
compile taken from MAX's cache, MAX's sampler graph). Inside the load it also
times this package's weight conversion and, within it, the packing of the
experts into the CPU kernels' panels. A first process warms the caches and
is not counted. Prints medians and ranges; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(model_path: str, max_length: int, max_batch_size: int) -> None:
    """One load, timed; prints a JSON line."""
    t0 = time.perf_counter()
    import qwen3vl_moe.weight_adapters as adapters

    parts = {"convert_s": 0.0, "panels_s": 0.0}

    def timed(name: str, function):  # type: ignore[no-untyped-def]
        def run(*args, **kwargs):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                parts[name] += time.perf_counter() - t
        return run

    # Bound before the architecture module imports the adapter (inside the load).
    adapters.convert_qwen3vl_model_state_dict = timed("convert_s", adapters.convert_qwen3vl_model_state_dict)
    adapters._experts_as_cpu_panels = timed("panels_s", adapters._experts_as_cpu_panels)
    from qwen3vl_moe.api import Qwen3VL

    t1 = time.perf_counter()
    Qwen3VL(model_path, devices="cpu", max_length=max_length, max_batch_size=max_batch_size)
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, **parts}), flush=True)


def run_child(model_path: str, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, MODULAR_TELEMETRY_ENABLED="0")
    out = subprocess.run(
        [sys.executable, __file__, "--child", model_path, "--max-length", str(args.max_length),
         "--max-batch-size", str(args.max_batch_size)],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"load of {model_path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--weights", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--model-path", help="a checkpoint directory instead of the preset (--weights ignored)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1088)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--out", help="JSON path")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.max_length, args.max_batch_size)
        return

    sys.path.insert(0, str(REPO / "bench"))
    from e2e.report import cpu_description
    from qwen3vl_moe.checkpoints.convert import bfloat16_checkpoint
    from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

    if args.model_path:
        paths = {Path(args.model_path).name: args.model_path}
    else:
        paths = {w: str(tiny_checkpoint(args.preset) if w == "float32" else bfloat16_checkpoint(args.preset))
                 for w in args.weights.split(",")}
    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for name, path in paths.items():
        print(f"{name}: warming MAX's cache ({path}) ...", flush=True)
        run_child(path, args)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in paths}
    for i in range(args.runs):  # interleaved, so that a noisy moment hits every configuration
        for name, path in paths.items():
            runs[name].append(run_child(path, args))
            r = runs[name][-1]
            print(f"  run {i + 1} {name}: import {r['import_s']:.2f} s, load {r['load_s']:.2f} s "
                  f"(weights {r['convert_s']:.2f} s, of it expert panels {r['panels_s']:.2f} s)", flush=True)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {k: {"median": statistics.median(r[k] for r in rs), "min": min(r[k] for r in rs),
                             "max": max(r[k] for r in rs)} for k in rs[0]}
        s = summary[name]
        print(f"{name}: cached load median {s['load_s']['median']:.2f} s "
              f"({s['load_s']['min']:.2f}-{s['load_s']['max']:.2f}), import {s['import_s']['median']:.2f} s, "
              f"target <= 5 s: {'met' if s['load_s']['median'] <= 5 else 'not met'}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_description(), "args": vars(args),
            "paths": paths, "runs": runs, "summary": summary, "loadavg_end": os.getloadavg(),
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
