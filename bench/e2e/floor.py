"""The decode floor: weights one decode step must read over the memory bandwidth measured in the run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from workers import is_gpu, torch_device


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


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    return config.get("text_config", config)


def experts_hit(tc: dict[str, Any], batch: int) -> float:
    """Expected distinct experts per MoE layer that ``batch`` tokens select, under uniform routing."""
    E = tc.get("num_experts", 0)
    return E * (1 - (1 - tc["num_experts_per_tok"] / E) ** batch) if E else 0.0


def active_bytes(config: dict[str, Any], bytes_per_param: float, batch: int) -> dict[str, Any]:
    """Weights one decode step reads, by part (params), for ``batch`` tokens, all at one dtype."""
    tc = text_config(config)
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
    hit = experts_hit(tc, batch)
    if E:
        parts["router"] = len(moe_layers) * E * H
        parts["experts"] = round(len(moe_layers) * hit * 3 * H * tc["moe_intermediate_size"])
    parts["dense_mlp"] = (L - len(moe_layers)) * 3 * H * tc["intermediate_size"]
    parts["embedding_rows"] = batch * H
    parts["final_norm"] = H
    parts["lm_head"] = V * H
    params = sum(parts.values())
    return {"batch": batch, "experts_hit_per_layer": hit, "params": params,
            "bytes": round(params * bytes_per_param), "parts": parts}


def gguf_active_bytes(gguf_path: Path, config: dict[str, Any], batch: int, gguf_py: Path) -> dict[str, Any]:
    """The same count from a GGUF's stored tensor sizes (its own types: Q8_0 blocks, F32 norms, ...).

    Expert tensors (``*_exps``) count the expected share of experts hit, the
    token embedding ``batch`` rows, everything else in full.
    """
    import sys

    if str(gguf_py) not in sys.path:
        sys.path.insert(0, str(gguf_py))
    from gguf import GGUFReader

    tc = text_config(config)
    E, V = tc.get("num_experts", 0), tc["vocab_size"]
    hit = experts_hit(tc, batch)
    parts = {"experts": 0.0, "token_embd_rows": 0.0, "other": 0.0}
    types: dict[str, int] = {}
    for tensor in GGUFReader(str(gguf_path)).tensors:
        size = int(tensor.n_bytes)
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + size
        if "_exps" in tensor.name and E:
            parts["experts"] += size * hit / E
        elif tensor.name.startswith("token_embd"):
            parts["token_embd_rows"] += size * min(batch, V) / V
        else:
            parts["other"] += size
    return {"batch": batch, "experts_hit_per_layer": hit, "bytes": round(sum(parts.values())),
            "parts": {k: round(v) for k, v in parts.items()}, "bytes_by_type": types}


def floor_at(step_bytes: int, batch: int, gb_s: float) -> dict[str, float]:
    step_s = step_bytes / (gb_s * 1e9)
    return {"step_ms": 1e3 * step_s, "max_tok_s": batch / step_s}
