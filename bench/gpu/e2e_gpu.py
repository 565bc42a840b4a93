"""Whole-pipeline GPU run: this package against MAX's built-in ``qwen3vl_moe``, checked against transformers.

Issue 16 item 1. One command on a lent GPU machine (``bench/gpu/e2e.sh``, which
installs MAX from the carried wheel parts first) does, inside one 10-minute
call, cold compiles included:

1. writes a checkpoint with Qwen3-VL-30B-A3B's real dimensions (hidden 2048,
   128 experts top-8, I=768, 32/4 heads x 128; vision 1152 x 27 cut) cut to
   ``--text-layers`` (4) text and ``--vision-layers`` (2) vision layers, the
   release's vocabulary (151936), bfloat16, seeded unit-scale weights
   (``checkpoints.published.published_config`` + the tiny writer; nothing
   large travels);
2. starts three worker processes at once (the cold compiles overlap):
   ``ours`` (this package through MAX's pipeline, ``--custom-architectures
   qwen3vl_moe``), ``builtin`` (MAX's own ``Qwen3VLMoeForConditionalGeneration``:
   the same pipeline without the custom architecture; the package registers
   its architectures under the same names with ``allow_override``, so the two
   cannot share a process) and ``hf`` (transformers);
3. checks both MAX contenders' logits against transformers on the same GPU
   (an image + text prompt, greedy tokens, each recorded row against
   transformers teacher-forced on the same tokens; tolerance below);
4. times, round-robin and one call at a time (bench/e2e's protocol: the other
   workers are SIGSTOPped), prefill at 512 and 4096 tokens, decode at batch 1
   (after the 512-token prompt), 8 and 64 (64-token prompts), and the vision
   encoder alone at 448x448 and 1344x1344;
5. writes ``e2e-gpu-<h100|h200>-<date>.json`` into ``--out`` ($OUT) after
   every phase, and prints a markdown table last.

Every contender, row and check runs in its own try/except (workers answer a
failing op with ``failed``, not by dying): a failure is recorded with its
message and the rest goes on. A deadline (``--deadline-s``) stops the timing
rounds early rather than losing the whole run to the call's limit.

Logits tolerance. The reference is transformers in float32 on the same
bfloat16-rounded weights (upcast exactly) and the same inputs. A correct
bfloat16 implementation differs from it by bfloat16 rounding of activations;
transformers' own bfloat16 run measures that on this very prompt. A contender
passes when its max |logit - reference| is at most ``--logit-tol-factor`` (3)
times transformers-bfloat16's, with at least 90% of the greedy tokens agreeing
with the reference's argmax. On CPU (dry run) ours computes in float32 and is
held to the same bound.

CPU dry run (no GPU): ``--dry-run`` swaps in the tiny ``moe`` preset (written
by the same bfloat16 writer), the CPU device, fewer rounds and tokens; the
built-in is still tried and records its failure (its kernels are GPU-only).

    python bench/gpu/e2e_gpu.py --out $OUT            # on the GPU machine (via e2e.sh)
    python bench/gpu/e2e_gpu.py --dry-run --out /tmp/x  # here, CPU
    python bench/gpu/e2e_gpu.py --report FILE.json    # the table of a (partial) result
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
E2E = REPO / "bench" / "e2e"
sys.path.insert(0, str(E2E))          # bench/e2e's modules: protocol, workers, floor, report
sys.path.insert(1, str(REPO / "python"))
for _k, _v in {"MODULAR_TELEMETRY_ENABLED": "0", "MAX_SERVE_DISABLE_TELEMETRY": "1", "OTEL_SDK_DISABLED": "true",
               "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}.items():
    os.environ.setdefault(_k, _v)

import floor  # noqa: E402
import protocol  # noqa: E402
import report  # noqa: E402
from workers import HFWorker, OursWorker, image_448, is_gpu, torch_device  # noqa: E402

CONTENDERS = ("ours", "builtin", "hf")
LABELS = {"ours": "ours (qwen3vl_moe)", "builtin": "MAX built-in", "hf": "transformers"}
LOGIT_TEXT = "Describe the image."


# ---------------------------------------------------------------------------
# Checkpoint


def model_config(args: argparse.Namespace) -> dict[str, Any]:
    """30B-A3B's dimensions cut to the asked depths (dry run: the tiny moe preset)."""
    if args.dry_run:
        from qwen3vl_moe.checkpoints.tiny import preset_config

        return preset_config("moe")
    from qwen3vl_moe.checkpoints.published import PUBLISHED, _remap_deepstack, published_config

    config = published_config("30b-a3b")          # 2 + 2 layers, the tiny tokenizer's ids and vocab
    model = PUBLISHED["30b-a3b"]
    config["text_config"]["num_hidden_layers"] = args.text_layers
    if args.vocab == "release":
        config["text_config"]["vocab_size"] = model.text["vocab_size"]  # 151936: the lm_head a decode step reads
    vision = config["vision_config"]
    vision["depth"] = args.vision_layers
    vision["deepstack_visual_indexes"] = _remap_deepstack(model.vision["deepstack_visual_indexes"],
                                                          model.vision["depth"], args.vision_layers)
    return config


