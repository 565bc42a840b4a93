"""End-to-end benchmark of this package (MAX) against transformers, measured in the same run.

    python bench/e2e.py                      # CPU, float32, the `medium` tiny preset
    python bench/e2e.py --quick              # fewer rounds and tokens, no cold compile (a few minutes)
    python bench/e2e.py --devices gpu        # bfloat16 on both sides by default
    python bench/e2e.py --model-path DIR     # any Qwen3-VL (MoE or dense) checkpoint directory

Contenders: ``ours`` (this package through MAX's pipeline), transformers with
its default ``experts_implementation="grouped_mm"`` and with ``"eager"`` (the
per-expert loop). Each side runs in its own worker subprocess (``--worker
ours|hf``), so that its peak RSS (VmHWM at the end; ``ru_maxrss`` would
inherit the driver's peak across fork + exec) is its own; both workers stay
loaded and the driver hands them one timed call at a time, round-robin, so
the load of other processes on the machine hits every contender alike. While
one worker is timed the others are stopped (SIGSTOP/SIGCONT): an idle worker
is not idle (MAX's runtime polls from a thread, ~10-25% of a core; torch
keeps threads too), and on two cores that alone slowed transformers by up to
50% in a run before this was done. The transformers worker switches between the two
experts implementations with ``model.set_experts_implementation`` (same
weights, same process). Timings are medians over ``--repeats`` rounds after
``--warmup`` rounds.

Measured:

- prefill tokens/s: a ``--prompt-len`` (512) token prompt at batch 1, up to
  the first sampled token;
- decode tokens/s at batch 1 (after that prompt) and at batch ``--batch`` (8)
  (``--batch-prompt-len`` token prompts): ``--new-tokens`` greedy tokens with
  EOS ignored, (last step - first step) / tokens after the first;
  transformers: ``generate(min_new_tokens=max_new_tokens, do_sample=False)``
  with its KV cache, steps timed by a logits processor;
- vision encoder ms per 448x448 image: ours the compiled vision graph alone,
  transformers ``model.model.visual(pixel_values, grid_thw)``;
- peak RSS of each worker;
- the decode floor: weights read per decode step (attention, router, the
  top-k experts, dense MLPs, final norm, one embedding row, lm_head; at the
  run's dtype) over the memory bandwidth measured in the same run (host: a
  1 GiB read on all cores; GPU: a 1 GiB copy); at batch B the experts are counted as the
  expected number of distinct experts that B tokens hit under uniform routing;
- our graph compile time, cold (a subprocess with a fresh empty
  ``MODULAR_CACHE_DIR`` and ``TMPDIR``, where MAX puts precompiled Mojo
  packages) and cached (the ``ours`` worker, same directories).

Prompts are random ordinary (non-special) token ids, identical for both sides.
Writes ``bench/results/e2e-<device>-<date>.json`` and prints the table as
markdown for the README.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))
os.environ.setdefault("MODULAR_TELEMETRY_ENABLED", "0")

HF_IMPLS = ("grouped_mm", "eager")
CONTENDERS = ("ours", *(f"hf:{impl}" for impl in HF_IMPLS))
LABELS = {"ours": "ours (MAX)", "hf:grouped_mm": "transformers grouped_mm", "hf:eager": "transformers eager"}
TARGETS = {"prefill": 1.5, "decode_b1": 2.0, "decode_bN": 2.0, "vision": 1.5}


# ----------------------------------------------------------------------------- helpers
def peak_rss_bytes() -> int:
    """This process's peak RSS.

    On Linux, VmHWM of /proc/self/status: ``getrusage(RUSAGE_SELF).ru_maxrss``
    keeps the high-water mark of the parent across fork + exec, so a worker
    would report at least the driver's peak (its 2 GiB bandwidth buffers).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def is_gpu(devices: str) -> bool:
    return devices.startswith("gpu")


def default_encoding(devices: str) -> str:
    return "bfloat16" if is_gpu(devices) else "float32"


def torch_device(devices: str) -> str:
    if not is_gpu(devices):
        return "cpu"
    index = devices.split(":", 1)[1].split(",")[0] if ":" in devices else "0"
    return f"cuda:{index}"


