"""CPU benchmarks of the project's Mojo kernels against torch, measured in the same run.

    python bench/kernels.py                 # every benchmark
    python bench/kernels.py --only moe      # one (or several: --only moe vision_x)
    python bench/kernels.py --list

Each benchmark is a function in BENCHES taking the parsed args; it prints its own
lines. Timings are medians over --repeats calls after --warmup calls, ours and the
torch references measured in the same run (timed_rounds: interleaved round by
round; timed_blocks: in blocks, two passes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))


def timed_rounds(fns: dict, warmup: int, repeats: int) -> dict:
    """Median seconds of each callable, run interleaved round by round."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def timed_blocks(fns: dict, warmup: int, repeats: int, passes: int = 2):
    """(median, fastest) seconds of each callable, timed in blocks: each pass runs
    every callable warmup + repeats/passes times in a row, with a pause between
    callables. Unlike interleaving, this keeps one contender's idle-spinning threads
    (OpenMP/MKL spin for a while after each parallel region) from slowing the next."""
    times = {k: [] for k in fns}
    per_pass = max(1, -(-repeats // passes))
    for _ in range(passes):
        for k, f in fns.items():
            time.sleep(0.3)
            for _ in range(warmup):
                f()
            for _ in range(per_pass):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()})


def dense_gemm_fn(n: int = 2048):
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    return (lambda: torch.matmul(a, b)), 2.0 * n**3


# ----------------------------------------------------------------------------- MoE
def bf16_buffer(a: np.ndarray):
    """A bfloat16 Buffer of a float32 array (numpy has no bf16: through torch and dlpack)."""
    from max.driver import Buffer

    return Buffer.from_dlpack(torch.from_numpy(a).bfloat16())


def expert_weights(layout: str, gu_hub: np.ndarray, dn_hub: np.ndarray, dtype) -> list:
    """(gate_up, down) Buffers from hub-layout float32 experts, in ``layout`` and ``dtype``."""
    from max.driver import Buffer
    from max.dtype import DType

    from qwen3vl_moe.kernels.moe import pack_expert_panels

    arrays = {"hub": (gu_hub, dn_hub), "panels": (gu_hub, dn_hub),
              "transformers": (gu_hub.transpose(0, 2, 1), dn_hub.transpose(0, 2, 1))}[layout]
    if layout != "panels":
        return [Buffer.from_numpy(np.ascontiguousarray(a)) if dtype == DType.float32 else
                bf16_buffer(np.ascontiguousarray(a)) for a in arrays]
    if dtype == DType.float32:
        return [Buffer.from_numpy(pack_expert_panels(a, g, pairs=False)) for a, g in zip(arrays, (2, 1))]
    out = []
    for a, g in zip(arrays, (2, 1)):
        bits = torch.from_numpy(a).bfloat16().view(torch.int16).numpy().view(np.uint16)
        b = Buffer.from_numpy(pack_expert_panels(bits, g, pairs=True))
        out.append(b.view(DType.bfloat16, b.shape))
    return out


