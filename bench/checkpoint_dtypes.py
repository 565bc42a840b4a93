"""Decode speed of one preset stored in float32 and in bfloat16, each loaded on CPU with no encoding flag.

Both compute in float32. The bfloat16 checkpoint keeps its text decoder's
matrices in bfloat16 (the CPU kernels read them as they are), so a decode
step reads about half the weight bytes; this measures what that buys.

    python bench/checkpoint_dtypes.py --preset medium --new-tokens 32 --repeats 3

Both engines are loaded in one process and timed in interleaved rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from e2e.report import cpu_description  # bench/ is on sys.path when run as a script
from qwen3vl_moe.api import Qwen3VL
from qwen3vl_moe.checkpoints.convert import bfloat16_checkpoint
from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

PROMPT = [{"role": "user", "content": "Count slowly from one to one hundred, one number per line."}]


def decode_tokens_per_second(engine: Qwen3VL, new_tokens: int) -> float:
    """Tokens per second past the first (which includes the prefill)."""
    t0 = time.perf_counter()
    engine.generate([PROMPT], max_new_tokens=1, ignore_eos=True)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.generate([PROMPT], max_new_tokens=new_tokens, ignore_eos=True)
    return (new_tokens - 1) / (time.perf_counter() - t0 - prefill)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    result = {"cpu": cpu_description(), "preset": args.preset, "runs": {}}
    engines = {}
    for label, path in (("float32 weights", tiny_checkpoint(args.preset)),
                        ("bfloat16 weights", bfloat16_checkpoint(args.preset))):
        t0 = time.perf_counter()
        engines[label] = Qwen3VL(path, devices="cpu", max_length=512, max_batch_size=1)
        result["runs"][label] = {"encoding": engines[label].pipeline_config.model.quantization_encoding,
                                 "load_s": round(time.perf_counter() - t0, 1), "decode_tok_s": []}
        engines[label].generate([PROMPT], max_new_tokens=4, ignore_eos=True)  # warm-up
    gc.collect()
    for _ in range(args.repeats):  # interleaved rounds: both engines see the same machine state
        for label, engine in engines.items():
            result["runs"][label]["decode_tok_s"].append(round(decode_tokens_per_second(engine, args.new_tokens), 2))
    for run in result["runs"].values():
        run["median"] = statistics.median(run["decode_tok_s"])
    result["bf16_over_f32"] = round(result["runs"]["bfloat16 weights"]["median"]
                                    / result["runs"]["float32 weights"]["median"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