def image_448(size: int) -> Any:
    """A deterministic RGB test image (smooth gradients plus noise)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x, y, (x + y) / 2], axis=-1) * 200
    pixels = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def step_stats(t0: float, marks: list[tuple[float, int]]) -> dict[str, float]:
    """Prefill seconds and decode tokens/s from (time, tokens returned) per step.

    The first step that returns tokens ends the prefill; decode counts the
    tokens of the later steps over the time from that step to the last.
    """
    marks = [(t, n) for t, n in marks]
    first = next(i for i, (_, n) in enumerate(marks) if n > 0)
    t_first = marks[first][0]
    later = marks[first + 1:]
    decode_tokens = sum(n for _, n in later)
    decode_s = marks[-1][0] - t_first
    return {
        "prefill_s": t_first - t0,
        "decode_tokens": decode_tokens,
        "decode_steps": len(later),
        "decode_s": decode_s,
        "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else float("nan"),
        "step_ms": 1e3 * decode_s / max(len(later), 1),
    }


# ----------------------------------------------------------------------------- workers
class OursWorker:
    """This package: MAX's pipeline (tokenizer contexts, paged KV cache, sampler) and our graphs."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import max.pipelines.lib.interfaces.pipeline_model as pipeline_model

        phases: dict[str, float] = {"compile_graphs_s": 0.0, "init_graphs_s": 0.0}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    phases[name] += time.perf_counter() - t
            return wrapper

        pipeline_model.compile_graphs = timed("compile_graphs_s", pipeline_model.compile_graphs)
        pipeline_model.init_graphs = timed("init_graphs_s", pipeline_model.init_graphs)

        from qwen3vl_moe.api import Qwen3VL

        t = time.perf_counter()
        self.llm = Qwen3VL(
            spec["model_path"],
            devices=spec["devices"],
            quantization_encoding=spec["encoding"],
            max_length=spec["max_length"],
            max_batch_size=spec["max_batch_size"],
        )
        self.setup = {"load_s": time.perf_counter() - t, **phases}
        self.spec = spec
        self.model = self.llm.pipeline._pipeline_model
        self.device = self.model.devices[0]
        self.vision_inputs: list[Any] | None = None

    def sync(self) -> None:
        self.device.synchronize()

    def _context(self, ids: list[int], new_tokens: int) -> Any:
        import asyncio

        from max.pipelines.context import SamplingParams
        from max.pipelines.modeling.types import RequestID, TextGenerationRequest

        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_k=1, ignore_eos=True)
        request = TextGenerationRequest(
            request_id=RequestID(), model_name=self.llm.model_name, prompt=list(ids), sampling_params=sampling,
        )
        context = asyncio.run(self.llm.tokenizer.new_context(request))
        if len(context.tokens) != len(ids):
            raise RuntimeError(f"the tokenizer turned {len(ids)} prompt ids into {len(context.tokens)}")
        return context

    def generate(self, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
        from max.pipelines.lib.generate import GenerateIterator

        contexts = [self._context(ids, new_tokens) for ids in prompts]  # tokenization is not timed
        marks: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        with GenerateIterator.from_contexts(self.llm.pipeline, contexts) as batch:
            while not batch.done:
                tokens = batch.step()
                marks.append((time.perf_counter(), sum(len(v) for v in tokens.values())))
            sequences = batch.sequences
        generated = [len(seq) - len(p) for seq, p in zip(sequences, prompts, strict=True)]
        if generated != [new_tokens] * len(prompts):
            raise RuntimeError(f"generated {generated} tokens, expected {new_tokens} per row")
        return step_stats(t0, marks)

    def vision(self) -> dict[str, Any]:
        import numpy as np
        from max.driver import Buffer
        from max.pipelines.context import SamplingParams

        if self.vision_inputs is None:
            size = self.spec["image_size"]
            messages = [{"role": "user", "content": [
                {"type": "image", "image": image_448(size)}, {"type": "text", "text": "Describe the image."}]}]
            data = self.llm._context(messages, SamplingParams(max_new_tokens=1)).vision_data
            arrays = [
                np.ascontiguousarray(data.concatenated_pixel_values, dtype=np.float32),
                np.ascontiguousarray(data.image_grid_thw, dtype=np.int64),
                np.ascontiguousarray(data.vision_position_ids, dtype=np.int32),
                np.ascontiguousarray(data.cu_seqlens, dtype=np.uint32),
            ]
            self.vision_inputs = [Buffer.from_numpy(a).to(self.device) for a in arrays]
            self.patches = int(arrays[0].shape[0])
        self.sync()
        t = time.perf_counter()
        outputs = self.model.vision_model.execute(*self.vision_inputs)
        self.sync()
        elapsed = time.perf_counter() - t
        return {"s": elapsed, "patches": self.patches, "merged_tokens": int(outputs[0].shape[0])}


class HFWorker:
    """transformers: one model, switched between experts implementations per call."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        import transformers

        torch.set_grad_enabled(False)
        self.torch = torch
        self.spec = spec
        self.device = torch_device(spec["devices"])
        dtype = torch.bfloat16 if spec["encoding"] == "bfloat16" else torch.float32
        config = transformers.AutoConfig.from_pretrained(spec["model_path"])
        model_class = getattr(transformers, config.architectures[0])
        t = time.perf_counter()
        self.model = model_class.from_pretrained(
            spec["model_path"], dtype=dtype, experts_implementation=HF_IMPLS[0],
        ).to(self.device).eval()  # .to rather than device_map, which needs accelerate
        self.setup = {
            "load_s": time.perf_counter() - t,
            "default_experts_implementation": self.model.config._experts_implementation,
            "attn_implementation": self.model.config._attn_implementation,
            "torch_threads": torch.get_num_threads(),
        }
        if self.device == "cpu":
            self.setup["torch_gemm_gflop_s"] = self._gemm_rate(dtype)
        self.dtype = dtype
        self.vision_inputs: tuple[Any, Any] | None = None

    def _gemm_rate(self, dtype: Any, n: int = 1024) -> float:
        """torch's n x n x n matmul rate in GFLOP/s (best of 10): transformers' compute ceiling here."""
        a = self.torch.randn(n, n, dtype=dtype)
        b = self.torch.randn(n, n, dtype=dtype)
        best = math.inf
        for _ in range(10):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        return 2 * n**3 / best / 1e9

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize()

    def set_impl(self, impl: str) -> None:
        if self.model.config._experts_implementation != impl:
            self.model.set_experts_implementation(impl)
        if self.model.config._experts_implementation != impl:
            raise RuntimeError(f"experts implementation {impl!r} did not take: "
                               f"{self.model.config._experts_implementation!r}")

    def generate(self, prompts: list[list[int]], new_tokens: int, impl: str) -> dict[str, Any]:
        from transformers import LogitsProcessor, LogitsProcessorList

        torch = self.torch
        self.set_impl(impl)
        batch = len(prompts)
        worker = self

        class StepClock(LogitsProcessor):
            def __init__(self) -> None:
                self.marks: list[tuple[float, int]] = []

            def __call__(self, input_ids: Any, scores: Any) -> Any:
                worker.sync()
                self.marks.append((time.perf_counter(), batch))
                return scores

        clock = StepClock()
        input_ids = torch.tensor(prompts, dtype=torch.long, device=self.device)  # equal lengths: no padding
        attention_mask = torch.ones_like(input_ids)
        self.sync()
        t0 = time.perf_counter()
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
            use_cache=True, logits_processor=LogitsProcessorList([clock]),
        )
        self.sync()
        if out.shape[1] - input_ids.shape[1] != new_tokens:
            raise RuntimeError(f"generated {out.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
        return step_stats(t0, clock.marks)

    def vision(self, impl: str) -> dict[str, Any]:
        from transformers import AutoImageProcessor

        torch = self.torch
        self.set_impl(impl)  # the encoder has no experts; kept for symmetry
        if self.vision_inputs is None:
            processor = AutoImageProcessor.from_pretrained(self.spec["model_path"])
            inputs = processor(images=[image_448(self.spec["image_size"])], return_tensors="pt")
            self.vision_inputs = (
                inputs["pixel_values"].to(self.device, self.dtype), inputs["image_grid_thw"].to(self.device),
            )
        pixel_values, grid_thw = self.vision_inputs
        self.sync()
        t = time.perf_counter()
        out = self.model.model.visual(pixel_values, grid_thw=grid_thw)
        self.sync()
        elapsed = time.perf_counter() - t
        merged = out.pooler_output if hasattr(out, "pooler_output") else out[0]
        if isinstance(merged, list | tuple):
            merged = torch.cat(list(merged))
        return {"s": elapsed, "patches": int(pixel_values.shape[0]), "merged_tokens": int(merged.shape[0])}


def worker_main(kind: str, spec_json: str) -> None:
    """Serves one JSON command per stdin line; replies one JSON line on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to the log, not into the protocol
    sys.stdout = os.fdopen(1, "w", buffering=1)
    spec = json.loads(spec_json)

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        worker: Any = {"ours": OursWorker, "compile": OursWorker, "hf": HFWorker}[kind](spec)
    except BaseException as exc:  # report, then die
        reply({"error": f"{type(exc).__name__}: {exc}"})
        raise
    reply({"ready": True, "setup": worker.setup, "rss_bytes": peak_rss_bytes()})
    if kind == "compile":
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


# ----------------------------------------------------------------------------- driver side
class Worker:
    """A worker subprocess, driven one command at a time."""

    def __init__(self, name: str, kind: str, spec: dict[str, Any], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec)],
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


