"""Where a decode step's time goes: the compiled graph vs MAX's pipeline around it.

    python bench/decode_step.py --preset medium --weights bfloat16,float32 --batch 1,8 --repeats 5
    python bench/decode_step.py --placements 10:float,5:pin   # MAX's CPU workers placed two ways

Loads an engine per weight dtype through the Python API (``qwen3vl_moe.api.Qwen3VL``) and
times, per decode step (prefill excluded), the whole ``pipeline.execute`` and
its parts: batch preparation (KV cache inputs, ``prepare_initial_token_inputs``),
the model's ``execute`` (and inside it the decoder graph), the sampler graph,
and the rest (sampling set-up, the token's copy to host, context and KV cache
updates). Then it runs the decoder graph alone, again and again on the last
step's inputs, which is the floor the pipeline adds to. Engines, batch sizes and
worker placements are measured in interleaved rounds in one process.

Timing the parts reaches into MAX 26.7's text pipeline (measurement only,
nothing here changes what runs): its ``prepare_batch``, ``kv_manager`` and
``_sampler_without_bitmask``, the module globals ``FusedSamplingProcessor``
and ``update_context_and_prepare_responses`` of
``max.pipelines.lib.pipeline_variants.text_generation``, and the pipeline
model's ``_models`` dict, which its ``language_model`` property reads.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from max.pipelines.lib.graph_specs import GraphRole
from max.pipelines.lib.pipeline_variants import text_generation

from e2e.report import cpu_description  # bench/ is on sys.path when run as a script
from qwen3vl_moe.api import Qwen3VL
from qwen3vl_moe.checkpoints.convert import bfloat16_checkpoint
from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint
from qwen3vl_moe.cpu_threads import cpu_workers
from qwen3vl_moe.max_compat import pipeline_model_of

TOPICS = ("rivers", "prime numbers", "bread", "glaciers", "chess openings", "owls", "tides", "violins")


def prompts(batch: int, filler_words: int = 0) -> list[list[dict[str, str]]]:
    """One distinct prompt per row: identical rows would pick the same experts at every
    step and read the expert weights of one row, understating a real batch.
    ``filler_words`` lengthens each prompt, so that decode attends over a longer cache."""
    filler = " ".join(TOPICS[j % len(TOPICS)].split()[0] for j in range(filler_words))
    return [[{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % len(TOPICS)]} ({i}). {filler}"}]
            for i in range(batch)]


class _Timed:
    """Stands in for an object whose ``execute`` is timed (a compiled ``Model`` takes no attributes)."""

    def __init__(self, inner: Any, record: Callable[[float], None]) -> None:
        self._inner, self._record = inner, record

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner.execute(*args, **kwargs)
        finally:
            self._record(time.perf_counter() - t0)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self._record(time.perf_counter() - t0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _timed_function(function: Callable[..., Any], record: Callable[[float], None]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            record(time.perf_counter() - t0)

    return timed


def _timed_method(owner: Any, name: str, record: Callable[[float], None]) -> None:
    setattr(owner, name, _timed_function(getattr(owner, name), record))


def _timed_class(cls: type, record: Callable[[float], None]) -> type:
    """A subclass whose construction is timed."""
    init = cls.__init__

    class Timed(cls):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            init(self, *args, **kwargs)
            record(time.perf_counter() - t0)

    return Timed


def step_breakdown(engine: Qwen3VL, batch: int, new_tokens: int, filler: int) -> dict[str, float]:
    """Median ms per decode step of each part (a generate of ``new_tokens`` per row)."""
    pipeline = engine.pipeline
    model = pipeline_model_of(pipeline)
    step: dict[str, float] = defaultdict(float)
    steps: list[dict[str, float]] = []

    def add(part: str) -> Callable[[float], None]:
        def record(seconds: float) -> None:
            step[part] += seconds
        return record

    _timed_method(pipeline, "prepare_batch", add("prepare_batch"))
    _timed_method(pipeline.kv_manager, "runtime_inputs", add("prepare_batch: kv_manager.runtime_inputs"))
    _timed_method(model, "prepare_initial_token_inputs", add("prepare_batch: prepare_initial_token_inputs"))
    sampling_setup = text_generation.FusedSamplingProcessor
    text_generation.FusedSamplingProcessor = _timed_class(sampling_setup, add("sampling set-up"))
    responses = text_generation.update_context_and_prepare_responses
    text_generation.update_context_and_prepare_responses = _timed_function(responses, add("context updates"))
    _timed_method(model, "execute", add("model.execute"))
    graphs = model._models  # the language_model property reads MAX's dict of compiled graphs
    graphs[GraphRole.DECODER] = _Timed(graphs[GraphRole.DECODER], add("decoder graph"))
    pipeline._sampler_without_bitmask = _Timed(pipeline._sampler_without_bitmask, add("sampler graph"))
    _timed_method(pipeline.kv_manager, "step", add("kv_manager.step"))
    execute = pipeline.execute

    def timed_execute(*args: Any, **kwargs: Any) -> Any:
        step.clear()
        t0 = time.perf_counter()
        out = execute(*args, **kwargs)
        step["pipeline.execute"] = time.perf_counter() - t0
        steps.append(dict(step))
        return out

    pipeline.execute = timed_execute
    try:
        engine.generate(prompts(batch, filler), max_new_tokens=new_tokens, ignore_eos=True)
    finally:
        for owner, name in ((pipeline, "execute"), (pipeline, "prepare_batch"), (model, "execute"),
                            (pipeline.kv_manager, "step"), (pipeline.kv_manager, "runtime_inputs"),
                            (model, "prepare_initial_token_inputs")):
            delattr(owner, name)
        text_generation.FusedSamplingProcessor = sampling_setup
        text_generation.update_context_and_prepare_responses = responses
        graphs[GraphRole.DECODER] = graphs[GraphRole.DECODER]._inner
        pipeline._sampler_without_bitmask = pipeline._sampler_without_bitmask._inner
    decode = steps[2:]  # step 0 is the prefill, step 1 the first decode
    parts = {k: 1e3 * statistics.median(s.get(k, 0.0) for s in decode) for k in decode[0]}
    parts["model.execute outside the decoder graph"] = parts["model.execute"] - parts["decoder graph"]
    parts["pipeline.execute rest"] = parts["pipeline.execute"] - sum(
        parts[k] for k in ("prepare_batch", "model.execute", "sampler graph", "kv_manager.step",
                           "sampling set-up", "context updates"))
    parts["pipeline.execute mean"] = 1e3 * statistics.fmean(s["pipeline.execute"] for s in decode)
    return {k: round(v, 3) for k, v in parts.items()}


def decode_step_inputs(engine: Qwen3VL, batch: int, filler: int) -> tuple[Any, tuple[Any, ...]]:
    """The compiled decoder graph and the inputs of one of its decode steps (a generate's third)."""
    graphs = pipeline_model_of(engine.pipeline)._models
    decoder = graphs[GraphRole.DECODER]
    captured: list[tuple[Any, ...]] = []

    class Capture:
        def execute(self, *args: Any) -> Any:
            captured.append(args)
            return decoder.execute(*args)

    graphs[GraphRole.DECODER] = Capture()
    try:
        engine.generate(prompts(batch, filler), max_new_tokens=3, ignore_eos=True)
    finally:
        graphs[GraphRole.DECODER] = decoder
    return decoder, captured[-1]


def graph_alone_ms(engine: Qwen3VL, batch: int, repeats: int, filler: int) -> dict[str, float]:
    """Median and least ms of the decoder graph run on one decode step's inputs over and over."""
    decoder, inputs = decode_step_inputs(engine, batch, filler)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        decoder.execute(*inputs)
        times.append(time.perf_counter() - t0)
    return {"median": round(1e3 * statistics.median(times), 3), "min": round(1e3 * min(times), 3)}


def set_worker_placement(placement: str) -> None:
    """``NICENESS:pin`` or ``NICENESS:float`` for every MAX CPU worker of this process.

    Lowering a niceness needs privileges (root, or CAP_SYS_NICE).
    """
    niceness, how = placement.split(":")
    allowed = sorted(os.sched_getaffinity(0))
    for index, tid in cpu_workers():
        os.setpriority(os.PRIO_PROCESS, tid, int(niceness))
        os.sched_setaffinity(tid, {allowed[index % len(allowed)]} if how == "pin" else set(allowed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="medium")
    parser.add_argument("--weights", default="bfloat16", help="comma-separated: float32, bfloat16")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes")
    parser.add_argument("--placements", default="",
                        help="comma-separated worker placements to compare, NICENESS:pin or NICENESS:float "
                             "(default: leave them as the package placed them)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--graph-repeats", type=int, default=100)
    parser.add_argument("--filler-words", type=int, default=0,
                        help="words added to each prompt (~4.6 tokens a word with the tiny tokenizer; the e2e decodes after a 512-token prompt: ~100 words)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    placements = args.placements.split(",") if args.placements else [""]
    engines = {}
    for weights in args.weights.split(","):
        path = bfloat16_checkpoint(args.preset) if weights == "bfloat16" else tiny_checkpoint(args.preset)
        engines[weights] = Qwen3VL(path, devices="cpu", max_length=512 + 8 * args.filler_words,
                                   max_batch_size=max(batches))
        engines[weights].generate(prompts(1), max_new_tokens=4, ignore_eos=True)  # warm-up
    gc.collect()
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    loads = [os.getloadavg()[0]]
    for _ in range(args.repeats):  # interleaved rounds: every configuration sees the same machine state
        for weights, engine in engines.items():
            for batch in batches:
                for placement in placements:
                    if placement:
                        set_worker_placement(placement)
                    parts = step_breakdown(engine, batch, args.new_tokens, args.filler_words)
                    alone = graph_alone_ms(engine, batch, args.graph_repeats, args.filler_words)
                    parts["decoder graph alone"], parts["decoder graph alone, least"] = alone["median"], alone["min"]
                    parts["tok/s"] = 1e3 * batch / parts["pipeline.execute mean"]
                    runs[f"{weights} weights, batch {batch}" + (f", workers {placement}" if placement else "")].append(parts)
        loads.append(os.getloadavg()[0])
    result = {
        "cpu": cpu_description(), "preset": args.preset, "new_tokens": args.new_tokens, "rounds": args.repeats,
        "filler_words": args.filler_words,
        "loadavg_1min": [round(x, 2) for x in loads],
        "medians": {name: {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
                    for name, rounds in runs.items()},
        "tok_s_rounds": {name: [round(r["tok/s"], 1) for r in rounds] for name, rounds in runs.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