def write_checkpoint(config: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    """bfloat16 checkpoint of ``config`` in ``out``: the tiny writer's seeded draws, rounded as torch rounds."""
    from qwen3vl_moe.checkpoints.tiny import bfloat16_draw, write_checkpoint_from_config

    t = time.perf_counter()
    config = {**config, "torch_dtype": "bfloat16"}
    config["text_config"] = {**config["text_config"], "dtype": "bfloat16"}
    write_checkpoint_from_config(out, config, seed, transform=bfloat16_draw, max_shard_bytes=1 << 30)
    how = "checkpoints.tiny.write_checkpoint_from_config, each draw rounded to bfloat16 while writing"
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return {"path": str(out), "bytes": size, "write_s": time.perf_counter() - t, "how": how, "seed": seed}


def param_count(config: dict[str, Any]) -> int:
    from qwen3vl_moe.checkpoints.layout import checkpoint_layout

    return sum(math.prod(spec.shape) for spec in checkpoint_layout(config).values())


# ---------------------------------------------------------------------------
# Workers (each in its own process; every op answers {"failed": ...} instead of dying)


def _failed(exc: BaseException) -> dict[str, Any]:
    return {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


class Recorder:
    """A logits processor keeping each step's next-token logits (the last row), as MAX's own recorder does."""

    def __init__(self) -> None:
        self.logits: list[Any] = []

    def __call__(self, inputs: Any) -> None:
        import numpy as np

        self.logits.append(np.array(inputs.logits[-1, :].to_numpy(), dtype=np.float32))


class MaxContender:
    """Shared by ours and the built-in: rows, vision at several sizes, recorded logits."""

    llm: Any
    spec: dict[str, Any]

    def bench(self, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            return getattr(self, what)(**kwargs)
        except Exception as exc:
            return _failed(exc)

    def _messages(self, size: int, text: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "image": image_448(size)},
                                             {"type": "text", "text": text}]}]

    def logits(self, image_size: int, text: str, new_tokens: int, out_path: str) -> dict[str, Any]:
        try:
            import numpy as np
            from max.pipelines.context import SamplingParams
            from max.pipelines.lib.generate import GenerateIterator

            sampling = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, top_k=1, ignore_eos=True)
            context = self.llm._context(self._messages(image_size, text), sampling)
            recorder = Recorder()
            context.sampling_params.logits_processors = [*(context.sampling_params.logits_processors or ()),
                                                         recorder]
            prompt = [int(t) for t in context.tokens.all[: len(context.tokens)]]
            with GenerateIterator.from_contexts(self.llm.pipeline, [context]) as batch:
                while not batch.done:
                    batch.step()
                sequence = batch.sequences[0]
            np.save(out_path, np.stack(recorder.logits))
            return {"prompt_ids": prompt, "ids": [int(t) for t in sequence[len(prompt):]], "path": out_path,
                    "rows": len(recorder.logits)}
        except Exception as exc:
            return _failed(exc)

    def exit_rss(self) -> int:
        return protocol.peak_rss_bytes()


class Ours(MaxContender, OursWorker):
    """This package (bench/e2e's OursWorker), with MAX's KV share capped so that three contenders fit one GPU."""

    CUSTOM = True

    def __init__(self, spec: dict[str, Any]) -> None:
        from workers import CompileTimes

        from qwen3vl_moe.max_compat import pipeline_model_of

        t = time.perf_counter()
        with CompileTimes() as compile_times:
            self.llm = self._load(spec)
        self.setup = {"load_s": time.perf_counter() - t, "max_timer": compile_times.times,
                      "max_timer_log": compile_times.lines,
                      "modular_cache_dir": os.environ.get("MODULAR_CACHE_DIR", "(default)")}
        self.spec = spec
        self.model = pipeline_model_of(self.llm.pipeline)
        self.device = self.model.devices[0]
        self.vision_inputs = None
        self._vision_by_size: dict[int, Any] = {}

    @staticmethod
    def _kwargs(spec: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"devices": spec["devices"], "max_length": spec["max_length"],
                  "max_batch_size": spec["max_batch_size"], "quantization_encoding": spec["encoding"]}
        if spec.get("device_memory_utilization") and is_gpu(spec["devices"]):
            kwargs["device_memory_utilization"] = spec["device_memory_utilization"]
        return kwargs

    def _load(self, spec: dict[str, Any]) -> Any:
        from qwen3vl_moe.api import Qwen3VL

        return Qwen3VL(spec["model_path"], **self._kwargs(spec))

    def vision_at(self, size: int) -> dict[str, Any]:
        """bench/e2e's encoder-alone timing (OursWorker.vision) at ``size``, inputs built once per size."""
        self.spec["image_size"] = size
        self.vision_inputs, self.patches = self._vision_by_size.get(size, (None, 0))
        out = OursWorker.vision(self)
        self._vision_by_size[size] = (self.vision_inputs, self.patches)
        return out


