# GPU check of the MoE kernels (mojo_kernels/text): routing, grouped gate_up + SwiGLU,
# grouped down + routing weight + un-permute, combine — exactly the launches the MAX
# custom ops make (text.routing.enqueue_route_gpu, text.gpu_moe.enqueue_*_gpu).
#
# Shape: Qwen3-VL-30B-A3B, T = 4096 tokens, top-8 of E = 128 experts (32768 routed
# rows), H = 2048, I = 768. Configs: {bf16 (tensor cores; ldmatrix and scalar-load
# fragment variants), f32 (FMA)} x {hub layout, transformers layout}.
# Inputs are random (hash-based, never zero). Checks, per config:
#   * routing: offsets/perm form a stable sort of the slots by the GPU's expert ids (all
#     tokens); ids/weights equal the CPU routing code's on 256 sampled tokens;
#   * y: max |y_gpu - y_ref| / max |y_ref| on 32 sampled tokens, y_ref computed on the
#     host in float64 from the GPU's routing (f32 <= 1e-4, bf16 <= 3e-2);
# then times each stage with device-side timing after warm-up and prints TFLOP/s
# against the 790 TFLOP/s dense bf16 ceiling (H100/H200).
#
# Build: bench/gpu/build.sh   Run (GPU machine): bench/gpu/run.sh
from max.gpu.host import DeviceBuffer, DeviceContext
from max.gpu import thread_idx, block_idx
from std.math import exp

from text.routing import enqueue_route_gpu, route_counts_size, route_token
from text.gpu_moe import enqueue_gate_up_gpu, enqueue_down_gpu

comptime T = 4096
comptime TOPK = 8
comptime E = 128
comptime H = 2048
comptime I = 768
comptime S = T * TOPK
comptime PEAK_TFLOPS = 790.0
comptime WARMUP = 3
comptime ITERS = 20
comptime N_REF_TOKENS = 32
comptime N_ROUTE_TOKENS = 256


def fill_kernel[dtype: DType](
    p: Pointer[Scalar[dtype], MutAnyOrigin], n: Int64, seed: UInt64, scale: Float32
):
    """Fill: p[i] = scale * u(i), u uniform in [-1, 1) from a splitmix64 hash (never all-zero)."""
    var stride = Int64(65536 * 256)
    var i = Int64(block_idx.x) * 256 + Int64(thread_idx.x)
    while i < n:
        var z = UInt64(i) * 0x9E3779B97F4A7C15 + seed
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        var u = Float32(z >> 40) * (1.0 / 16777216.0)
        p[unsafe_offset=Int(i)] = ((2 * u - 1) * scale).cast[dtype]()
        i += stride


def fill[dtype: DType](
    ctx: DeviceContext, p: Pointer[Scalar[dtype], MutAnyOrigin], n: Int, seed: Int, scale: Float32
) raises:
    ctx.enqueue_function[fill_kernel[dtype]](
        p, Int64(n), UInt64(seed), scale, grid_dim=65536, block_dim=256
    )


def to_host[dtype: DType](ctx: DeviceContext, src: DeviceBuffer[dtype]) raises -> List[Scalar[dtype]]:
    """Device -> host copy of a whole buffer (DtoH into ordinary host memory)."""
    var out = List[Scalar[dtype]](length=len(src), fill=0)
    ctx.enqueue_copy(out.unsafe_ptr().as_unsafe_any_origin(), src)
    ctx.synchronize()
    return out^


struct Result(Copyable, Movable):
    var name: String
    var ok: Bool
    var err: Float64
    var route_bad: Int
    var t_route: Float64
    var t_gu: Float64
    var t_dn: Float64

    def __init__(out self, name: String, ok: Bool, err: Float64, route_bad: Int, t_route: Float64, t_gu: Float64, t_dn: Float64):
        self.name = name
        self.ok = ok
        self.err = err
        self.route_bad = route_bad
        self.t_route = t_route
        self.t_gu = t_gu
        self.t_dn = t_dn


