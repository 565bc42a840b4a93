"""The benchmark's command line and driver (see ``__init__.py`` for what is measured and how)."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

E2E_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(E2E_DIR))  # sibling modules, also when run as `python -m` from elsewhere
sys.path.insert(1, str(E2E_DIR.parents[1] / "python"))
os.environ.setdefault("MODULAR_TELEMETRY_ENABLED", "0")

import floor
import llamacpp
import protocol
import report
from workers import HF_IMPLS, WORKERS, OursWorker, hide_torch, image_448, is_gpu

ALL_CONTENDERS = ("ours", *(f"hf:{i}" for i in HF_IMPLS), *(f"llama:{t}" for t in llamacpp.WEIGHT_TYPES))
GROUPS = {"hf": [f"hf:{i}" for i in HF_IMPLS], "llama": [f"llama:{t}" for t in llamacpp.WEIGHT_TYPES]}
BENCHES = ("long", "batch", "vision")
GREEDY_PROMPT, GREEDY_TOKENS = "The quick brown fox jumps over the lazy dog.", 24


def parse_contenders(text: str) -> list[str]:
    names: list[str] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        for name in GROUPS.get(item, [item]):
            if name not in ALL_CONTENDERS:
                raise argparse.ArgumentTypeError(
                    f"unknown contender {item!r}; choose from {', '.join(ALL_CONTENDERS)}, hf, llama")
            if name not in names:
                names.append(name)
    return [n for n in ALL_CONTENDERS if n in names]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/e2e", description="End-to-end benchmark: this package vs transformers and llama.cpp.")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--devices", default="cpu", help="cpu, gpu, gpu:0 (default cpu)")
    parser.add_argument("--encoding", choices=["float32", "bfloat16"],
                        help="ours' and transformers' dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--preset", default="medium", help="tiny checkpoint preset (default medium)")
    parser.add_argument("--model-path", help="a checkpoint directory instead of the preset")
    parser.add_argument("--contenders", type=parse_contenders, default=list(ALL_CONTENDERS),
                        help=f"comma separated, from {', '.join(ALL_CONTENDERS)}; hf and llama name their "
                             "groups (default: all)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, help="default 64 (--quick: 16)")
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, help="default 5 (--quick: 2)")
    parser.add_argument("--no-cold-compile", action="store_true", help="skip the cold compile measurement")
    parser.add_argument("--quick", action="store_true",
                        help="defaults to --repeats 2 --new-tokens 16 --no-cold-compile")
    parser.add_argument("--llama-build", help="an existing llama.cpp build directory with llama-bench, "
                        "llama-batched-bench and llama-mtmd-cli in bin/ (default $QWEN3VL_LLAMA_BUILD, else "
                        "built on first use under $QWEN3VL_MOE_CACHE/llama.cpp)")
    parser.add_argument("--kv-cache-format", default=None, choices=["float32", "bfloat16"],
                        help="our KV cache's dtype (MAX's kv_cache_format; default: the compute dtype, which "
                             "gives transformers' logits; bfloat16 halves its bytes on a float32 model)")
    parser.add_argument("--llama-kv-type", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                        help="llama.cpp's KV cache type (default f16, llama.cpp's own default)")
    parser.add_argument("--llama-repack", choices=["on", "off"], default="on",
                        help="llama.cpp's weight repacking (its extra CPU buffer types, AMX included; default on, "
                             "llama.cpp's default; off where its repacked kernels crash)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="llama.cpp threads (default: all cores)")
    parser.add_argument("--tag", help="appended to the result file name (e.g. contended)")
    parser.add_argument("--out", help="JSON path (default bench/results/e2e-<device>[-quick]-<date>[-<tag>].json)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.new_tokens = args.new_tokens or (16 if args.quick else 64)
    args.no_cold_compile = args.no_cold_compile or args.quick
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode is timed after the first token)")
    if is_gpu(args.devices) and any(c.startswith("llama:") for c in args.contenders):
        parser.error("llama.cpp is built for the CPU here; leave it out with --contenders on a GPU")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        if WORKERS[args.worker] is OursWorker:
            hide_torch()
        protocol.serve(WORKERS[args.worker], json.loads(args.spec), one_shot=args.worker == "compile")
        return
    encoding = args.encoding or ("bfloat16" if is_gpu(args.devices) else "float32")

    if args.model_path:
        model_path = Path(args.model_path)
    else:
        from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

        t = time.perf_counter()
        model_path = tiny_checkpoint(args.preset)
        print(f"checkpoint {model_path} ({time.perf_counter() - t:.1f} s)", flush=True)
    config = json.loads((model_path / "config.json").read_text())
    tc = floor.text_config(config)

    import numpy as np

    # Ordinary tokens only: ids below the first added (special) token.
    tokenizer = json.loads((model_path / "tokenizer.json").read_text())
    added = [tok["id"] for tok in tokenizer.get("added_tokens", [])]
    ordinary = min(added) if added else tc["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, ordinary, size=args.prompt_len).tolist()
    batch_prompts = rng.integers(0, ordinary, size=(args.batch, args.batch_prompt_len)).tolist()

    log_dir = Path(tempfile.mkdtemp(prefix="qwen3vl-e2e-"))
    spec = {
        "model_path": str(model_path), "devices": args.devices, "encoding": encoding,
        "max_length": max(args.prompt_len, args.batch_prompt_len, 1024) + args.new_tokens,
        "max_batch_size": args.batch, "image_size": args.image_size, "kv_cache_format": args.kv_cache_format,
    }
    started = _dt.datetime.now()
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec")},
        "model_path": str(model_path), "encoding": encoding, "devices": args.devices,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu": report.cpu_description(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "versions": report.versions(),
        "config": {"text": {k: tc.get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "vocab_size")},
            "vision": {k: config.get("vision_config", {}).get(k) for k in (
                "depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size")}},
        "param_count": report.param_count(model_path),
    }
    print(f"{result['param_count']:,} parameters; {encoding} on {args.devices}; contenders "
          f"{', '.join(args.contenders)}; load average {os.getloadavg()[0]:.2f}; logs in {log_dir}", flush=True)

    llama_contenders = prepare_llama(args, model_path, spec, log_dir, result)

    bandwidth = [floor.memory_bandwidth(args.devices)]
    print(f"memory bandwidth {bandwidth[0]['gb_s']:.1f} GB/s ({bandwidth[0]['where']})", flush=True)

    env = dict(os.environ, MODULAR_TELEMETRY_ENABLED="0")
    want_ours = "ours" in args.contenders
    hf_impls = [c.split(":", 1)[1] for c in args.contenders if c.startswith("hf:")]
    compile_info = measure_compile(args, spec, env, log_dir) if want_ours else {}

    workers: dict[str, protocol.Worker] = {}
    contenders: list[protocol.Contender] = []
    ops = {"long": ("generate", {"prompts": [prompt], "new_tokens": args.new_tokens}),
           "batch": ("generate", {"prompts": batch_prompts, "new_tokens": args.new_tokens}),
           "vision": ("vision", {})}

    def in_worker(worker: protocol.Worker, **extra: Any) -> Any:
        return lambda bench: worker.call(ops[bench][0], **ops[bench][1], **extra)

    try:
        if want_ours:
            print("loading ours ...", flush=True)
            workers["ours"] = protocol.Worker("ours", "ours", spec, env, log_dir)
            setup = workers["ours"].hello["setup"]
            compile_info["cached"] = setup
            print(f"  {setup['load_s']:.1f} s to load (MAX: {setup['max_timer_log']})", flush=True)
            contenders.append(protocol.Contender("ours", in_worker(workers["ours"]), workers["ours"]))
        if hf_impls:
            print("loading transformers ...", flush=True)
            workers["hf"] = protocol.Worker("hf", "hf", spec, env, log_dir)
            print(f"  {workers['hf'].hello['setup']['load_s']:.1f} s to load; {workers['hf'].hello['setup']}",
                  flush=True)
            for impl in hf_impls:
                contenders.append(protocol.Contender(f"hf:{impl}", in_worker(workers["hf"], impl=impl), workers["hf"]))
        contenders += [protocol.Contender(c.name, c.run) for c in llama_contenders]
        if "hf" in workers and any(c.weight_type == "f32" for c in llama_contenders):
            result["llama"]["greedy_check"] = greedy_check(
                workers["hf"], next(c for c in llama_contenders if c.weight_type == "f32"), list(workers.values()))

        protocol.run_rounds(contenders, list(workers.values()), list(BENCHES), args.warmup, args.repeats,
                            lambda label, cs: print(f"  {label}  " + "  ".join(progress(c, args.batch) for c in cs),
                                                    flush=True))
        rss = {name: w.close()["rss_bytes"] for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()
    for c in llama_contenders:
        rss[c.name] = c.peak_rss_bytes
        result["llama"]["rss_by_tool"][c.name] = c.rss
        result["llama"]["tools"][c.name] = c.info
    bandwidth.append(floor.memory_bandwidth(args.devices))

    metrics = {c.name: report.metrics(c.samples, args.prompt_len,
                                      rss["hf" if c.name.startswith("hf:") else c.name]) for c in contenders}
    gb_s = max(b["gb_s"] for b in bandwidth)
    result.update(
        bandwidth=bandwidth, bandwidth_gb_s=gb_s, compile=compile_info, metrics=metrics,
        decode_floor=decode_floors(args, config, encoding, gb_s, metrics, llama_contenders),
        experts_hit_bN=floor.experts_hit(tc, args.batch) if tc.get("num_experts") else 0.0,
        hf_setup=workers["hf"].hello["setup"] if "hf" in workers else None,
        wall_s=time.perf_counter() - t_start,
    )
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["targets"] = report.judge(metrics, result["decode_floor"], encoding)

    table, markdown = report.render(result, args)
    print(f"\n{table}\n\n{markdown}")
    device_tag = "gpu" if is_gpu(args.devices) else "cpu"
    name = f"e2e-{device_tag}{'-quick' if args.quick else ''}-{started:%Y-%m-%d}{'-' + args.tag if args.tag else ''}"
    out = Path(args.out) if args.out else E2E_DIR.parent / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["markdown"] = markdown
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} ({result['wall_s'] / 60:.1f} min; logs in {log_dir})")


def prepare_llama(args: argparse.Namespace, model_path: Path, spec: dict[str, Any], log_dir: Path,
                  result: dict[str, Any]) -> list[llamacpp.LlamaContender]:
    """Locates (or builds) llama.cpp and converts the checkpoint for each llama contender; before any worker loads."""
    types = [c.split(":", 1)[1] for c in args.contenders if c.startswith("llama:")]
    if not types:
        return []
    llama = llamacpp.LlamaCpp.locate(args.llama_build, say=lambda s: print(s, flush=True))
    image_path = log_dir / f"image-{args.image_size}.png"
    image_448(args.image_size).save(image_path)
    llama_spec = {"threads": args.threads, "kv_type": args.llama_kv_type, "repack": args.llama_repack == "on", "prompt_len": args.prompt_len,
                  "new_tokens": args.new_tokens, "batch": args.batch, "batch_prompt_len": args.batch_prompt_len,
                  "image_path": str(image_path)}
    convert_log = log_dir / "convert.log"
    contenders = []
    for weight_type in types:
        t = time.perf_counter()
        text = llama.gguf(model_path, weight_type, convert_log)
        mmproj = llama.gguf(model_path, "f32", convert_log, mmproj=True) if weight_type == "f32" else None
        print(f"llama.cpp {weight_type}: {text} ({time.perf_counter() - t:.0f} s)", flush=True)
        contenders.append(llamacpp.LlamaContender(llama, weight_type, text, mmproj, llama_spec, log_dir))
    result["llama"] = {**llama.describe(), "kv_type": args.llama_kv_type, "repack": args.llama_repack,
                       "threads": args.threads,
                       "gguf": {c.name: str(c.text_gguf) for c in contenders},
                       "mmproj": next((str(c.mmproj_gguf) for c in contenders if c.mmproj_gguf), None),
                       "rss_by_tool": {}, "tools": {}}
    return contenders


def measure_compile(args: argparse.Namespace, spec: dict[str, Any], env: dict[str, str],
                    log_dir: Path) -> dict[str, Any]:
    """Our compile times as MAX's timer logs them: cold (empty caches) or warming the default cache.

    Either way the compile runs in a process of its own, so that the measured
    worker only loads cached graphs (a compile in it would count its peak
    memory as the model's).
    """
    info: dict[str, Any] = {}
    if not args.no_cold_compile:
        cache_dir = log_dir / "modular-cache"
        (cache_dir / "tmp").mkdir(parents=True)
        cold_env = dict(env, MODULAR_CACHE_DIR=str(cache_dir), TMPDIR=str(cache_dir / "tmp"))  # TMPDIR: MAX's
        print("cold compile (empty MODULAR_CACHE_DIR) ...", flush=True)                   # precompiled Mojo packages
        cold = protocol.Worker("compile-cold", "compile", spec, cold_env, log_dir)
        cold.proc.wait()
        info["cold"] = {**cold.hello["setup"], "rss_bytes": cold.hello["rss_bytes"]}
        info["cache_dir_files"] = sum(1 for p in cache_dir.rglob("*") if p.is_file())
        shutil.rmtree(cache_dir, ignore_errors=True)
        print(f"  {info['cold']['load_s']:.1f} s to load and compile (MAX: {info['cold']['max_timer_log']})",
              flush=True)
    print("warming the compile cache ...", flush=True)
    warm = protocol.Worker("compile-warm", "compile", spec, env, log_dir)
    warm.proc.wait()
    info["default_cache"] = {**warm.hello["setup"], "rss_bytes": warm.hello["rss_bytes"]}
    return info


def greedy_check(hf: protocol.Worker, llama_f32: llamacpp.LlamaContender,
                 workers: list[protocol.Worker]) -> dict[str, Any]:
    """llama.cpp F32's greedy text against transformers' on a short plain prompt (a sanity check, not a test)."""
    theirs = hf.call("greedy_text", text=GREEDY_PROMPT, new_tokens=GREEDY_TOKENS)
    for w in workers:
        w.pause()
    try:
        text = llama_f32.greedy_text(GREEDY_PROMPT, GREEDY_TOKENS)
    finally:
        for w in workers:
            w.resume()
    expected = theirs["text"] + ("\n" if theirs["stopped_at_eos"] else "")  # the CLI's newline at end of generation
    check = {"prompt": GREEDY_PROMPT, "new_tokens": GREEDY_TOKENS, "transformers_ids": theirs["ids"],
             "transformers_stopped_at_eos": theirs["stopped_at_eos"], "transformers": theirs["text"],
             "llama.cpp": text, "identical": text == expected}
    print(f"greedy check, llama.cpp F32 vs transformers: {'identical' if check['identical'] else 'DIFFERENT'} "
          f"({theirs['text']!r} / {text!r})", flush=True)
    return check


def decode_floors(args: argparse.Namespace, config: dict[str, Any], encoding: str, gb_s: float,
                  metrics: dict[str, Any], llama_contenders: list[llamacpp.LlamaContender]) -> dict[str, Any]:
    """Per contender, the weights one decode step reads (batch 1 and batch N) over the run's bandwidth."""
    floors: dict[str, Any] = {}
    dtype_bytes = 4 if encoding == "float32" else 2
    # Ours keeps a bfloat16 checkpoint's text matrices bfloat16 under float32 compute on CPU.
    stored = config.get("torch_dtype") or config.get("dtype") or config.get("text_config", {}).get("dtype")
    ours_bytes = 2 if stored == "bfloat16" and not is_gpu(args.devices) else dtype_bytes
    for name in metrics:
        if name.startswith("llama:"):
            c = next(c for c in llama_contenders if c.name == name)
            counts = {key: floor.gguf_active_bytes(c.text_gguf, config, b, c.llama.source_dir / "gguf-py")
                      for key, b in (("b1", 1), ("bN", args.batch))}
        else:
            per_param = ours_bytes if name == "ours" else dtype_bytes
            counts = {key: floor.active_bytes(config, per_param, b) for key, b in (("b1", 1), ("bN", args.batch))}
        floors[name] = {key: {**ab, **floor.floor_at(ab["bytes"], ab["batch"], gb_s)} for key, ab in counts.items()}
    return floors


def progress(c: protocol.Contender, batch: int) -> str:
    long, bat, vision = (c.last[b] for b in BENCHES)
    vision_ms = 1e3 * vision["s"]
    return (f"{c.name}: prefill {long['prefill_s']:.2f}s b1 {long['decode_tok_s']:.1f} "
            f"b{batch} {bat['decode_tok_s']:.1f} tok/s vision {vision_ms:.0f}ms")


if __name__ == "__main__":
    main()
