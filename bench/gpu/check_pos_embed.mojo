# GPU check of the bilinear position embedding (mojo_kernels/vision/bilinear_pos_embed.mojo):
# the exact launch the MAX custom op "qwen3vl_bilinear_pos_embed" makes (bilinear_pos_embed_gpu).
#
# Table 2304 x 1152 (48 x 48 grid, Qwen3-VL), merge 2; grids [1, 64, 64] and [4, 32, 32]
# (4096 rows each) plus a ragged one ([1, 2, 4], [2, 96, 34], [1, 330, 2]); table in f32
# and bf16. Inputs random (hash-based, never zero). Reference: an independent host
# implementation (align-corners coordinates i * 47 / (n - 1) in float64, rows in
# merge-window order repeated over t) on every 7th row; prints max |out - ref| / max |ref|
# (<= 1e-5), then device-side timing after warm-up and GB/s (output bytes written +
# 4 table rows read per output row).
#
# Build: bench/gpu/build.sh pos_embed   Run (GPU machine): bench/gpu/run.sh
from max.gpu.host import DeviceContext

from vision.bilinear_pos_embed import bilinear_pos_embed_gpu

comptime SIDE = 48
comptime HIDDEN = 1152
comptime MERGE = 2
comptime WARMUP = 3
comptime ITERS = 50
comptime REF_STRIDE = 7


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
    var gbs: Float64

    def __init__(out self, name: String, ok: Bool, err: Float64, us: Float64, gbs: Float64):
        self.name = name
        self.ok = ok
        self.err = err
        self.us = us
        self.gbs = gbs


def run_config[tdtype: DType](ctx: DeviceContext, name: String, grid: List[Int]) raises -> Result:
    var G = len(grid) // 3
    var n_rows = 0
    for g in range(G):
        n_rows += grid[3 * g] * grid[3 * g + 1] * grid[3 * g + 2]
    print("==", name, ": rows", n_rows, "hidden", HIDDEN)
    var tab_b = ctx.enqueue_create_buffer[tdtype](SIDE * SIDE * HIDDEN)
    var grid_b = ctx.enqueue_create_buffer[DType.int64](3 * G)
    var out_b = ctx.enqueue_create_buffer[DType.float32](n_rows * HIDDEN)
    var th = List[Float64](length=SIDE * SIDE * HIDDEN, fill=0)
    with tab_b.map_to_host() as h:
        for i in range(SIDE * SIDE * HIDDEN):
            var x = hval(i, 11).cast[tdtype]()
            h[i] = x
            th[i] = Float64(x.cast[DType.float32]())
    with grid_b.map_to_host() as h:
        for i in range(3 * G):
            h[i] = Int64(grid[i])
    with out_b.map_to_host() as h:
        for i in range(n_rows * HIDDEN):
            h[i] = 12345.0

    var tp = rebind[Pointer[Scalar[tdtype], MutAnyOrigin]](tab_b.unsafe_ptr())
    var gp = rebind[Pointer[Int64, MutAnyOrigin]](grid_b.unsafe_ptr())
    var op = rebind[Pointer[Float32, MutAnyOrigin]](out_b.unsafe_ptr())

    def run(c: DeviceContext) raises {var tp, var gp, var op, var G, var n_rows}:
        bilinear_pos_embed_gpu[tdtype](tp, gp, op, G, HIDDEN, n_rows, MERGE, SIDE, c)

    run(ctx)
    ctx.synchronize()

    # ---------------------------------------------------------------- reference
    var max_err = Float64(0)
    var max_ref = Float64(0)
    var unwritten = 0
    with out_b.map_to_host() as ho:
        var base = 0
        for g in range(G):
            var t = grid[3 * g]
            var h = grid[3 * g + 1]
            var w = grid[3 * g + 2]
            var n = base
            for _tt in range(t):
                for bh in range(h // MERGE):
                    for bw in range(w // MERGE):
                        for mh in range(MERGE):
                            for mw in range(MERGE):
                                var r = bh * MERGE + mh
                                var c = bw * MERGE + mw
                                if ho[n * HIDDEN + HIDDEN - 1] == 12345.0:
                                    unwritten += 1
                                if n % REF_STRIDE == 0:
                                    var y = Float64(0) if h == 1 else Float64(r) * Float64(SIDE - 1) / Float64(h - 1)
                                    var x = Float64(0) if w == 1 else Float64(c) * Float64(SIDE - 1) / Float64(w - 1)
                                    var y0 = Int(y)
                                    var x0 = Int(x)
                                    var y1 = min(y0 + 1, SIDE - 1)
                                    var x1 = min(x0 + 1, SIDE - 1)
                                    var dy = y - Float64(y0)
                                    var dx = x - Float64(x0)
                                    for e in range(HIDDEN):
                                        var rv = (1 - dy) * (1 - dx) * th[(y0 * SIDE + x0) * HIDDEN + e]
                                        rv += (1 - dy) * dx * th[(y0 * SIDE + x1) * HIDDEN + e]
                                        rv += dy * (1 - dx) * th[(y1 * SIDE + x0) * HIDDEN + e]
                                        rv += dy * dx * th[(y1 * SIDE + x1) * HIDDEN + e]
                                        max_err = max(max_err, abs(Float64(ho[n * HIDDEN + e]) - rv))
                                        max_ref = max(max_ref, abs(rv))
                                n += 1
            base += t * h * w
    var rel = max_err / max(max_ref, 1e-30)
    var ok = rel <= 1e-5 and unwritten == 0
    print("  max abs err", max_err, "max |ref|", max_ref, "rel", rel, "unwritten rows", unwritten,
          "PASS" if ok else "FAIL")

    # ---------------------------------------------------------------- timing
    for _ in range(WARMUP):
        run(ctx)
    ctx.synchronize()
    var us = Float64(ctx.execution_time(run, ITERS)) / ITERS / 1e3
    var tbytes = 4 if tdtype == DType.float32 else 2
    var nbytes = Float64(n_rows) * Float64(HIDDEN) * Float64(4 + 4 * tbytes)
    var gbs = nbytes / us / 1e3
    print("  time", us, "us,", gbs, "GB/s")
    _ = tab_b^
    _ = grid_b^
    _ = out_b^
    return Result(name, ok, rel, us, gbs)


def main() raises:
    var ctx = DeviceContext()
    print("device:", ctx.name())
    var g1 = List[Int]()
    g1.append(1)
    g1.append(64)
    g1.append(64)
    var g4 = List[Int]()
    g4.append(4)
    g4.append(32)
    g4.append(32)
    var gr = List[Int]()
    for x in [1, 2, 4, 2, 96, 34, 1, 330, 2]:
        gr.append(x)
    var results = List[Result]()
    results.append(run_config[DType.float32](ctx, "f32 1x64x64", g1))
    results.append(run_config[DType.bfloat16](ctx, "bf16 1x64x64", g1))
    results.append(run_config[DType.float32](ctx, "f32 4x32x32", g4))
    results.append(run_config[DType.bfloat16](ctx, "bf16 4x32x32", g4))
    results.append(run_config[DType.float32](ctx, "f32 ragged", gr))
    print("== summary ==")
    print("check_pos_embed (table 2304x1152, merge 2; bytes = rows*1152*(4 + 4*table elt))")
    print("config        | result | rel err | time us | GB/s")
    var all_ok = True
    for r in results:
        print(r.name, "|", "PASS" if r.ok else "FAIL", "|", r.err, "|", r.us, "|", r.gbs)
        all_ok = all_ok and r.ok
    print("check_pos_embed:", "PASS" if all_ok else "FAIL")