def run_config[dtype: DType, hub: Bool, ldsm: Bool = True](ctx: DeviceContext, name: String) raises -> Result:
    print("==", name, ": T", T, "top_k", TOPK, "E", E, "H", H, "I", I)
    var x_b = ctx.enqueue_create_buffer[dtype](T * H)
    var l_b = ctx.enqueue_create_buffer[dtype](T * E)
    var gu_b = ctx.enqueue_create_buffer[dtype](E * H * 2 * I)
    var dn_b = ctx.enqueue_create_buffer[dtype](E * I * H)
    var rw_b = ctx.enqueue_create_buffer[dtype](S)
    var ids_b = ctx.enqueue_create_buffer[DType.int32](S)
    var perm_b = ctx.enqueue_create_buffer[DType.int32](S)
    var off_b = ctx.enqueue_create_buffer[DType.int32](E + 1)
    var counts_b = ctx.enqueue_create_buffer[DType.int32](route_counts_size(S, E))
    var h_b = ctx.enqueue_create_buffer[dtype](S * I)
    var ws_b = ctx.enqueue_create_buffer[dtype](S * H)
    var y_b = ctx.enqueue_create_buffer[dtype](T * H)
    var x = x_b.unsafe_ptr().as_unsafe_any_origin()
    var lg = l_b.unsafe_ptr().as_unsafe_any_origin()
    var gu = gu_b.unsafe_ptr().as_unsafe_any_origin()
    var dn = dn_b.unsafe_ptr().as_unsafe_any_origin()
    var rw = rw_b.unsafe_ptr().as_unsafe_any_origin()
    var ids = ids_b.unsafe_ptr().as_unsafe_any_origin()
    var perm = perm_b.unsafe_ptr().as_unsafe_any_origin()
    var off = off_b.unsafe_ptr().as_unsafe_any_origin()
    var counts = counts_b.unsafe_ptr().as_unsafe_any_origin()
    var h = h_b.unsafe_ptr().as_unsafe_any_origin()
    var ws = ws_b.unsafe_ptr().as_unsafe_any_origin()
    var y = y_b.unsafe_ptr().as_unsafe_any_origin()
    fill[dtype](ctx, x, T * H, 11, 1.0)
    fill[dtype](ctx, lg, T * E, 12, 3.0)
    fill[dtype](ctx, gu, E * H * 2 * I, 13, 0.03)
    fill[dtype](ctx, dn, E * I * H, 14, 0.03)

    def run_route(c: DeviceContext) raises {var lg, var rw, var ids, var perm, var off, var counts}:
        enqueue_route_gpu[dtype, TOPK](c, lg, rw, ids, perm, off, counts, route_counts_size(S, E), T, E)

    def run_gate_up(c: DeviceContext) raises {var h, var x, var gu, var perm, var off}:
        enqueue_gate_up_gpu[dtype, hub, ldsm](c, h, x, gu, perm, off, T, TOPK, E, H, I)

    def run_down(c: DeviceContext) raises {var y, var ws, var h, var dn, var perm, var off, var rw}:
        enqueue_down_gpu[dtype, hub, ldsm](c, y, ws, h, dn, perm, off, rw, T, TOPK, E, H, I)

    run_route(ctx)
    run_gate_up(ctx)
    run_down(ctx)
    ctx.synchronize()

    # ---------------------------------------------------------------- routing checks
    var hx = to_host[dtype](ctx, x_b)
    var hl = to_host[dtype](ctx, l_b)
    var hrw = to_host[dtype](ctx, rw_b)
    var hids = to_host[DType.int32](ctx, ids_b)
    var hperm = to_host[DType.int32](ctx, perm_b)
    var hoff = to_host[DType.int32](ctx, off_b)
    var hy = to_host[dtype](ctx, y_b)
    var route_bad = 0
    if Int(hoff[0]) != 0 or Int(hoff[E]) != S:
        print("  offsets do not span [0, S):", hoff[0], hoff[E])
        route_bad += 1
    var seen = List[Bool](length=S, fill=False)
    for e in range(E):
        var prev = -1
        if hoff[e] < 0 or hoff[e] > hoff[e + 1] or Int(hoff[e + 1]) > S:
            route_bad += 1
            continue
        for p in range(Int(hoff[e]), Int(hoff[e + 1])):
            var s = Int(hperm[p])
            if s < 0 or s >= S or seen[s] or Int(hids[s]) != e or s <= prev:
                route_bad += 1
            else:
                seen[s] = True
            prev = s
    var cpu_w = List[Scalar[dtype]](length=TOPK, fill=0)
    var cpu_i = List[Int32](length=TOPK, fill=0)
    var max_w_err = Float64(0)
    var id_mismatch = 0
    for j in range(N_ROUTE_TOKENS):
        var t = j * (T // N_ROUTE_TOKENS) + 3
        route_token[dtype, TOPK](
            hl.unsafe_ptr().as_unsafe_any_origin().unsafe_offset(t * E),
            cpu_w.unsafe_ptr().as_unsafe_any_origin(), cpu_i.unsafe_ptr().as_unsafe_any_origin(), 0, E,
        )
        for k in range(TOPK):
            if cpu_i[k] != hids[t * TOPK + k]:
                id_mismatch += 1
            max_w_err = max(max_w_err, abs(Float64(cpu_w[k]) - Float64(hrw[t * TOPK + k])))
    print("  routing: sort violations", route_bad, "| ids differing from CPU on", N_ROUTE_TOKENS,
          "tokens:", id_mismatch, "| max |w_gpu - w_cpu|", max_w_err)

    # ---------------------------------------------------------------- y reference (float64)
    var hgu = to_host[dtype](ctx, gu_b)
    var hdn = to_host[dtype](ctx, dn_b)
    var max_err = Float64(0)
    var max_ref = Float64(0)
    var g = List[Float64](length=2 * I, fill=0)
    var hh = List[Float64](length=I, fill=0)
    var yr = List[Float64](length=H, fill=0)
    for j in range(N_REF_TOKENS):
        var t = j * (T // N_REF_TOKENS) + 5
        for n in range(H):
            yr[n] = 0
        for k in range(TOPK):
            var e = Int(hids[t * TOPK + k])
            if e < 0 or e >= E:
                continue    # already counted by the routing checks
            var wk = Float64(hrw[t * TOPK + k])
            for c in range(2 * I):
                g[c] = 0
            comptime if hub:
                for c in range(H):
                    var xv = Float64(hx[t * H + c])
                    var base = (e * H + c) * 2 * I
                    for n in range(2 * I):
                        g[n] += xv * Float64(hgu[base + n])
            else:
                for n in range(2 * I):
                    var acc = Float64(0)
                    var base = (e * 2 * I + n) * H
                    for c in range(H):
                        acc += Float64(hx[t * H + c]) * Float64(hgu[base + c])
                    g[n] = acc
            for n in range(I):
                hh[n] = g[n] / (1 + exp(-g[n])) * g[I + n]
            comptime if hub:
                for c in range(I):
                    var base = (e * I + c) * H
                    for n in range(H):
                        yr[n] += wk * hh[c] * Float64(hdn[base + n])
            else:
                for n in range(H):
                    var acc = Float64(0)
                    var base = (e * H + n) * I
                    for c in range(I):
                        acc += hh[c] * Float64(hdn[base + c])
                    yr[n] += wk * acc
        for n in range(H):
            max_err = max(max_err, abs(yr[n] - Float64(hy[t * H + n])))
            max_ref = max(max_ref, abs(yr[n]))
    var rel = max_err / max(max_ref, 1e-30)
    var tol = 1e-4 if dtype == DType.float32 else 3e-2
    var ok = rel <= tol and route_bad == 0 and id_mismatch * 1000 <= N_ROUTE_TOKENS * TOPK
    print("  y: max abs err", max_err, "max |ref|", max_ref, "rel", rel, "(tol", tol, ")", "PASS" if ok else "FAIL")

    # ---------------------------------------------------------------- timing
    for _ in range(WARMUP):
        run_route(ctx)
        run_gate_up(ctx)
        run_down(ctx)
    ctx.synchronize()
    var t_route = Float64(ctx.execution_time(run_route, ITERS)) / ITERS / 1e3
    var t_gu = Float64(ctx.execution_time(run_gate_up, ITERS)) / ITERS / 1e3
    var t_dn = Float64(ctx.execution_time(run_down, ITERS)) / ITERS / 1e3
    var fl_gu = 2.0 * Float64(S) * Float64(H) * Float64(2 * I)
    var fl_dn = 2.0 * Float64(S) * Float64(I) * Float64(H)
    print("  route", t_route, "us | gate_up", t_gu, "us,", fl_gu / t_gu / 1e6, "TFLOP/s | down+combine",
          t_dn, "us,", fl_dn / t_dn / 1e6, "TFLOP/s")
    # the kernels above use raw pointers: keep every buffer alive until here
    _ = x_b^
    _ = l_b^
    _ = gu_b^
    _ = dn_b^
    _ = rw_b^
    _ = ids_b^
    _ = perm_b^
    _ = off_b^
    _ = h_b^
    _ = ws_b^
    _ = y_b^
    return Result(name, ok, rel, route_bad + id_mismatch, t_route, t_gu, t_dn)


def main() raises:
    var ctx = DeviceContext()
    print("device:", ctx.name())
    var results = List[Result]()
    # bf16 runs on tensor cores; "ldsm" = fragments via ldmatrix (the default,
    # text.gpu_moe.TC_LDMATRIX), "lds" = the scalar shared-load fallback
    results.append(run_config[DType.bfloat16, True, True](ctx, "bf16 hub ldsm"))
    results.append(run_config[DType.bfloat16, False, True](ctx, "bf16 transformers ldsm"))
    results.append(run_config[DType.bfloat16, True, False](ctx, "bf16 hub lds"))
    results.append(run_config[DType.bfloat16, False, False](ctx, "bf16 transformers lds"))
    results.append(run_config[DType.float32, True](ctx, "f32 hub"))
    results.append(run_config[DType.float32, False](ctx, "f32 transformers"))
    var fl = 2.0 * Float64(S) * Float64(H) * Float64(3 * I)
    print("== summary ==")
    print("check_moe (T=4096 x top-8, E=128, H=2048, I=768; GEMM FLOPs", fl / 1e9, "G)")
    print("config            | result | rel err  | route us | gate_up us | down+comb us | total us | TFLOP/s | % of 790")
    var all_ok = True
    for r in results:
        var tot = r.t_route + r.t_gu + r.t_dn
        var tf = fl / tot / 1e6
        print(r.name, "|", "PASS" if r.ok else "FAIL", "|", r.err, "|", r.t_route, "|", r.t_gu, "|", r.t_dn,
              "|", tot, "|", tf, "|", 100.0 * tf / PEAK_TFLOPS)
        all_ok = all_ok and r.ok
    print("check_moe:", "PASS" if all_ok else "FAIL")