class Builtin(Ours):
    """MAX's built-in architecture: the same pipeline calls, without ``custom_architectures``."""

    def _load(self, spec: dict[str, Any]) -> Any:
        from max.pipelines.lib import PIPELINE_REGISTRY, PipelineArgs, PipelineConfig

        from qwen3vl_moe.api import Qwen3VL  # its _context (chat messages -> a MAX context) only

        kwargs = self._kwargs(spec)
        llm = Qwen3VL.__new__(Qwen3VL)
        flat = {"model_path": spec["model_path"], "device_specs": kwargs.pop("devices"),
                "enable_prefix_caching": False, **kwargs}
        llm.pipeline_config = PipelineConfig.from_args(PipelineArgs.from_flat_kwargs(**flat))
        llm.tokenizer, llm.pipeline = PIPELINE_REGISTRY.retrieve(llm.pipeline_config)
        llm.model_name = spec["model_path"]
        module = type(llm.pipeline).__module__
        print(f"built-in pipeline {type(llm.pipeline).__name__} ({module})", file=sys.stderr)
        return llm

    def vision_at(self, size: int) -> dict[str, Any]:
        """The built-in encoder alone: its inputs captured from one image prefill, then its vision graph timed."""
        if size not in self._vision_by_size:
            from max.pipelines.context import SamplingParams
            from max.pipelines.lib.generate import GenerateIterator

            captured: list[Any] = []
            execute = self.model.execute

            def capture(model_inputs: Any) -> Any:
                if not captured and getattr(model_inputs, "has_vision_inputs", False):
                    captured.append(model_inputs)
                return execute(model_inputs)

            self.model.execute = capture
            try:
                context = self.llm._context(self._messages(size, LOGIT_TEXT), SamplingParams(max_new_tokens=1))
                with GenerateIterator.from_contexts(self.llm.pipeline, [context]) as batch:
                    while not batch.done:
                        batch.step()
            finally:
                del self.model.execute
            if not captured:
                raise RuntimeError("the built-in's execute saw no vision inputs")
            mi = captured[0]
            args = [*mi.pixel_values, *mi.weights, *mi.indices, *mi.vision_position_ids, *mi.max_grid_size,
                    *mi.grid_thw, *mi.cu_seqlens, *mi.max_seqlen, *mi.signal_buffers]  # as its execute() passes them
            self._vision_by_size[size] = (args, int(mi.pixel_values[0].shape[0]))
        args, patches = self._vision_by_size[size]
        self.sync()
        t = time.perf_counter()
        outputs = self.model.vision_model.execute(*args)
        self.sync()
        elapsed = time.perf_counter() - t
        return {"s": elapsed, "patches": patches, "merged_tokens": int(outputs[0].shape[0])}