def memory_bandwidth(devices: str, nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, Any]:
    """Best-of-N streaming bandwidth in GB/s, what a decode step's weight reads can reach.

    GPU: a device copy, GB/s = 2 * bytes / s (read + write). Host: a read-only
    sum over all cores (torch, every thread), GB/s = bytes / s; without torch,
    a one-thread numpy copy, which underestimates a multi-core stream.
    """
    if is_gpu(devices):
        import torch

        if torch.cuda.is_available():
            dev = torch_device(devices)
            src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
            dst = torch.empty_like(src)
            times = []
            for _ in range(repeats + 1):
                torch.cuda.synchronize()
                t = time.perf_counter()
                dst.copy_(src)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            best = min(times[1:])
            return {"where": dev, "bytes": nbytes, "best_s": best, "gb_s": 2 * nbytes / best / 1e9}
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        times = []
        for _ in range(repeats + 1):
            t = time.perf_counter()
            src.sum()
            times.append(time.perf_counter() - t)
        best = min(times[1:])
        del src
        return {"where": f"host (read, {torch.get_num_threads()} threads)", "bytes": nbytes, "best_s": best,
                "gb_s": nbytes / best / 1e9}
    import numpy as np

    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(repeats + 1):  # the first touches dst's pages
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    del src, dst
    return {"where": "host (numpy copy, 1 thread)", "bytes": nbytes, "best_s": best, "gb_s": 2 * nbytes / best / 1e9}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def active_bytes(config: dict[str, Any], bytes_per_param: int, batch: int) -> dict[str, Any]:
    """Weights one decode step reads, by part (params), for ``batch`` tokens."""
    tc = _text_config(config)
    H, L, V = tc["hidden_size"], tc["num_hidden_layers"], tc["vocab_size"]
    hd = tc.get("head_dim") or H // tc["num_attention_heads"]
    nq, nkv = tc["num_attention_heads"], tc["num_key_value_heads"]
    attention = H * nq * hd + 2 * H * nkv * hd + nq * hd * H + 2 * hd + 2 * H  # q,k,v,o, q/k norms, 2 RMSNorms
    E = tc.get("num_experts", 0)
    moe_layers = [
        i for i in range(L)
        if E and i not in (tc.get("mlp_only_layers") or []) and (i + 1) % tc.get("decoder_sparse_step", 1) == 0
    ]
    parts = {"attention": L * attention, "router": 0, "experts": 0, "dense_mlp": 0}
    experts_hit = 0.0
    if E:
        k, inter = tc["num_experts_per_tok"], tc["moe_intermediate_size"]
        experts_hit = E * (1 - (1 - k / E) ** batch)  # expected distinct experts, uniform routing
        parts["router"] = len(moe_layers) * E * H
        parts["experts"] = round(len(moe_layers) * experts_hit * 3 * H * inter)
    parts["dense_mlp"] = (L - len(moe_layers)) * 3 * H * tc["intermediate_size"]
    parts["embedding_rows"] = batch * H
    parts["final_norm"] = H
    parts["lm_head"] = V * H
    params = sum(parts.values())
    return {"batch": batch, "experts_hit_per_layer": experts_hit, "params": params,
            "bytes": params * bytes_per_param, "parts": parts}