def bench_moe(args) -> None:
    """Grouped MoE experts (route + gate_up/SwiGLU + down/combine) vs a torch per-expert loop."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    from qwen3vl_moe.kernels import kernel_package
    from qwen3vl_moe.kernels.moe import moe_experts, moe_experts_panels

    T, E, K, H, I = args.moe_shape
    flops = 2.0 * T * K * (H * 2 * I + I * H)
    dev = DeviceRef.CPU()
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, H)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    gu_hub = (rng.standard_normal((E, H, 2 * I)) / np.sqrt(H)).astype(np.float32)
    dn_hub = (rng.standard_normal((E, I, H)) / np.sqrt(I)).astype(np.float32)

    # torch reference: per-expert matmul loop (routing included), hub layout x @ W[e]
    xt, lt = torch.from_numpy(x), torch.from_numpy(logits)
    w1, w2 = torch.from_numpy(gu_hub), torch.from_numpy(dn_hub)

    def torch_loop(dtype=torch.float32, xt=xt, w1=w1, w2=w2):
        p = torch.softmax(lt, dim=-1, dtype=torch.float32)
        tv, ti = torch.topk(p, K, dim=-1)
        tv = (tv / tv.sum(dim=-1, keepdim=True)).to(dtype)
        y = torch.zeros(T, H, dtype=dtype)
        for e in range(E):
            tok, kk = torch.where(ti == e)
            if tok.numel() == 0:
                continue
            gu = xt[tok] @ w1[e]
            h = torch.nn.functional.silu(gu[:, :I]) * gu[:, I:]
            y.index_add_(0, tok, (h @ w2[e]) * tv[tok, kk, None])
        return y

    dense, dense_flops = dense_gemm_fn()
    print(f"MoE experts on CPU ({torch.get_num_threads()} torch threads): T={T} E={E} top-{K} "
          f"H={H} I={I}; {flops / 1e9:.2f} GFLOP per call")

    # f32; bf16 (activations and weights); mixed: float32 activations, bfloat16 weights
    dtypes = ["f32"] + (["bf16"] if args.bf16 else []) + (["mixed"] if args.mixed else [])
    for dt in dtypes:
        for name in args.layouts:
            hub = name == "hub"
            xdt = DType.bfloat16 if dt == "bf16" else DType.float32
            bufs = [Buffer.from_numpy(a) if xdt == DType.float32 else bf16_buffer(a) for a in (x, logits)]
            bufs += expert_weights(name, gu_hub, dn_hub, DType.float32 if dt == "f32" else DType.bfloat16)
            ins = [TensorType(xdt, s, dev) for s in (["T", H], ["T", E])]
            ins += [TensorType(b.dtype, b.shape, dev) for b in bufs[2:]]
            t0 = time.perf_counter()
            with Graph(f"bench_moe_{dt}_{name}", input_types=ins,
                       custom_extensions=[kernel_package("text")]) as g:
                xv, lv, guv, dnv = (v.tensor for v in g.inputs)
                if name == "panels":
                    y = moe_experts_panels(xv, lv, guv, dnv, top_k=K, intermediate_size=I)
                else:
                    y = moe_experts(xv, lv, guv, dnv, top_k=K, weights_hub_layout=hub)
                g.output(y)
            model = session.load(g)
            compile_s = time.perf_counter() - t0

            def ours(model=model, bufs=bufs):
                model.execute(*bufs)

            contenders = {"ours": ours, "torch_loop": torch_loop, "dense": dense}
            if dt != "f32":
                xb, w1b, w2b = xt.bfloat16(), w1.bfloat16(), w2.bfloat16()
                contenders["torch_loop"] = lambda: torch_loop(torch.bfloat16, xb, w1b, w2b)
            med, fast = timed_blocks(contenders, args.warmup, args.repeats)
            for label, t in (("median", med), ("best  ", fast)):
                ours_gf = flops / t["ours"] / 1e9
                loop_gf = flops / t["torch_loop"] / 1e9
                dense_gf = dense_flops / t["dense"] / 1e9
                print(f"  [{dt} {name:12s} {label}] ours {t['ours'] * 1e3:7.2f} ms = {ours_gf:6.1f} GFLOP/s | "
                      f"torch per-expert loop {t['torch_loop'] * 1e3:7.2f} ms = {loop_gf:6.1f} GFLOP/s, "
                      f"ours/torch speed {t['torch_loop'] / t['ours']:.2f}x | dense fp32 GEMM (2048^3) "
                      f"{dense_gf:6.1f} GFLOP/s, ours = {100 * ours_gf / dense_gf:.0f}% of it")
            print(f"  [{dt} {name:12s}] graph build+load {compile_s:.0f} s; median / fastest of "
                  f"{args.repeats} calls each, timed in blocks (2 passes over the contenders)")


# ----------------------------------------------------------------------------- weight dtypes at decode
def bench_weight_dtypes(args) -> None:
    """Decode-shaped linear and MoE, float32 activations, float32 vs bfloat16 weights (bytes read per call)."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    from qwen3vl_moe.kernels import kernel_package
    from qwen3vl_moe.kernels.linear import linear
    from qwen3vl_moe.kernels.moe import moe_experts, moe_experts_panels

    # Qwen3-VL-30B-A3B's expert dims (E=128, top-8, H=2048, I=768) and a 16384 x 2048
    # projection: the weights touched per call are far larger than the caches.
    M, N, H, E, K, I = args.decode_rows, 16384, 2048, 128, 8, 768
    dev = DeviceRef.CPU()
    session = InferenceSession(devices=[CPU()])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, H)).astype(np.float32)
    logits = rng.standard_normal((M, E)).astype(np.float32)
    w = (rng.standard_normal((N, H)) / np.sqrt(H)).astype(np.float32)
    gu = (rng.standard_normal((E, H, 2 * I)) / np.sqrt(H)).astype(np.float32)
    dn = (rng.standard_normal((E, I, H)) / np.sqrt(I)).astype(np.float32)
    experts_touched = len(np.unique(np.argsort(-logits, axis=1)[:, :K]))
    calls = {}
    for wdt, mdt in (("f32", DType.float32), ("bf16", DType.bfloat16)):
        ins = [TensorType(DType.float32, [M, H], dev), TensorType(DType.float32, [M, E], dev),
               TensorType(mdt, [N, H], dev), TensorType(mdt, gu.shape, dev), TensorType(mdt, dn.shape, dev)]
        with Graph(f"bench_decode_linear_{wdt}", input_types=ins[:1] + ins[2:3],
                   custom_extensions=[kernel_package("text")]) as g:
            g.output(linear(g.inputs[0].tensor, g.inputs[1].tensor))
        lin = session.load(g)
        xb, lb = Buffer.from_numpy(x), Buffer.from_numpy(logits)
        wb = Buffer.from_numpy(w) if wdt == "f32" else bf16_buffer(w)
        calls[f"linear {wdt}"] = (lambda m=lin, a=xb, b=wb: m.execute(a, b), N * H)
        for lay in ("hub", "panels"):
            gub, dnb = expert_weights(lay, gu, dn, mdt)
            with Graph(f"bench_decode_moe_{lay}_{wdt}", input_types=ins[:2] + [
                    TensorType(mdt, b.shape, dev) for b in (gub, dnb)], custom_extensions=[kernel_package("text")]) as g:
                xv, lv, guv, dnv = (v.tensor for v in g.inputs)
                g.output(moe_experts_panels(xv, lv, guv, dnv, top_k=K, intermediate_size=I) if lay == "panels"
                         else moe_experts(xv, lv, guv, dnv, top_k=K, weights_hub_layout=True))
            moe = session.load(g)
            calls[f"moe {lay} {wdt}"] = (lambda m=moe, a=xb, b=lb, c=gub, d=dnb: m.execute(a, b, c, d),
                                         experts_touched * 3 * H * I)
    t = timed_rounds({k: f for k, (f, _) in calls.items()}, args.warmup, args.repeats)
    print(f"Decode-shaped ops, {M} row(s), float32 activations: linear [{N}, {H}]; MoE E={E} top-{K} H={H} I={I} "
          f"({experts_touched} experts touched); median of {args.repeats} interleaved rounds")
    for op in ("linear", "moe hub", "moe panels"):
        for wdt, size in (("f32", 4), ("bf16", 2)):
            sec = t[f"{op} {wdt}"]
            print(f"  {op:10s} {wdt:4s} weights: {sec * 1e3:7.2f} ms, {calls[f'{op} {wdt}'][1] * size / sec / 1e9:6.1f} GB/s "
                  "of weights read")
        print(f"  {op:10s} bf16 / f32 speed: {t[f'{op} f32'] / t[f'{op} bf16']:.2f}x")