class HF(HFWorker):
    """transformers (bench/e2e's HFWorker, grouped_mm experts) plus the float32 logits reference."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        self._vision_by_size: dict[int, Any] = {}

    def bench(self, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            if what == "generate":
                return self.generate(impl=self.spec.get("hf_impl", "grouped_mm"), **kwargs)
            if what == "vision_at":
                size = kwargs["size"]
                self.spec["image_size"] = size
                self.vision_inputs = self._vision_by_size.get(size)
                out = self.vision(impl=self.spec.get("hf_impl", "grouped_mm"))
                self._vision_by_size[size] = self.vision_inputs
                return out
            raise ValueError(f"unknown op {what}")
        except Exception as exc:
            return _failed(exc)

    def _processor(self) -> Any:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(self.spec["model_path"])
        try:  # the PIL backend: this package's pixels equal it bit for bit (tests/test_vision_model.py)
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(self.spec["model_path"])
        except ImportError:
            pass
        return processor

    def reference(self, image_size: int, text: str, runs: dict[str, dict[str, Any]], tol_factor: float) -> dict[str, Any]:
        """Each contender's recorded logits against transformers float32 (teacher-forced on its own tokens).

        transformers bfloat16 on the same inputs gives the yardstick: the error a correct bfloat16
        implementation makes. Loads a float32 copy of the model for the duration of the call.
        """
        try:
            import numpy as np
            import transformers

            torch = self.torch
            processor = self._processor()
            chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            rendered = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            inputs = dict(processor(text=[rendered], images=[image_448(image_size)], return_tensors="pt"))
            hf_prompt = inputs["input_ids"][0].tolist()
            config = transformers.AutoConfig.from_pretrained(self.spec["model_path"])
            t = time.perf_counter()
            ref_model = getattr(transformers, config.architectures[0]).from_pretrained(  # eager experts: the
                self.spec["model_path"], dtype=torch.float32,  # per-expert loop (grouped_mm wants bf16 on GPU)
                experts_implementation="eager").to(self.device).eval()
            load_s = time.perf_counter() - t
            # the bfloat16 yardstick: the timed model when it is bfloat16 (GPU), else a bfloat16 copy (CPU dry run)
            yardstick = self.model if self.dtype == torch.bfloat16 else copy.deepcopy(self.model).to(torch.bfloat16)

            def forward(model: Any, ids: list[int], dtype: Any) -> Any:
                n_new = len(ids) - len(hf_prompt)
                step = {k: (v.to(self.device, dtype) if k == "pixel_values" else v.to(self.device))
                        for k, v in inputs.items()}
                step["input_ids"] = torch.tensor([ids], device=self.device)
                step["attention_mask"] = torch.ones_like(step["input_ids"])
                if "mm_token_type_ids" in step:
                    step["mm_token_type_ids"] = torch.cat(
                        [step["mm_token_type_ids"], torch.zeros((1, n_new), dtype=step["mm_token_type_ids"].dtype,
                                                                device=self.device)], dim=1)
                with torch.no_grad():
                    return model(**step).logits[0].float().cpu().numpy()

            out: dict[str, Any] = {"hf_prompt_len": len(hf_prompt), "reference": "transformers float32, same "
                                   "bf16-rounded weights, teacher-forced", "tol_factor": tol_factor,
                                   "ref_load_s": load_s, "contenders": {}}
            for name, run in runs.items():
                entry: dict[str, Any] = {}
                out["contenders"][name] = entry
                try:
                    if "failed" in run:
                        raise RuntimeError(f"no logits: {run['failed']}")
                    ours = np.load(run["path"])
                    ids = run["ids"]
                    entry["prompt_ids_equal"] = run["prompt_ids"] == hf_prompt
                    if not entry["prompt_ids_equal"]:
                        entry["prompt_len"] = len(run["prompt_ids"])
                    full = run["prompt_ids"] + ids[:-1]   # row i of ours predicted ids[i]
                    rows = slice(len(run["prompt_ids"]) - 1, len(full))
                    ref = forward(ref_model, full, torch.float32)[rows]
                    bf16 = forward(yardstick, full, torch.bfloat16)[rows]
                    vocab = min(ours.shape[-1], ref.shape[-1])
                    ours, ref, bf16 = ours[:, :vocab], ref[:, :vocab], bf16[:, :vocab]
                    scale = float(np.abs(ref).max())
                    err = float(np.abs(ours - ref).max())
                    err_hf = float(np.abs(bf16 - ref).max())
                    agree = float((ours.argmax(-1) == ref.argmax(-1)).mean())
                    entry.update(
                        rows=int(ours.shape[0]), logit_scale=scale, max_abs_err=err, mean_abs_err=float(
                            np.abs(ours - ref).mean()), hf_bf16_max_abs_err=err_hf,
                        hf_bf16_mean_abs_err=float(np.abs(bf16 - ref).mean()), top1_agree=agree,
                        hf_bf16_top1_agree=float((bf16.argmax(-1) == ref.argmax(-1)).mean()),
                        tolerance=tol_factor * err_hf, err_over_hf_bf16=err / err_hf if err_hf else None,
                        passed=bool(err <= tol_factor * max(err_hf, 1e-6 * scale) and agree >= 0.9),
                        ids=ids, hf_greedy_ref=[int(x) for x in ref.argmax(-1)],
                    )
                except Exception as exc:
                    entry.update(_failed(exc))
            del ref_model, yardstick
            if self.device.startswith("cuda"):
                torch.cuda.empty_cache()
            return out
        except Exception as exc:
            return _failed(exc)

    def exit_rss(self) -> int:
        return protocol.peak_rss_bytes()


WORKER_CLASSES = {"ours": Ours, "builtin": Builtin, "hf": HF}


class Proc(protocol.Worker):
    """bench/e2e's Worker, started on this script (its own worker kinds); ``ready()`` waits for the hello."""

    def __init__(self, name: str, spec: dict[str, Any], env: dict[str, str], log_dir: Path) -> None:  # noqa: D107
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        self.log = open(self.log_path, "w")
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=REPO,
        )
        self.hello: dict[str, Any] = {}

    def ready(self) -> dict[str, Any]:
        self.hello = self._read()
        self.hello["wall_to_ready_s"] = time.perf_counter() - self.started
        return self.hello


# ---------------------------------------------------------------------------
# Driver


