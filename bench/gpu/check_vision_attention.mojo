# GPU check of the vision varlen attention (mojo_kernels/attention/varlen_attention.mojo):
# the exact launch the MAX custom op "qwen3vl_varlen_attention" makes (varlen_attention_gpu).
#
# Configs:
#   * real shape: 4 segments x 1024 patches (4 images of 32x32), 16 heads x 72, bf16 and f32;
#   * ragged: segments [1, 129, 64, 300, 7, 1], 3 heads, head_dim 40 (padded head-dim
#     bucket, length-1 segments, partial blocks), f32;
#   * text prefill: causal, grouped-query (16 heads over 4 kv heads x 128), segments
#     [512, 1, 200], bf16 and f32 (FLOPs counted as if bidirectional).
# Inputs are random (hash-based, uniform in [-1, 1) times a scale, never zero). The
# reference is computed on the host in float64 from the same (dtype-rounded) inputs for
# a subset of query rows (all heads); the check prints max |out - ref| / max |ref|
# (f32 <= 1e-4, bf16 <= 2e-2), then times the kernel with device-side timing after
# warm-up and prints TFLOP/s (4 * sum L^2 * heads * head_dim FLOPs).
#
# Build: bench/gpu/build.sh vision_attention   Run (GPU machine): bench/gpu/run.sh
from max.gpu.host import DeviceContext
from std.math import exp

from attention.varlen_attention import varlen_attention_gpu

comptime WARMUP = 3
comptime ITERS = 20


def hval(i: Int, seed: Int) -> Float32:
    """Uniform in [-1, 1) from a splitmix64 hash of (i, seed)."""
    var z = UInt64(i) * 0x9E3779B97F4A7C15 + UInt64(seed) * 0xD1B54A32D192ED03
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return 2 * (Float32(z >> 40) * (1.0 / 16777216.0)) - 1


struct Result(Copyable, Movable):
    var name: String
    var ok: Bool
    var err: Float64
    var us: Float64
    var tflops: Float64

    def __init__(out self, name: String, ok: Bool, err: Float64, us: Float64, tflops: Float64):
        self.name = name
        self.ok = ok
        self.err = err
        self.us = us
        self.tflops = tflops


