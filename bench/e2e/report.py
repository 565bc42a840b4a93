"""Summaries, ratios against the targets, the machine's description and the printed tables."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LABELS = {"ours": "ours (MAX)", "hf:grouped_mm": "transformers grouped_mm", "hf:eager": "transformers eager",
          "llama:f32": "llama.cpp F32", "llama:f16": "llama.cpp F16", "llama:q8_0": "llama.cpp Q8_0"}
HF = ("hf:grouped_mm", "hf:eager")


@dataclass(frozen=True)
class Target:
    """ours against the best of ``refs`` that ran (or the decode floor, ref ``floor``)."""

    title: str
    metric: str
    refs: tuple[str, ...]
    bound: float
    issue: int
    kind: str = "faster"  # "faster": ours/best speed >= bound; "rss": ours/ref <= bound; "floor": ours/floor >= bound


def targets(encoding: str) -> list[Target]:
    """Issue 14's targets (against llama.cpp with the same weights) and issue 6's (against transformers)."""
    same = "llama:f32" if encoding == "float32" else "llama:f16"
    b1_bound = 1.3 if encoding == "float32" else 1.2
    return [
        Target("prefill", "prefill_tok_s", (*HF, "llama:f32"), 1.5, 14),
        Target("decode b1", "decode_b1_tok_s", (same,), b1_bound, 14),
        Target("decode bN", "decode_bN_tok_s", ("llama:f32",), 1.5, 14),
        Target("vision", "vision_ms", (*HF, "llama:f32"), 1.5, 14),
        Target("decode b1 at the floor", "decode_b1_tok_s", ("floor",), 0.8, 14, "floor"),
        Target("decode bN at the floor", "decode_bN_tok_s", ("floor",), 0.8, 14, "floor"),
        Target("peak RSS", "peak_rss_bytes", (same,), 1.3, 14, "rss"),
        Target("decode b1 vs transformers", "decode_b1_tok_s", HF, 2.0, 6),
        Target("decode bN vs transformers", "decode_bN_tok_s", HF, 2.0, 6),
    ]


def summarize(samples: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples),
            "samples": samples}


def metrics(samples: dict[str, list[dict[str, Any]]], prompt_len: int, peak_rss_bytes: int) -> dict[str, Any]:
    """One contender's figures from its samples of the ``long``, ``batch`` and ``vision`` benches."""
    long, batch, vision = samples["long"], samples["batch"], samples["vision"]
    return {
        "prefill_tok_s": summarize([prompt_len / x["prefill_s"] for x in long]),
        "decode_b1_tok_s": summarize([x["decode_tok_s"] for x in long]),
        "decode_bN_tok_s": summarize([x["decode_tok_s"] for x in batch]),
        "decode_b1_step_ms": summarize([x["step_ms"] for x in long]),
        "decode_bN_step_ms": summarize([x["step_ms"] for x in batch]),
        "vision_ms": summarize([1e3 * x["s"] for x in vision]),
        "vision_patches": vision[0]["patches"],
        "vision_merged_tokens": vision[0]["merged_tokens"],
        "peak_rss_bytes": peak_rss_bytes,
    }


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def median(metrics: dict[str, Any], name: str, key: str) -> float | None:
    value = metrics.get(name, {}).get(key)
    if isinstance(value, dict):
        value = value["median"]
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def judge(metrics: dict[str, Any], floors: dict[str, Any], encoding: str) -> list[dict[str, Any]]:
    """Each target: the reference that ran (the best of its refs), ours' ratio, met or not (None: not measurable)."""
    out = []
    for t in targets(encoding):
        ours = median(metrics, "ours", t.metric)
        row: dict[str, Any] = {"title": t.title, "metric": t.metric, "bound": t.bound, "issue": t.issue,
                               "kind": t.kind, "refs": list(t.refs), "ref": None, "ratio": None, "met": None}
        if t.kind == "floor":
            key = "b1" if "b1" in t.metric else "bN"
            ref_value = (floors.get("ours") or {}).get(key, {}).get("max_tok_s")
            row["ref"] = "floor"
        else:
            ran = {r: median(metrics, r, t.metric) for r in t.refs}
            ran = {r: v for r, v in ran.items() if v is not None}
            row["not_run"] = [r for r in t.refs if r not in ran]
            if not ran:
                ref_value = None
            else:
                lower_better = t.metric in ("vision_ms", "peak_rss_bytes")
                row["ref"] = (min if lower_better else max)(ran, key=ran.__getitem__)
                ref_value = ran[row["ref"]]
        if ours is None or ref_value is None:
            out.append(row)
            continue
        if t.kind == "rss":
            row["ratio"] = ours / ref_value
            row["met"] = row["ratio"] <= t.bound
        elif t.metric == "vision_ms":
            row["ratio"] = ref_value / ours
            row["met"] = row["ratio"] >= t.bound
        else:
            row["ratio"] = ours / ref_value
            row["met"] = row["ratio"] >= t.bound
        out.append(row)
    return out


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
    info["amx"] = sorted(f for f in flags if f.startswith("amx"))
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
            for key in f.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def render(result: dict[str, Any], args: Any) -> tuple[str, str]:
    """The results table, the targets table and notes: as aligned text and as markdown."""
    metrics, floors = result["metrics"], result["decode_floor"]
    names = list(metrics)
    B = args.batch
    rows = [
        (f"prefill tok/s ({args.prompt_len} tokens, batch 1)", lambda n: fmt(median(metrics, n, "prefill_tok_s"), 0)),
        (f"decode tok/s, batch 1 ({args.new_tokens} new)", lambda n: fmt(median(metrics, n, "decode_b1_tok_s"))),
        (f"decode tok/s, batch {B} ({args.batch_prompt_len}-token prompts)",
         lambda n: fmt(median(metrics, n, "decode_bN_tok_s"))),
        (f"vision encoder ms / {args.image_size}x{args.image_size} image", lambda n: fmt(median(metrics, n, "vision_ms"), 0)),
        ("peak RSS GiB", lambda n: fmt((median(metrics, n, "peak_rss_bytes") or math.nan) / 2**30, 2)),
        ("decode floor tok/s, batch 1", lambda n: fmt((floors.get(n) or {}).get("b1", {}).get("max_tok_s"))),
        (f"decode floor tok/s, batch {B}", lambda n: fmt((floors.get(n) or {}).get("bN", {}).get("max_tok_s"))),
    ]
    header = ["", *(LABELS[n] for n in names)]
    lines = [[title, *(cell(n) for n in names)] for title, cell in rows]

    t_header = ["target", "reference", "ours / reference", "bound", "result"]
    t_lines = []
    for j in result["targets"]:
        refs = " / ".join(j["refs"])
        ran = "" if j["ref"] in (None, "floor") or len(j["refs"]) == 1 else f" (best: {j['ref']})"
        bound = f"<= {j['bound']}x" if j["kind"] == "rss" else f">= {j['bound']:g}x"
        verdict = "not measured" if j["met"] is None else "met" if j["met"] else "not met"
        if j["met"] is not None and j.get("not_run"):
            verdict += f" (without {', '.join(j['not_run'])})"
        ratio = "-" if j["ratio"] is None else fmt(j["ratio"], 2) + "x"
        title = j["title"].replace("bN", f"b{B}")
        t_lines.append([f"{title} (issue {j['issue']})", refs + ran, ratio, bound, verdict])

    notes = [(f"bandwidth {result['bandwidth_gb_s']:.1f} GB/s (best of the run's measurements); floors: weights "
              f"read per step ({B} tokens hit {result['experts_hit_bN']:.1f} experts/layer under uniform routing)")]
    notes.append(f"ours: KV cache {result['args'].get('kv_cache_format') or 'in the compute dtype'}")
    llama = result.get("llama")
    if llama:
        notes.append(f"llama.cpp: KV cache {llama['kv_type']}, weight repacking {llama['repack']}, "
                     f"{llama['threads']} threads, mmproj F32 "
                     f"(vision measured with the F32 text model); build "
                     + ", ".join(sorted({t["llama-bench"]["build_commit"] for t in llama["tools"].values()
                                         if "llama-bench" in t})))
        check = llama.get("greedy_check")
        if check:
            notes.append(f"llama.cpp F32 greedy text vs transformers ({check['new_tokens']} tokens): "
                         + ("identical" if check["identical"] else f"DIFFERENT ({check})"))
    comp = result["compile"]
    if comp:
        parts = []
        for key in ("cold", "cached", "default_cache"):
            if key in comp:
                timers = "; ".join(f"{name} {fmt(t.get('total_s'))} s, of which compile {fmt(t.get('compile_s'))} s, "
                                   f"init {fmt(t.get('init_s'))} s" for name, t in comp[key]["max_timer"].items())
                parts.append(f"{key}: {comp[key]['load_s']:.1f} s load (MAX's timers: {timers or '-'})")
        notes.append("our pipeline, " + "; ".join(parts))
    cpu = result["machine"].get("cpu") or {}
    if cpu:
        gemm = (result.get("hf_setup") or {}).get("torch_gemm_gflop_s")
        notes.append(f"CPU: {cpu.get('model name')} ({cpu.get('vendor_id')} family {cpu.get('cpu family')} "
                     f"model {cpu.get('model')}, {cpu.get('vector_isa')}"
                     + (f", {'/'.join(cpu['amx'])}" if cpu.get("amx") else "")
                     + f") x {result['machine']['cpu_count']}"
                     + (f"; torch float32 1024^3 matmul {gemm:.0f} GFLOP/s" if gemm else ""))
    notes.append(f"medians of {args.repeats} rounds after {args.warmup} warm-up; "
                 f"{result['param_count']:,} parameters; {result['devices']} {result['encoding']}; "
                 f"load average {result['machine']['loadavg_start'][0]:.1f} -> {result['machine']['loadavg_end'][0]:.1f}")

    def text_table(head: list[str], body: list[list[str]]) -> str:
        widths = [max(len(str(line[i])) for line in [head, *body]) for i in range(len(head))]
        return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                   for i, (c, w) in enumerate(zip(line, widths))) for line in [head, *body])

    def md_table(head: list[str], body: list[list[str]]) -> str:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                          *("| " + " | ".join(str(c) for c in line) + " |" for line in body)])

    table = text_table(header, lines) + "\n\n" + text_table(t_header, t_lines) + "\n" + "\n".join(notes)
    markdown = (md_table(header, lines) + "\n\n" + md_table(t_header, t_lines) + "\n\n"
                + "\n".join(f"- {n}" for n in notes))
    return table, markdown