class Run:
    """The result document, written after every phase."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.started = _dt.datetime.now()
        self.result: dict[str, Any] = {"date": self.started.isoformat(timespec="seconds"), "phases": {},
                                       "errors": {}, "args": vars(args)}
        self.path: Path | None = None

    def left(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.t0)

    def say(self, text: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {text}", flush=True)

    def phase(self, name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        self.say(f"{name} ...")
        try:
            value = fn(*a, **kw)
            ok = True
        except Exception as exc:
            value = None
            ok = False
            self.result["errors"][name] = {**_failed(exc)}
            self.say(f"{name} FAILED: {type(exc).__name__}: {exc}")
        self.result["phases"][name] = {"s": time.perf_counter() - t, "ok": ok}
        self.save()
        return value

    def save(self) -> None:
        if self.path is None:
            return
        self.result["wall_s"] = time.perf_counter() - self.t0
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        tmp.replace(self.path)


def device_description(devices: str) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                            "python": platform.python_version(), "cpu": report.cpu_description()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    if is_gpu(devices):
        try:
            import torch

            dev = torch.device(torch_device(devices))
            p = torch.cuda.get_device_properties(dev)
            info["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "sm_count": p.multi_processor_count,
                           "capability": f"{p.major}.{p.minor}"}
        except Exception as exc:
            info["gpu"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def gpu_tag(info: dict[str, Any]) -> str:
    name = str(info.get("gpu", {}).get("name", "")).lower()
    for tag in ("h200", "h100", "a100", "b200"):
        if tag in name:
            return tag
    return "gpu"


def rows_spec(args: argparse.Namespace, ordinary: int) -> dict[str, tuple[str, dict[str, Any]]]:
    import numpy as np

    rng = np.random.default_rng(0)
    p_short = rng.integers(0, ordinary, size=args.prompt_len).tolist()
    p_long = rng.integers(0, ordinary, size=args.long_prompt_len).tolist()
    rows: dict[str, tuple[str, dict[str, Any]]] = {
        f"prefill_{args.prompt_len}": ("generate", {"prompts": [p_short], "new_tokens": args.new_tokens}),
        f"prefill_{args.long_prompt_len}": ("generate", {"prompts": [p_long], "new_tokens": 2}),
    }
    for b in args.batches:
        rows[f"decode_b{b}"] = ("generate", {
            "prompts": rng.integers(0, ordinary, size=(b, args.batch_prompt_len)).tolist(),
            "new_tokens": args.new_tokens})
    for s in args.image_sizes:
        rows[f"vision_{s}"] = ("vision_at", {"size": s})
    return rows


def metrics_of(samples: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians (and min/max/samples) per metric; a row whose samples all failed gives its error."""
    out: dict[str, Any] = {}

    def ok(row: str) -> list[dict[str, Any]]:
        return [s for s in samples.get(row, []) if "failed" not in s]

    for row, values in samples.items():
        good = ok(row)
        if not good:
            fails = [s["failed"] for s in values if "failed" in s]
            if fails:
                out[f"{row}_error"] = fails[-1]
            continue
        if row.startswith("prefill_"):
            n = int(row.split("_")[1])
            out[f"prefill_{n}_tok_s"] = report.summarize([n / s["prefill_s"] for s in good])
            if n == args.prompt_len:
                out["decode_b1_tok_s"] = report.summarize([s["decode_tok_s"] for s in good])
                out["decode_b1_step_ms"] = report.summarize([s["step_ms"] for s in good])
        elif row.startswith("decode_b"):
            out[f"{row}_tok_s"] = report.summarize([s["decode_tok_s"] for s in good])
            out[f"{row}_step_ms"] = report.summarize([s["step_ms"] for s in good])
        elif row.startswith("vision_"):
            out[f"{row}_ms"] = report.summarize([1e3 * s["s"] for s in good])
            out[f"{row}_patches"] = good[0]["patches"]
    return out