def summarize(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": samples}


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["ours", "hf", "compile"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--devices", default="cpu", help="cpu, gpu, gpu:0 (default cpu)")
    parser.add_argument("--encoding", choices=["float32", "bfloat16"],
                        help="both sides' dtype (default float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--preset", default="medium", help="tiny checkpoint preset (default medium)")
    parser.add_argument("--model-path", help="a checkpoint directory instead of the preset")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batch-prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--no-cold-compile", action="store_true", help="skip the cold compile measurement")
    parser.add_argument("--quick", action="store_true",
                        help="--repeats 2 --warmup 1 --new-tokens 16 --no-cold-compile")
    parser.add_argument("--out", help="JSON path (default bench/results/e2e-<device>-<date>.json)")
    args = parser.parse_args(argv)

    if args.worker:
        worker_main(args.worker, args.spec)
        return
    if args.quick:
        args.repeats, args.warmup, args.new_tokens, args.no_cold_compile = 2, 1, 16, True
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (decode is timed after the first token)")
    encoding = args.encoding or default_encoding(args.devices)
    bytes_per_param = 4 if encoding == "float32" else 2

    if args.model_path:
        model_path = Path(args.model_path)
    else:
        from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

        t = time.perf_counter()
        model_path = tiny_checkpoint(args.preset)
        print(f"checkpoint {model_path} ({time.perf_counter() - t:.1f} s)", flush=True)
    config = json.loads((model_path / "config.json").read_text())
    tc = _text_config(config)

    import numpy as np

    # Ordinary tokens only: ids below the first added (special) token.
    tokenizer = json.loads((model_path / "tokenizer.json").read_text())
    added = [tok["id"] for tok in tokenizer.get("added_tokens", [])]
    ordinary = min(added) if added else tc["vocab_size"]
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, ordinary, size=args.prompt_len).tolist()
    batch_prompts = rng.integers(0, ordinary, size=(args.batch, args.batch_prompt_len)).tolist()

    max_length = max(args.prompt_len, args.batch_prompt_len, 1024) + args.new_tokens
    spec = {
        "model_path": str(model_path), "devices": args.devices, "encoding": encoding,
        "max_length": max_length, "max_batch_size": args.batch, "image_size": args.image_size,
    }
    started = _dt.datetime.now()
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "spec")},
        "model_path": str(model_path), "encoding": encoding, "devices": args.devices,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu": cpu_description(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_start": os.getloadavg()},
        "versions": versions(),
        "config": {"text": {k: tc.get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
            "num_experts", "num_experts_per_tok", "moe_intermediate_size", "intermediate_size", "vocab_size")},
            "vision": {k: config.get("vision_config", {}).get(k) for k in (
                "depth", "hidden_size", "num_heads", "intermediate_size", "out_hidden_size")}},
        "param_count": param_count(model_path),
    }
    print(f"{result['param_count']:,} parameters; {encoding} on {args.devices}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    bandwidth = [memory_bandwidth(args.devices)]
    print(f"memory bandwidth {bandwidth[0]['gb_s']:.1f} GB/s ({bandwidth[0]['where']})", flush=True)

    log_dir = Path(tempfile.mkdtemp(prefix="qwen3vl-e2e-"))
    cache_dir = log_dir / "modular-cache"
    env = dict(os.environ)
    env["MODULAR_TELEMETRY_ENABLED"] = "0"
    want_ours = "ours" in args.only
    hf_impls = [c.split(":", 1)[1] for c in args.only if c.startswith("hf:")]
    compile_info: dict[str, Any] = {}
    if want_ours and not args.no_cold_compile:
        (cache_dir / "tmp").mkdir(parents=True)
        env["MODULAR_CACHE_DIR"] = str(cache_dir)
        env["TMPDIR"] = str(cache_dir / "tmp")  # where MAX writes the precompiled Mojo packages
        print("cold compile (empty MODULAR_CACHE_DIR) ...", flush=True)
        cold = Worker("compile-cold", "compile", spec, env, log_dir)
        cold.proc.wait()
        compile_info["cold"] = {**cold.hello["setup"], "rss_bytes": cold.hello["rss_bytes"]}
        compile_info["cache_dir_files"] = sum(1 for p in cache_dir.rglob("*") if p.is_file())
        print(f"  {fmt(compile_info['cold']['load_s'])} s to load and compile "
              f"({fmt(compile_info['cold']['compile_graphs_s'])} s in compile_graphs)", flush=True)

    if want_ours and "cold" not in compile_info:
        # Compile (or load from the default cache) in a process of its own, so
        # that the measured worker below only loads cached graphs: a compile
        # in the worker would count its peak memory as the model's.
        print("warming the compile cache ...", flush=True)
        warm = Worker("compile-warm", "compile", spec, env, log_dir)
        warm.proc.wait()
        compile_info["default_cache"] = {**warm.hello["setup"], "rss_bytes": warm.hello["rss_bytes"]}

    workers: dict[str, Worker] = {}
    try:
        if want_ours:
            print("loading ours ...", flush=True)
            workers["ours"] = Worker("ours", "ours", spec, env, log_dir)
            setup = workers["ours"].hello["setup"]
            compile_info["cached"] = setup
            print(f"  {fmt(setup['load_s'])} s to load ({fmt(setup['compile_graphs_s'])} s in compile_graphs, "
                  "cached)", flush=True)
        if hf_impls:
            print("loading transformers ...", flush=True)
            workers["hf"] = Worker("hf", "hf", spec, env, log_dir)
            print(f"  {fmt(workers['hf'].hello['setup']['load_s'])} s to load; "
                  f"{workers['hf'].hello['setup']}", flush=True)

        calls: dict[str, tuple[Worker, dict[str, Any]]] = {}
        if want_ours:
            calls["ours"] = (workers["ours"], {})
        for impl in hf_impls:
            calls[f"hf:{impl}"] = (workers["hf"], {"impl": impl})

        benches = {
            "long": ("generate", {"prompts": [prompt], "new_tokens": args.new_tokens}),
            "batch": ("generate", {"prompts": batch_prompts, "new_tokens": args.new_tokens}),
            "vision": ("vision", {}),
        }
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {c: {b: [] for b in benches} for c in calls}
        rounds = args.warmup + args.repeats
        for r in range(rounds):
            label = "warmup" if r < args.warmup else f"round {r - args.warmup + 1}/{args.repeats}"
            t_round = time.perf_counter()
            for bench, (op, kwargs) in benches.items():
                for name, (worker, extra) in calls.items():
                    others = [w for w in workers.values() if w is not worker]
                    for w in others:
                        w.pause()
                    try:
                        out = worker.call(op, **kwargs, **extra)
                    finally:
                        for w in others:
                            w.resume()
                    if r >= args.warmup:
                        raw[name][bench].append(out)
            print(f"  {label}: {time.perf_counter() - t_round:.1f} s  "
                  + "  ".join(f"{n}: prefill {raw[n]['long'][-1]['prefill_s']:.2f}s "
                              f"b1 {raw[n]['long'][-1]['decode_tok_s']:.1f} "
                              f"b{args.batch} {raw[n]['batch'][-1]['decode_tok_s']:.1f} tok/s "
                              f"vision {1e3 * raw[n]['vision'][-1]['s']:.0f}ms"
                              for n in calls if raw[n]['long']), flush=True)

        rss = {name: w.close()["rss_bytes"] for name, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()
    bandwidth.append(memory_bandwidth(args.devices))
    shutil.rmtree(cache_dir, ignore_errors=True)

    # ------------------------------------------------------------------ results
    metrics: dict[str, dict[str, Any]] = {}
    for name in calls:
        long, batch, vision = raw[name]["long"], raw[name]["batch"], raw[name]["vision"]
        metrics[name] = {
            "prefill_tok_s": summarize([args.prompt_len / x["prefill_s"] for x in long]),
            "decode_b1_tok_s": summarize([x["decode_tok_s"] for x in long]),
            "decode_bN_tok_s": summarize([x["decode_tok_s"] for x in batch]),
            "decode_b1_step_ms": summarize([x["step_ms"] for x in long]),
            "decode_bN_step_ms": summarize([x["step_ms"] for x in batch]),
            "vision_ms": summarize([1e3 * x["s"] for x in vision]),
            "vision_patches": vision[0]["patches"],
            "vision_merged_tokens": vision[0]["merged_tokens"],
            "peak_rss_bytes": rss["ours" if name == "ours" else "hf"],
        }
    gb_s = max(b["gb_s"] for b in bandwidth)
    floor = {}
    for key, b in (("b1", 1), ("bN", args.batch)):
        ab = active_bytes(config, bytes_per_param, b)
        step_s = ab["bytes"] / (gb_s * 1e9)
        floor[key] = {**ab, "step_ms": 1e3 * step_s, "max_tok_s": b / step_s}
    result.update(
        bandwidth=bandwidth, bandwidth_gb_s=gb_s, decode_floor=floor, compile=compile_info, metrics=metrics,
        hf_setup=workers["hf"].hello["setup"] if "hf" in workers else None,
        wall_s=time.perf_counter() - t_start,
    )
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["ratios"] = ratios(metrics)

    table, markdown = render(result, args)
    print()
    print(table)
    print()
    print(markdown)
    device_tag = "gpu" if is_gpu(args.devices) else "cpu"
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"e2e-{device_tag}-{started:%Y-%m-%d}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result["markdown"] = markdown
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out} ({result['wall_s'] / 60:.1f} min; worker logs in {log_dir})")


def cpu_description() -> dict[str, Any]:
    """The host CPU as /proc/cpuinfo names it (x86 Linux), with its widest float32 vector ISA.

    The vendor/family pair tells AMD Zen 4 (family 25: AVX-512 on 256-bit
    units) from Zen 5 (family 26: full 512-bit units), which decides how far
    AVX-512 kernels (MAX's) pull ahead of 256-bit ones (torch's oneMKL SGEMM
    runs at about the 256-bit rate on the Zen 5 measured; see docs/STATUS.md).
    """
    info: dict[str, Any] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info = {k: fields.get(k) for k in ("model name", "vendor_id", "cpu family", "model")}
    flags = set(fields.get("flags", "").split())
    info["vector_isa"] = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return info


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("max", "modular", "transformers", "torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def param_count(model_path: Path) -> int | None:
    try:
        from safetensors import safe_open
    except ImportError:
        return None
    total = 0
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def ratios(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ours / transformers speed (higher is better) and RSS (lower is better), per impl and vs the best."""
    if "ours" not in metrics:
        return {}
    hf = [n for n in metrics if n.startswith("hf:")]
    out: dict[str, Any] = {}
    ours = metrics["ours"]
    for key, higher in (("prefill_tok_s", True), ("decode_b1_tok_s", True), ("decode_bN_tok_s", True),
                        ("vision_ms", False)):
        per = {}
        for n in hf:
            a, b = ours[key]["median"], metrics[n][key]["median"]
            per[n] = a / b if higher else b / a
        out[key] = {"per_impl": per, "vs_best": min(per.values()) if per else None}
    if hf:
        out["peak_rss"] = ours["peak_rss_bytes"] / metrics[hf[0]]["peak_rss_bytes"]
    return out


def render(result: dict[str, Any], args: argparse.Namespace) -> tuple[str, str]:
    metrics, rat = result["metrics"], result["ratios"]
    names = list(metrics)
    hf = [n for n in names if n.startswith("hf:")]
    B = args.batch
    rows = [
        (f"prefill tok/s ({args.prompt_len} tokens, batch 1)", "prefill_tok_s", 0, "prefill"),
        (f"decode tok/s, batch 1 ({args.new_tokens} new)", "decode_b1_tok_s", 1, "decode_b1"),
        (f"decode tok/s, batch {B} ({args.batch_prompt_len}-token prompts)", "decode_bN_tok_s", 1, "decode_bN"),
        (f"vision encoder ms / {args.image_size}x{args.image_size} image", "vision_ms", 0, "vision"),
    ]
    header = ["", *(LABELS[n] for n in names)]
    if rat:
        header += [f"ours / {LABELS[n].split()[-1]}" for n in hf] + ["target (vs best)"]
    lines = []
    for title, key, digits, tkey in rows:
        cells = [title, *(fmt(metrics[n][key]["median"], digits) for n in names)]
        if rat:
            cells += [f"{rat[key]['per_impl'][n]:.2f}x" for n in hf]
            best = rat[key]["vs_best"]
            cells.append(f">= {TARGETS[tkey]}x: {'met' if best >= TARGETS[tkey] else 'not met'}")
        lines.append(cells)
    rss_cells = ["peak RSS GiB", *(fmt(metrics[n]["peak_rss_bytes"] / 2**30, 2) for n in names)]
    if rat:
        rss_cells += [f"{rat['peak_rss']:.2f}x" for _ in hf]
        rss_cells.append(f"<= 1.2x: {'met' if rat['peak_rss'] <= 1.2 else 'not met'}")
    lines.append(rss_cells)

    floor, gb_s = result["decode_floor"], result["bandwidth_gb_s"]
    notes = [
        f"decode floor at {gb_s:.1f} GB/s ({result['encoding']}): batch 1 reads "
        f"{floor['b1']['bytes'] / 1e6:.0f} MB/step -> {floor['b1']['max_tok_s']:.1f} tok/s max; "
        f"batch {B} reads {floor['bN']['bytes'] / 1e6:.0f} MB/step "
        f"({floor['bN']['experts_hit_per_layer']:.1f} experts/layer expected) -> {floor['bN']['max_tok_s']:.1f} tok/s max",
    ]
    if "ours" in metrics:
        notes.append(
            f"ours at the floor: batch 1 {metrics['ours']['decode_b1_tok_s']['median'] / floor['b1']['max_tok_s']:.0%}, "
            f"batch {B} {metrics['ours']['decode_bN_tok_s']['median'] / floor['bN']['max_tok_s']:.0%}")
    comp = result["compile"]
    if comp:
        parts = []
        for key in ("cold", "cached", "default_cache"):
            if key in comp:
                parts.append(f"{key}: {comp[key]['load_s']:.1f} s load+compile "
                             f"({comp[key]['compile_graphs_s']:.1f} s compile_graphs, "
                             f"{comp[key]['init_graphs_s']:.1f} s init_graphs)")
        notes.append("our pipeline, " + "; ".join(parts))
    cpu = result["machine"].get("cpu") or {}
    if cpu:
        gemm = (result.get("hf_setup") or {}).get("torch_gemm_gflop_s")
        notes.append(f"CPU: {cpu.get('model name')} ({cpu.get('vendor_id')} family {cpu.get('cpu family')} "
                     f"model {cpu.get('model')}, {cpu.get('vector_isa')}) x {result['machine']['cpu_count']}"
                     + (f"; torch float32 1024^3 matmul {gemm:.0f} GFLOP/s" if gemm else ""))
    notes.append(f"medians of {args.repeats} rounds after {args.warmup} warm-up; "
                 f"{result['param_count']:,} parameters; {result['devices']} {result['encoding']}; "
                 f"load average {result['machine']['loadavg_start'][0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f}")

    widths = [max(len(str(line[i])) for line in [header, *lines]) for i in range(len(header))]
    table = "\n".join(
        "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
        for line in [header, *lines]
    ) + "\n" + "\n".join(notes)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    markdown = "\n".join(md) + "\n\n" + "\n".join(f"- {n}" for n in notes)
    return table, markdown


if __name__ == "__main__":
    main()