def run_config[dtype: DType, causal: Bool = False](ctx: DeviceContext, name: String, lens: List[Int], H: Int,
                                                  D: Int, ref_stride: Int, HKV: Int = -1) raises -> Result:
    var S = len(lens)
    var N = 0
    var cu_h = List[Int](length=S + 1, fill=0)
    for s in range(S):
        N += lens[s]
        cu_h[s + 1] = N
    var n_el = N * H * D
    var kvh = H if HKV < 0 else HKV
    var group = H // kvh
    var n_kv = N * kvh * D
    print("==", name, ": N", N, "segments", S, "heads", H, "kv heads", kvh, "head_dim", D, "causal", causal)
    var scale = 1.0 / Float64(D) ** 0.5

    var q_b = ctx.enqueue_create_buffer[dtype](n_el)
    var k_b = ctx.enqueue_create_buffer[dtype](n_kv)
    var v_b = ctx.enqueue_create_buffer[dtype](n_kv)
    var o_b = ctx.enqueue_create_buffer[dtype](n_el)
    var cu_b = ctx.enqueue_create_buffer[DType.int32](S + 1)
    # host copies of the (dtype-rounded) inputs for the reference
    var qh = List[Float64](length=n_el, fill=0)
    var kh = List[Float64](length=n_kv, fill=0)
    var vh = List[Float64](length=n_kv, fill=0)
    with q_b.map_to_host() as hq, k_b.map_to_host() as hk, v_b.map_to_host() as hv:
        for i in range(n_el):
            var a = (2.0 * hval(i, 1)).cast[dtype]()
            hq[i] = a
            qh[i] = Float64(a.cast[DType.float32]())
        for i in range(n_kv):
            var b = (2.0 * hval(i, 2)).cast[dtype]()
            var c = hval(i, 3).cast[dtype]()
            hk[i] = b
            hv[i] = c
            kh[i] = Float64(b.cast[DType.float32]())
            vh[i] = Float64(c.cast[DType.float32]())
    with cu_b.map_to_host() as hc:
        for s in range(S + 1):
            hc[s] = Int32(cu_h[s])
    with o_b.map_to_host() as ho:
        for i in range(n_el):
            ho[i] = Scalar[dtype](12345)   # poison: every output must be written

    comptime P = Pointer[Scalar[dtype], MutAnyOrigin]
    var qp = rebind[P](q_b.unsafe_ptr())
    var kp = rebind[P](k_b.unsafe_ptr())
    var vp = rebind[P](v_b.unsafe_ptr())
    var op = rebind[P](o_b.unsafe_ptr())
    var cp = rebind[Pointer[Int32, MutAnyOrigin]](cu_b.unsafe_ptr())

    def run(c: DeviceContext) raises {var qp, var kp, var vp, var op, var cp, var N, var H, var D, var S, var scale, var kvh}:
        varlen_attention_gpu[dtype, causal](qp, kp, vp, op, cp, N, H, D, S, scale, c, kvh)

    run(ctx)
    ctx.synchronize()

    # ---------------------------------------------------------------- reference (float64, subset of rows)
    var max_err = Float64(0)
    var max_ref = Float64(0)
    with o_b.map_to_host() as ho:
        for s in range(S):
            var s0 = cu_h[s]
            var s1 = cu_h[s + 1]
            var i = s0
            while i < s1:
                var kend = i + 1 if causal else s1
                for h in range(H):
                    var g = h // group
                    var sc = List[Float64](length=kend - s0, fill=0)
                    var mx = Float64(-1e300)
                    for j in range(s0, kend):
                        var acc = Float64(0)
                        for d in range(D):
                            acc += qh[(i * H + h) * D + d] * kh[(j * kvh + g) * D + d]
                        sc[j - s0] = acc * scale
                        mx = max(mx, acc * scale)
                    var den = Float64(0)
                    for j in range(kend - s0):
                        sc[j] = exp(sc[j] - mx)
                        den += sc[j]
                    for d in range(D):
                        var num = Float64(0)
                        for j in range(s0, kend):
                            num += sc[j - s0] * vh[(j * kvh + g) * D + d]
                        var r = num / den
                        var g = Float64(ho[(i * H + h) * D + d].cast[DType.float32]())
                        max_err = max(max_err, abs(g - r))
                        max_ref = max(max_ref, abs(r))
                i += ref_stride
            # always check the last row of each segment too
            if (s1 - 1 - s0) % ref_stride != 0:
                for h in range(H):
                    var last = s1 - 1
                    var g = Float64(ho[(last * H + h) * D].cast[DType.float32]())
                    if g == 12345.0:
                        max_err = max(max_err, 1e30)
    var rel = max_err / max(max_ref, 1e-30)
    var tol = 1e-4 if dtype == DType.float32 else 2e-2
    var ok = rel <= tol
    print("  max abs err", max_err, "max |ref|", max_ref, "rel", rel, "(tol", tol, ")", "PASS" if ok else "FAIL")

    # ---------------------------------------------------------------- timing
    for _ in range(WARMUP):
        run(ctx)
    ctx.synchronize()
    var us = Float64(ctx.execution_time(run, ITERS)) / ITERS / 1e3
    var fl = Float64(0)
    for s in range(S):
        fl += 4.0 * Float64(lens[s]) * Float64(lens[s]) * Float64(H) * Float64(D)
    var tf = fl / us / 1e6
    print("  time", us, "us,", tf, "TFLOP/s")
    _ = q_b^
    _ = k_b^
    _ = v_b^
    _ = o_b^
    _ = cu_b^
    return Result(name, ok, rel, us, tf)


def main() raises:
    var ctx = DeviceContext()
    print("device:", ctx.name())
    var real = List[Int]()
    for _ in range(4):
        real.append(1024)
    var ragged = List[Int]()
    ragged.append(1)
    ragged.append(129)
    ragged.append(64)
    ragged.append(300)
    ragged.append(7)
    ragged.append(1)
    var results = List[Result]()
    results.append(run_config[DType.bfloat16](ctx, "bf16 4x1024 16x72", real, 16, 72, 61))
    results.append(run_config[DType.float32](ctx, "f32 4x1024 16x72", real, 16, 72, 61))
    results.append(run_config[DType.float32](ctx, "f32 ragged 3x40", ragged, 3, 40, 5))
    var text = List[Int]()
    text.append(512)
    text.append(1)
    text.append(200)
    results.append(run_config[DType.bfloat16, True](ctx, "bf16 causal 16/4x128", text, 16, 128, 7, 4))
    results.append(run_config[DType.float32, True](ctx, "f32 causal 16/4x128", text, 16, 128, 7, 4))
    print("== summary ==")
    print("check_vision_attention (varlen; bidirectional, and causal GQA for text; FLOPs = 4 * sum L^2 * heads * head_dim)")
    print("config              | result | rel err | time us | TFLOP/s")
    var all_ok = True
    for r in results:
        print(r.name, "|", "PASS" if r.ok else "FAIL", "|", r.err, "|", r.us, "|", r.tflops)
        all_ok = all_ok and r.ok
    print("check_vision_attention:", "PASS" if all_ok else "FAIL")