def one_line(text: str, limit: int) -> str:
    """An error message fit for one table cell: its first line, and a crash's innermost frame if any."""
    lines = str(text).splitlines()
    frame = next((ln.strip() for ln in lines[1:] if ln.strip().startswith('File "')), "")
    text = " ".join(" ".join(lines[:1] + ([f"at {frame}"] if frame else [])).replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def table(result: dict[str, Any]) -> str:
    """Markdown: one row per metric, a column per contender, ours/built-in and the target."""
    metrics = result.get("metrics", {})
    names = [c for c in CONTENDERS if c in metrics or c in result.get("load", {})]
    keys: list[str] = []
    for c in names:
        for k, v in metrics.get(c, {}).items():
            if isinstance(v, dict) and "median" in v and not k.endswith("step_ms") and k not in keys:
                keys.append(k)
    order = ["prefill", "decode", "vision"]
    keys.sort(key=lambda k: (next((i for i, o in enumerate(order) if k.startswith(o)), 9),
                             int("".join(ch for ch in k.split("_")[1] if ch.isdigit()) or 0)))
    head = ["", *(LABELS[c] for c in names), "ours / built-in", "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        vals = {c: report.median(metrics, c, k) for c in names}
        ours, theirs = vals.get("ours"), vals.get("builtin")
        ratio = None
        if ours and theirs:
            ratio = theirs / ours if k.endswith("_ms") else ours / theirs
        label = k.replace("_tok_s", " tok/s").replace("_ms", " ms").replace("_", " ")
        target = "-" if ratio is None else ("met" if ratio >= 1.0 else "not met") + " (>= 1.0x)"
        lines.append("| " + " | ".join([label, *(report.fmt(vals[c], 1) for c in names),
                                        "-" if ratio is None else f"{ratio:.2f}x", target]) + " |")
    fl = result.get("decode_floor", {})
    if fl:
        ours_b1 = report.median(metrics, "ours", "decode_b1_tok_s")
        frac = ours_b1 / fl["max_tok_s"] if ours_b1 else None
        lines.append(f"| decode b1 floor tok/s ({fl['bytes'] / 1e6:,.0f} MB/step at {fl['gb_s']:,.0f} GB/s) | "
                     + " | ".join(report.fmt(fl["max_tok_s"], 0) if c == names[0] else "" for c in names)
                     + f" | ours at {'-' if frac is None else f'{frac:.0%}'} of the floor | "
                     + ("-" if frac is None else ("met" if frac >= 1 / 1.5 else "not met")) + " (>= 67%) |")
    checks = result.get("logits_check", {}).get("contenders", {})
    for c, e in checks.items():
        if "failed" in e:
            lines.append(f"| logits vs transformers fp32: {LABELS.get(c, c)} | FAILED: {one_line(e['failed'], 160)} | | | |")
        else:
            lines.append(f"| logits vs transformers fp32: {LABELS.get(c, c)} | max err {e['max_abs_err']:.3g} "
                         f"(transformers bf16 {e['hf_bf16_max_abs_err']:.3g}, scale {e['logit_scale']:.3g}), "
                         f"top-1 {e['top1_agree']:.0%} | | {'pass' if e['passed'] else 'FAIL'} | "
                         f"<= {result['logits_check']['tol_factor']:g}x transformers bf16 |")
    for c, load in result.get("load", {}).items():
        if "error" in load:
            lines.append(f"| {LABELS.get(c, c)} load | FAILED: {one_line(load['error'], 200)} | | | |")
        else:
            timer = load.get("setup", {}).get("max_timer", {}).get("model", {})
            lines.append(f"| {LABELS.get(c, c)} load s | {load['wall_to_ready_s']:.0f}"
                         + (f" (MAX compile {timer['compile_s']:.0f})" if "compile_s" in timer else "") + " | | | |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/gpu/e2e_gpu.py", description=__doc__.split("\n")[0])
    p.add_argument("--worker", choices=sorted(WORKER_CLASSES), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--report", help="print the table of a result JSON and exit")
    p.add_argument("--dry-run", action="store_true", help="CPU, the tiny moe preset, fewer rounds")
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "results"))
    p.add_argument("--devices", help="default gpu (dry run: cpu)")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--checkpoint", help="an existing checkpoint directory (skips writing one)")
    p.add_argument("--ckpt-dir", default=None, help="where to write the checkpoint and keep it for a rerun "
                   "(default: /tmp/qwen3vl-gpu-e2e on a GPU; a temporary folder, deleted, in the dry run)")
    p.add_argument("--keep-checkpoint", action="store_true")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--vision-layers", type=int, default=2)
    p.add_argument("--vocab", choices=["release", "tiny"], default="release",
                   help="release: 151936 (the real lm_head); tiny: the tiny tokenizer's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--long-prompt-len", type=int, default=None, help="default 4096 (dry run 1024)")
    p.add_argument("--batches", default=None, help="decode batch sizes besides 1 (default 8,64; dry run 8,16: "
                   "MAX sizes its CPU KV cache for max batch x max length)")
    p.add_argument("--batch-prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=None, help="default 64 (dry run 8)")
    p.add_argument("--image-sizes", default="448,1344")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="default 3 (dry run 1)")
    p.add_argument("--logit-tokens", type=int, default=8)
    p.add_argument("--logit-tol-factor", type=float, default=3.0)
    p.add_argument("--device-memory-utilization", type=float, default=0.28,
                   help="MAX's share of free GPU memory per MAX contender (two of them plus transformers)")
    p.add_argument("--deadline-s", type=float, default=float(os.environ.get("E2E_DEADLINE_S", 500)),
                   help="stop starting timing rounds after this many seconds of the driver")
    p.add_argument("--serial-load", action="store_true", help="load the workers one after another")
    args = p.parse_args(argv)
    args.devices = args.devices or ("cpu" if args.dry_run else "gpu")
    if args.ckpt_dir is None and not args.dry_run:
        args.ckpt_dir = "/tmp/qwen3vl-gpu-e2e"
    args.new_tokens = args.new_tokens or (8 if args.dry_run else 64)
    args.repeats = args.repeats if args.repeats is not None else (1 if args.dry_run else 3)
    args.long_prompt_len = args.long_prompt_len or (1024 if args.dry_run else 4096)
    args.batches = [int(b) for b in str(args.batches or ("8,16" if args.dry_run else "8,64")).split(",") if b]
    args.image_sizes = [int(s) for s in str(args.image_sizes).split(",") if s]
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        protocol.serve(WORKER_CLASSES[args.worker], json.loads(args.spec), one_shot=False)
        return 0
    if args.report:
        print(table(json.loads(Path(args.report).read_text())))
        return 0

    run = Run(args)
    res = run.result
    gpu = is_gpu(args.devices)
    encoding = "bfloat16" if gpu else "float32"
    res.update(devices=args.devices, encoding=encoding, dry_run=args.dry_run,
               machine=device_description(args.devices), versions=report.versions())
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = gpu_tag(res["machine"]) if gpu else "cpu-dryrun"
    run.path = out_dir / f"e2e-gpu-{tag}-{run.started:%Y-%m-%d}.json"
    run.say(f"result -> {run.path}; {res['machine'].get('nvidia_smi', '')}")

    # 1. checkpoint
    config = model_config(args)
    res["config"] = config
    res["param_count"] = param_count(config)
    if args.checkpoint:
        model_path = Path(args.checkpoint)
        res["checkpoint"] = {"path": str(model_path), "given": True}
    else:
        parent = Path(args.ckpt_dir or tempfile.mkdtemp(prefix="qwen3vl-gpu-e2e-"))
        model_path = parent / ("tiny-moe-bf16" if args.dry_run else
                               f"30b-a3b-{args.text_layers}t{args.vision_layers}v{args.vocab}-s{args.seed}-bf16")
        if (model_path / "model.safetensors.index.json").is_file():  # written by an earlier run (same name = same draw)
            res["checkpoint"] = {"path": str(model_path), "reused": True}
        else:
            res["checkpoint"] = run.phase("checkpoint", write_checkpoint, config, model_path, args.seed)
            if res["checkpoint"] is None:
                return 1
    run.say(f"checkpoint {model_path}: {res['param_count']:,} parameters, {res['checkpoint']}")

    # 2. bandwidth (the decode floor's denominator), measured before the workers hold the GPU
    bw = run.phase("bandwidth", floor.memory_bandwidth, args.devices)
    res["bandwidth"] = bw
    if gpu:
        try:  # hand the copy buffers back to the device before the workers size their KV caches
            import torch

            torch.cuda.empty_cache()
        except Exception:
            pass

    # 3. workers, started together so that their cold compiles overlap
    tokenizer = json.loads((model_path / "tokenizer.json").read_text())
    added = [tok["id"] for tok in tokenizer.get("added_tokens", [])]
    ordinary = min(added) if added else floor.text_config(config)["vocab_size"]
    rows = rows_spec(args, ordinary)
    max_length = max(args.long_prompt_len, 2048) + args.new_tokens + 256
    spec = {"model_path": str(model_path), "devices": args.devices, "encoding": encoding,
            "max_length": max_length, "max_batch_size": max([1, *args.batches]), "image_size": args.image_sizes[0],
            "device_memory_utilization": args.device_memory_utilization, "hf_impl": "grouped_mm"}
    scratch = Path(tempfile.mkdtemp(prefix="qwen3vl-gpu-e2e-logits-"))
    log_dir = out_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")  # a worker that crashes leaves its Python stack in its log
    workers: dict[str, Proc] = {}
    res["load"] = {}

    def start(name: str) -> None:
        try:
            workers[name] = Proc(name, spec, env, log_dir)
        except Exception as exc:
            res["load"][name] = {"error": f"{type(exc).__name__}: {exc}"}

    def wait(name: str) -> None:
        if name not in workers:
            return
        try:
            hello = workers[name].ready()
            res["load"][name] = {"wall_to_ready_s": hello["wall_to_ready_s"], "setup": hello.get("setup"),
                                 "rss_bytes": hello.get("rss_bytes")}
            run.say(f"{name} ready after {hello['wall_to_ready_s']:.1f} s")
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            res["load"][name] = {"error": text if len(text) < 6000 else text[:1500] + " ... " + text[-4000:]}
            run.say(f"{name} FAILED to load: {str(exc).splitlines()[0][:300]}")
            workers.pop(name).kill()

    def load_all() -> None:
        if args.serial_load:
            for name in args.contenders:
                start(name)
                wait(name)
            return
        for name in args.contenders:
            start(name)
        threads = [threading.Thread(target=wait, args=(n,)) for n in list(workers)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    try:
        run.phase("load", load_all)

        # 4. logits against transformers
        def logits_check() -> dict[str, Any]:
            runs = {}
            for name in ("ours", "builtin"):
                if name in workers:
                    path = str(scratch / f"logits-{name}.npy")  # not in $OUT: 8 files come back at most
                    runs[name] = workers[name].call("logits", image_size=args.image_sizes[0], text=LOGIT_TEXT,
                                                    new_tokens=args.logit_tokens, out_path=path)
                    if "failed" in runs[name]:
                        run.say(f"{name} logits FAILED: {runs[name]['failed'][:300]}")
            if "hf" not in workers:
                return {"runs": runs, "failed": "transformers did not load"}
            check = workers["hf"].call("reference", image_size=args.image_sizes[0], text=LOGIT_TEXT, runs=runs,
                                       tol_factor=args.logit_tol_factor)
            for name, entry in check.get("contenders", {}).items():
                run.say(f"logits {name}: " + (entry.get("failed", "")[:300] or
                        f"max err {entry['max_abs_err']:.3g} vs transformers bf16 {entry['hf_bf16_max_abs_err']:.3g}"
                        f", top-1 {entry['top1_agree']:.0%}: {'pass' if entry['passed'] else 'FAIL'}"))
            return check

        if workers:
            res["logits_check"] = run.phase("logits_check", logits_check)

        # 5. timing rounds, one call at a time, the other workers stopped
        def caller(w: Proc) -> Any:
            def call(row: str) -> dict[str, Any]:
                try:  # a dead worker fails its rows, not the run
                    return w.call("bench", what=rows[row][0], **rows[row][1])
                except Exception as exc:
                    return {"failed": f"{type(exc).__name__}: {exc}"[-2000:]}
            return call

        contenders = []
        for name in args.contenders:
            if name in workers:
                w = workers[name]
                contenders.append(protocol.Contender(name, caller(w), w))
        samples: dict[str, dict[str, list[dict[str, Any]]]] = {c.name: {r: [] for r in rows} for c in contenders}
        res["rounds"] = []

        def timing() -> None:
            total = args.warmup + args.repeats
            for r in range(total):
                if r > 0 and run.left() < 0:
                    run.say(f"deadline: stopping after {r} of {total} rounds")
                    res["rounds"].append({"stopped_at_deadline": r})
                    break
                t = time.perf_counter()
                protocol.run_rounds(contenders, list(workers.values()), list(rows), 0, 1, lambda *_: None)
                for c in contenders:
                    for row in rows:
                        out = c.samples[row][0]
                        if r >= args.warmup or "failed" in out:
                            samples[c.name][row].append(out)
                res["rounds"].append({"round": r, "warmup": r < args.warmup, "s": time.perf_counter() - t})
                res["metrics"] = {c: metrics_of(s, args) for c, s in samples.items()}
                res["samples"] = samples
                run.say(f"round {r + 1}/{total} ({'warmup' if r < args.warmup else 'timed'}): "
                        f"{time.perf_counter() - t:.1f} s; " + "; ".join(
                            f"{c.name}: " + ", ".join(f"{row} {short(c.last[row])}" for row in rows)
                            for c in contenders))
                run.save()

        if contenders:
            run.phase("timing", timing)

        # 6. close the workers (peak RSS), the floor
        for name, w in list(workers.items()):
            if run.left() < -30:  # past the deadline: no waiting on exits (the finally kills them)
                break
            try:
                res["load"][name]["rss_exit_bytes"] = w.close().get("rss_bytes")
            except Exception as exc:
                res["load"][name]["close_error"] = f"{type(exc).__name__}: {exc}"[:500]
    finally:
        for w in workers.values():
            w.kill()

    if bw:
        active = floor.active_bytes(config, 2 if encoding == "bfloat16" else 4, 1)
        res["decode_floor"] = {**active, **floor.floor_at(active["bytes"], 1, bw["gb_s"]), "gb_s": bw["gb_s"],
                               "bytes": active["bytes"],
                               "note": "weights one batch-1 decode step reads (KV and activations left out) over "
                                       "the device copy bandwidth measured in this run"}
    res["markdown"] = table(res)
    run.save()
    if not args.keep_checkpoint and not args.checkpoint and not args.ckpt_dir:
        subprocess.run(["rm", "-rf", str(model_path.parent)], check=False)
    print(f"\nwrote {run.path} ({(time.perf_counter() - run.t0) / 60:.1f} min)\n")
    print(res["markdown"], flush=True)
    return 0


def short(out: dict[str, Any]) -> str:
    if "failed" in out:
        return "FAILED"
    if "prefill_s" in out:
        return f"{out['prefill_s'] * 1e3:.0f}ms/{out['decode_tok_s']:.0f}tok/s"
    return f"{out.get('s', float('nan')) * 1e3:.1f}ms"


if __name__ == "__main__":
    sys.exit(main())