# ----------------------------------------------------------------------------- vision
def bench_vision_attention(args) -> None:
    """Vision varlen attention (4 images of 32x32 patches, 16 heads x 72) vs torch SDPA per segment."""
    import torch.nn.functional as F
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType

    from qwen3vl_moe.kernels import kernel_package
    from qwen3vl_moe.kernels.attention import varlen_attention

    S, L, H, D = 4, 1024, 16, 72
    N, scale = S * L, D**-0.5
    flops = 4.0 * S * L * L * H * D
    dev = DeviceRef.CPU()
    # one graph, f32 and bf16 ops with separate symbolic dims
    ins = [TensorType(DType.float32, ["N", "H", "D"], dev)] * 3 + [TensorType(DType.int32, ["S1"], dev)]
    ins += [TensorType(DType.bfloat16, ["N2", "H2", "D2"], dev)] * 3 + [TensorType(DType.int32, ["S2"], dev)]
    t0 = time.perf_counter()
    with Graph("bench_vision_attention", input_types=ins, custom_extensions=[kernel_package("attention")]) as g:
        q, k, v, cu, q2, k2, v2, cu2 = (x.tensor for x in g.inputs)
        g.output(varlen_attention(q, k, v, cu, scale=scale), varlen_attention(q2, k2, v2, cu2, scale=scale))
    model = InferenceSession(devices=[CPU()]).load(g)
    compile_s = time.perf_counter() - t0
    print(f"Vision varlen attention on CPU ({torch.get_num_threads()} torch threads): {S} segments x {L}, "
          f"{H} heads x {D}; {flops / 1e9:.2f} GFLOP per call (4*S*L^2*heads*hd) | graph build+load {compile_s:.0f} s")

    torch.manual_seed(0)
    qkv = [torch.randn(N, H, D) for _ in range(3)]
    cu_b = Buffer.from_numpy((np.arange(S + 1) * L).astype(np.int32))
    tiny = [Buffer.from_numpy(np.ones((1, 1, 8), np.float32)) for _ in range(3)]
    tiny16 = [Buffer.from_dlpack(torch.ones(1, 1, 8, dtype=torch.bfloat16)) for _ in range(3)]
    tiny_cu = Buffer.from_numpy(np.array([0, 1], np.int32))
    dense, dense_flops = dense_gemm_fn()
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        xs = [x.to(dt) for x in qkv]
        bufs = [Buffer.from_dlpack(x) for x in xs]
        feed, pick = ((bufs + [cu_b] + tiny16 + [tiny_cu], 0) if name == "f32"
                      else (tiny + [tiny_cu] + bufs + [cu_b], 1))

        def ours(feed=feed, pick=pick, model=model):
            return model.execute(*feed)[pick]

        def sdpa(xs=xs):
            out = []
            for s in range(S):
                seg = [x[s * L:(s + 1) * L].transpose(0, 1)[None] for x in xs]
                out.append(F.scaled_dot_product_attention(*seg, scale=scale)[0].transpose(0, 1))
            return torch.cat(out)

        err = (torch.from_dlpack(ours()).float() - sdpa().float()).abs().max().item()
        t = timed_rounds({"ours": ours, "sdpa": sdpa, "dense": dense}, args.warmup, max(3, args.repeats // 3))
        print(f"  [{name:4s}] ours {t['ours'] * 1e3:7.2f} ms = {flops / t['ours'] / 1e9:6.1f} GFLOP/s | "
              f"torch SDPA per segment {t['sdpa'] * 1e3:7.2f} ms = {flops / t['sdpa'] / 1e9:6.1f} GFLOP/s, "
              f"ratio ours/torch speed {t['sdpa'] / t['ours']:.2f}x | dense fp32 GEMM (2048^3) "
              f"{dense_flops / t['dense'] / 1e9:6.1f} GFLOP/s | max |ours - sdpa| {err:.1e}")


def bench_vision_pos_embed(args) -> None:
    """Bilinear position embedding (2304x1152 table) vs transformers' indices/weights + gathers."""
    from max.driver import CPU, Buffer
    from max.dtype import DType
    from max.engine import InferenceSession
    from max.graph import DeviceRef, Graph, TensorType
    from transformers.vision_utils import get_vision_bilinear_indices_and_weights

    from qwen3vl_moe.kernels import kernel_package
    from qwen3vl_moe.kernels.vision import bilinear_pos_embed

    side, merge, hidden = 48, 2, 1152
    dev = DeviceRef.CPU()
    ins = [TensorType(DType.float32, [side * side, hidden], dev),
           TensorType(DType.bfloat16, [side * side, hidden], dev),
           TensorType(DType.int64, ["G", 3], dev)]
    t0 = time.perf_counter()
    with Graph("bench_vision_pos_embed", input_types=ins, custom_extensions=[kernel_package("vision")]) as g:
        t32, t16, grid = (x.tensor for x in g.inputs)
        kw = dict(merge_size=merge, num_grid_per_side=side)
        g.output(bilinear_pos_embed(t32, grid, **kw), bilinear_pos_embed(t16, grid, **kw))
    model = InferenceSession(devices=[CPU()]).load(g)
    print(f"Vision bilinear position embedding on CPU: table {side * side}x{hidden}, merge {merge} "
          f"| graph build+load {time.perf_counter() - t0:.0f} s")

    torch.manual_seed(0)
    table = torch.randn(side * side, hidden)
    for grid_list in ([[1, 64, 64]], [[4, 32, 32]]):
        grid_t = torch.tensor(grid_list, dtype=torch.int64)
        n = int((grid_t[:, 0] * grid_t[:, 1] * grid_t[:, 2]).sum())
        for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
            emb = torch.nn.Embedding.from_pretrained(table.to(dt))
            feeds = [Buffer.from_dlpack(table), Buffer.from_dlpack(table.bfloat16()),
                     Buffer.from_numpy(grid_t.numpy())]
            pick = 0 if name == "f32" else 1

            def ours(feeds=feeds, pick=pick, model=model):
                return model.execute(*feeds)[pick]

            def hf(grid_t=grid_t, emb=emb):
                with torch.no_grad():
                    idx, w = get_vision_bilinear_indices_and_weights(grid_t, side, merge)
                    return (emb(idx) * w[:, :, None]).sum(0)

            err = (torch.from_dlpack(ours()) - hf()).abs().max().item()
            t = timed_rounds({"ours": ours, "hf": hf}, args.warmup, args.repeats)
            nbytes = n * hidden * (4 + 4 * table.to(dt).element_size())   # written + 4 rows gathered
            print(f"  [{name:4s} grid {'x'.join(map(str, grid_list[0]))} -> {n}x{hidden}] ours "
                  f"{t['ours'] * 1e3:6.2f} ms = {nbytes / t['ours'] / 1e9:5.1f} GB/s | transformers "
                  f"{t['hf'] * 1e3:7.2f} ms = {nbytes / t['hf'] / 1e9:5.1f} GB/s, ratio ours/transformers "
                  f"speed {t['hf'] / t['ours']:.1f}x | max |ours - hf| {err:.1e}")


BENCHES = {
    "moe": bench_moe,
    "vision_attention": bench_vision_attention,
    "vision_pos_embed": bench_vision_pos_embed,
    "weight_dtypes": bench_weight_dtypes,
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="benchmarks to run")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--moe-shape", type=int, nargs=5, default=[512, 32, 4, 1024, 384],
                    metavar=("T", "E", "TOPK", "H", "I"))
    ap.add_argument("--layouts", nargs="+", default=["hub", "transformers", "panels"],
                    choices=["hub", "transformers", "panels"], help="MoE weight layouts (panels: packed for the CPU)")
    ap.add_argument("--bf16", action="store_true", help="MoE: also the bfloat16 variant")
    ap.add_argument("--mixed", action="store_true", help="MoE: also float32 activations with bfloat16 weights")
    ap.add_argument("--decode-rows", type=int, default=1, help="weight_dtypes: rows (tokens) per call")
    args = ap.parse_args(argv)
    if args.list:
        for name, fn in BENCHES.items():
            print(f"{name:12s} {fn.__doc__.strip().splitlines()[0]}")
        return
    for name in args.only or BENCHES:
        BENCHES[name](args)


if __name__ == "__main__":
    main()
