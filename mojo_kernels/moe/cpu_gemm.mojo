# CPU building blocks of the MoE ops: register-blocked SIMD micro-kernels for the
# two weight layouts, and the grouped (per-expert) gate_up / down drivers.
#
# Notation: S = T*top_k routed (token, k) pairs ("slots"); rows of the grouped
# GEMMs are the slots sorted by expert: sorted row p holds slot perm[p], whose
# token is perm[p] // top_k; expert e owns sorted rows offsets[e] ..< offsets[e+1].
#
# Two micro-kernels, chosen by the weight layout (a compile-time parameter):
# * "outer" (hub layout, W[e] is [K, N], out = a @ W[e]): MR rows x (NB groups of
#   NV SIMD vectors of columns) of the output live in registers; the K loop loads
#   NB*NV weight vectors and broadcasts one activation per row.
# * "dot" (transformers layout, W[e] is [N, K], out = W[e] @ a): MR rows x NC
#   weight rows; each accumulator is a SIMD vector along K, reduced at the end.
# Both accumulate in float32, whatever the storage dtype (float32 or bfloat16).
from std.math import exp, ceildiv
from std.atomic import Atomic
from std.sys import num_physical_cores, simd_width_of, size_of
from std.sys.intrinsics import prefetch
from std.sys import llvm_intrinsic
from std.sys.info import CompilationTarget
from std.memory import bitcast
from max.algorithm import parallelize

comptime F32 = DType.float32
comptime BF16 = DType.bfloat16
comptime VEC = simd_width_of[DType.float32]()     # 16 with AVX-512, 8 with AVX2
# bf16 x bf16 -> f32 pair dot products (vdpbf16ps, AVX512-BF16: Zen 4, Sapphire Rapids):
# twice the FMA rate, float32 accumulation. Decided for the machine compiling the graph.
comptime USE_DPBF16 = VEC == 16 and CompilationTarget._has_feature["avx512bf16"]()

# Register blocking: 24 accumulators with AVX-512 (32 vector registers), 12 with AVX2 (16).
comptime _WIDE = VEC >= 16
comptime GU_MR = 6 if _WIDE else 3   # gate_up outer: MR rows x (gate 2 vectors + up 2 vectors)
comptime GU_NV = 2
comptime DN_MR = 6 if _WIDE else 3   # down outer: MR rows x 4 vectors
comptime DN_NV = 4
comptime DOT_MR = 4 if _WIDE else 2  # dot kernels: MR rows x 6 weight rows (3 gate + 3 up for gate_up)
comptime DOT_NC = 6
comptime DOT_COLS_PER_TASK = 48   # output columns per parallel task in the dot kernels
comptime ROWS_PER_CHUNK = 96      # sorted rows per parallel task (multiple of 6 and 4)
comptime PF_DIST = 16             # outer kernels: prefetch weight rows this many k ahead


@always_inline
def silu(g: SIMD[F32, _]) -> type_of(g):
    return g / (1 + exp(-g))


@always_inline
def round_to[dtype: DType](v: SIMD[F32, _]) -> type_of(v):
    """Round a float32 value to `dtype` and back (identity for float32)."""
    comptime if dtype == F32:
        return v
    else:
        return v.cast[dtype]().cast[F32]()


@always_inline
def swiglu[dtype: DType](g: SIMD[F32, _], u: type_of(g)) -> type_of(g):
    """SwiGLU: h = silu(gate) * up with the rounding steps of torch in `dtype`.

    In bfloat16 transformers rounds the gate_up GEMM output, silu(gate) and the
    product to bf16 (each op computes in float32 and rounds its result).
    """
    var gr = round_to[dtype](g)
    var ur = round_to[dtype](u)
    return round_to[dtype](silu(gr)) * ur


# ----------------------------------------------------------------------------- micro-kernels
@always_inline
def outer_tile[
    dtype: DType, MR: Int, NB: Int, NV: Int, VW: Int, PF: Bool = False
](
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    b: Array[Pointer[Scalar[dtype], MutAnyOrigin], NB],
    ldb: Int,
    K: Int,
) -> Array[SIMD[F32, VW], MR * NB * NV]:
    """Outer-product tile: acc[r, g, v] = sum_k a[r][k] * b[g][k*ldb + v*VW ..< +VW]  (float32).

    PF: software-prefetch the weight rows PF_DIST steps ahead. The weight rows of a
    hub-layout panel are 2I or H elements apart, so every k touches new pages and the
    hardware prefetchers do not help; the first row tile of a panel streams it from DRAM.
    """
    comptime NBV = NB * NV
    comptime LINE = 64 // size_of[dtype]()
    var acc = Array[SIMD[F32, VW], MR * NBV](fill=0)
    for k in range(K):
        comptime if PF:
            comptime for g in range(NB):
                comptime for c in range(0, NV * VW, LINE):
                    prefetch(b[g].unsafe_offset((k + PF_DIST) * ldb + c))
        var bv = Array[SIMD[F32, VW], NBV](fill=0)
        comptime for g in range(NB):
            comptime for v in range(NV):
                bv[g * NV + v] = b[g].unsafe_load[width=VW](k * ldb + v * VW).cast[F32]()
        comptime for r in range(MR):
            var av = SIMD[F32, VW](a[r].unsafe_load[width=1](k).cast[F32]())
            comptime for i in range(NBV):
                acc[r * NBV + i] = av.fma(bv[i], acc[r * NBV + i])
    return acc^


@always_inline
def dpbf16(acc: SIMD[F32, 16], a: SIMD[BF16, 32], b: SIMD[BF16, 32]) -> SIMD[F32, 16]:
    """Pair dot: acc[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1]  (float32, vdpbf16ps)."""
    return llvm_intrinsic["llvm.x86.avx512bf16.dpbf16ps.512", SIMD[F32, 16]](acc, a, b)


@always_inline
def dot_tile[
    dtype: DType, MR: Int, NC: Int
](
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    b: Array[Pointer[Scalar[dtype], MutAnyOrigin], NC],
    K: Int,
) -> Array[Float32, MR * NC]:
    """Dot-product tile: out[r, c] = sum_k a[r][k] * b[c][k]  (float32 accumulation)."""
    var acc = Array[SIMD[F32, VEC], MR * NC](fill=0)
    var k = 0
    comptime if dtype == BF16 and USE_DPBF16:
        while k + 2 * VEC <= K:
            var bw = Array[SIMD[BF16, 32], NC](fill=0)
            comptime for c in range(NC):
                bw[c] = rebind[SIMD[BF16, 32]](b[c].unsafe_load[width=32](k))
            comptime for r in range(MR):
                var aw = rebind[SIMD[BF16, 32]](a[r].unsafe_load[width=32](k))
                comptime for c in range(NC):
                    acc[r * NC + c] = rebind[SIMD[F32, VEC]](
                        dpbf16(rebind[SIMD[F32, 16]](acc[r * NC + c]), aw, bw[c])
                    )
            k += 2 * VEC
    while k + VEC <= K:
        var bv = Array[SIMD[F32, VEC], NC](fill=0)
        comptime for c in range(NC):
            bv[c] = b[c].unsafe_load[width=VEC](k).cast[F32]()
        comptime for r in range(MR):
            var av = a[r].unsafe_load[width=VEC](k).cast[F32]()
            comptime for c in range(NC):
                acc[r * NC + c] = av.fma(bv[c], acc[r * NC + c])
        k += VEC
    var out = Array[Float32, MR * NC](fill=0)
    comptime for i in range(MR * NC):
        out[i] = acc[i].reduce_add()
    while k < K:
        comptime for r in range(MR):
            var av = a[r].unsafe_load[width=1](k).cast[F32]()
            comptime for c in range(NC):
                out[r * NC + c] += av * b[c].unsafe_load[width=1](k).cast[F32]()
        k += 1
    return out^


# bf16 hub layout on AVX512-BF16: the weight panel is packed once per task into k-pairs,
# packed[kp, i] = interleave(W[2kp, cols_i], W[2kp+1, cols_i]) (32 bf16 = 16 columns x 2 k),
# then each step broadcasts the activation pair (a[2kp], a[2kp+1]) and does one vdpbf16ps
# per accumulator vector.
@always_inline
def pack_pairs[
    NB: Int, NV: Int
](
    dst: Pointer[Scalar[BF16], MutAnyOrigin],
    b: Array[Pointer[Scalar[BF16], MutAnyOrigin], NB],
    ldb: Int,
    K: Int,
):
    """Pack NB groups of NV*16 columns of a [K, ldb] bf16 matrix into k-pairs (odd K: 0-padded)."""
    comptime NBV = NB * NV
    for kp in range(ceildiv(K, 2)):
        var k = 2 * kp
        comptime for g in range(NB):
            comptime for c in range(0, NV * 16, 32):
                prefetch(b[g].unsafe_offset((k + 2 * PF_DIST) * ldb + c))
                prefetch(b[g].unsafe_offset((k + 2 * PF_DIST + 1) * ldb + c))
            comptime for v in range(NV):
                var lo = b[g].unsafe_load[width=16](k * ldb + v * 16)
                var hi = SIMD[BF16, 16](0)
                if k + 1 < K:
                    hi = b[g].unsafe_load[width=16]((k + 1) * ldb + v * 16)
                dst.unsafe_store((kp * NBV + g * NV + v) * 32, lo.interleave(hi))


@always_inline
def outer_tile_dp[
    MR: Int, NBV: Int
](
    a: Array[Pointer[Scalar[BF16], MutAnyOrigin], MR],
    packed: Pointer[Scalar[BF16], MutAnyOrigin],
    K: Int,
) -> Array[SIMD[F32, 16], MR * NBV]:
    """Outer-product tile over a packed panel: acc[r, i] = sum_k a[r][k] * W[k, cols_i]."""
    var acc = Array[SIMD[F32, 16], MR * NBV](fill=0)
    var n_full = K // 2
    for kp in range(n_full):
        var bv = Array[SIMD[BF16, 32], NBV](fill=0)
        comptime for i in range(NBV):
            bv[i] = packed.unsafe_load[width=32]((kp * NBV + i) * 32)
        comptime for r in range(MR):
            var pair = bitcast[DType.uint32, 1](a[r].unsafe_load[width=2](2 * kp))
            var av = bitcast[BF16, 32](SIMD[DType.uint32, 16](pair))
            comptime for i in range(NBV):
                acc[r * NBV + i] = dpbf16(acc[r * NBV + i], av, bv[i])
    if K % 2 == 1:    # last k alone: pair (a[K-1], 0) against the 0-padded packed pair
        var bv = Array[SIMD[BF16, 32], NBV](fill=0)
        comptime for i in range(NBV):
            bv[i] = packed.unsafe_load[width=32]((n_full * NBV + i) * 32)
        comptime for r in range(MR):
            var pair = SIMD[BF16, 2](a[r].unsafe_load[width=1](K - 1)[0], 0)
            var av = bitcast[BF16, 32](SIMD[DType.uint32, 16](bitcast[DType.uint32, 1](pair)))
            comptime for i in range(NBV):
                acc[r * NBV + i] = dpbf16(acc[r * NBV + i], av, bv[i])
    return acc^


def panel_pairs_size(K: Int, cols: Int) -> Int:
    """Elements of a packed bf16 panel of `cols` columns (see pack_pairs)."""
    return ceildiv(K, 2) * 2 * cols


# ----------------------------------------------------------------------------- work split
def num_workers(n: Int) -> Int:
    """Workers run_dynamic uses for n tasks."""
    return max(1, min(num_physical_cores(), n))


def run_dynamic[F: def(Int, Int) -> None](func: F, n: Int):
    """Run func(task, worker) for task in 0 ..< n on num_workers(n) workers, each pulling
    the next task from a shared atomic counter (load balance across unequal tasks, and
    robust to a core being taken by another process; `parallelize` splits statically)."""
    if n <= 0:
        return
    var workers = num_workers(n)
    if workers == 1:
        for i in range(n):
            func(i, 0)
        return
    var counter = Atomic[Int64](0)

    def worker(w: Int) {ref counter, ref func, var n}:
        while True:
            var i = Int(counter.fetch_add(1))
            if i >= n:
                break
            func(i, w)

    parallelize(worker, workers, workers)


def row_chunks(offsets: Pointer[Int32, MutAnyOrigin], E: Int) -> List[Int]:
    """Flat (expert, row_begin, row_end) triples covering every expert's sorted rows
    in chunks of at most ROWS_PER_CHUNK rows (empty experts get none), largest first
    so that the dynamic schedule ends with the small tasks."""
    var chunks = List[Int]()
    for e in range(E):
        var r = Int(offsets[unsafe_offset=e])
        var end = Int(offsets[unsafe_offset=e + 1])
        while r < end:
            var stop = min(r + ROWS_PER_CHUNK, end)
            chunks.append(e)
            chunks.append(r)
            chunks.append(stop)
            r = stop
    # insertion sort by size, descending (stable; a few hundred chunks at most per call)
    var n = len(chunks) // 3
    for i in range(1, n):
        var e = chunks[3 * i]
        var r0 = chunks[3 * i + 1]
        var r1 = chunks[3 * i + 2]
        var j = i
        while j > 0 and chunks[3 * (j - 1) + 2] - chunks[3 * (j - 1) + 1] < r1 - r0:
            chunks[3 * j] = chunks[3 * (j - 1)]
            chunks[3 * j + 1] = chunks[3 * (j - 1) + 1]
            chunks[3 * j + 2] = chunks[3 * (j - 1) + 2]
            j -= 1
        chunks[3 * j] = e
        chunks[3 * j + 1] = r0
        chunks[3 * j + 2] = r1
    return chunks^


def check_offsets(offsets: Pointer[Int32, MutAnyOrigin], E: Int, S: Int) raises:
    if Int(offsets[unsafe_offset=0]) != 0 or Int(offsets[unsafe_offset=E]) != S:
        raise Error("moe: offsets must start at 0 and end at T*top_k")
    for e in range(E):
        if offsets[unsafe_offset=e] > offsets[unsafe_offset=e + 1]:
            raise Error("moe: offsets must be non-decreasing")


# ----------------------------------------------------------------------------- gate_up
@always_inline
def _gu_outer_cols[
    dtype: DType, NV: Int, VW: Int
](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    scratch: Pointer[Scalar[dtype], MutAnyOrigin],
    r0: Int, r1: Int, j: Int, top_k: Int, H: Int, I: Int,
):
    """Columns: h[p, j ..< j+NV*VW] for sorted rows r0 ..< r1 (hub layout W[e] = [H, 2I]).
    scratch: panel_pairs_size(H, 2*NV*VW) elements (used by the packed bf16 path)."""
    comptime MR = GU_MR
    comptime PACKED = dtype == BF16 and USE_DPBF16 and VW == 16
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], 2](fill=w_e.unsafe_offset(j))
    b[1] = w_e.unsafe_offset(I + j)
    var pk = rebind[Pointer[Scalar[BF16], MutAnyOrigin]](scratch)
    comptime if PACKED:
        pack_pairs[2, NV](pk, rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], 2]](b), 2 * I, H)
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=x)
        comptime for i in range(MR):
            # rows past the end repeat the last real row (computed, not stored)
            var p = r + min(i, rows - 1)
            a[i] = x.unsafe_offset((Int(perm[unsafe_offset=p]) // top_k) * H)
        var acc: Array[SIMD[F32, VW], MR * 2 * NV]
        comptime if PACKED:
            var accd = outer_tile_dp[MR, 2 * NV](
                rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], MR]](a), pk, H)
            acc = rebind[Array[SIMD[F32, VW], MR * 2 * NV]](accd).copy()
        else:
            if r == r0:     # the first row tile streams the weight panel from memory
                acc = outer_tile[dtype, MR, 2, NV, VW, True](a, b, 2 * I, H)
            else:
                acc = outer_tile[dtype, MR, 2, NV, VW](a, b, 2 * I, H)
        comptime for i in range(MR):
            if i < rows:
                var dst = h.unsafe_offset((r + i) * I + j)
                comptime for v in range(NV):
                    var hv = swiglu[dtype](acc[i * 2 * NV + v], acc[i * 2 * NV + NV + v])
                    dst.unsafe_store(v * VW, hv.cast[dtype]())
        r += MR


@always_inline
def _gu_dot_tile[
    dtype: DType, NC: Int
](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], DOT_MR],
    r: Int, rows: Int, j: Int, H: Int, I: Int,
):
    """Tile: h[r ..< r+rows, j ..< j+NC] (transformers layout W[e] = [2I, H])."""
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], 2 * NC](fill=w_e)
    comptime for c in range(NC):
        b[c] = w_e.unsafe_offset((j + c) * H)
        b[NC + c] = w_e.unsafe_offset((I + j + c) * H)
    var acc = dot_tile[dtype, DOT_MR, 2 * NC](a, b, H)
    comptime for i in range(DOT_MR):
        if i < rows:
            comptime for c in range(NC):
                var hv = swiglu[dtype](
                    SIMD[F32, 1](acc[i * 2 * NC + c]), SIMD[F32, 1](acc[i * 2 * NC + NC + c])
                )
                h[unsafe_offset=(r + i) * I + j + c] = hv.cast[dtype]()


@always_inline
def _gu_dot_block[
    dtype: DType
](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    r0: Int, r1: Int, j0: Int, j1: Int, top_k: Int, H: Int, I: Int,
):
    """Block: h[p, j0 ..< j1] for sorted rows r0 ..< r1. Row tiles outside, column
    tiles inside: the tile's activation rows stay in L1 while weight rows stream from L2."""
    comptime MR = DOT_MR
    comptime NC = DOT_NC // 2
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=x)
        comptime for i in range(MR):
            # rows past the end repeat the last real row (computed, not stored)
            var p = r + min(i, rows - 1)
            a[i] = x.unsafe_offset((Int(perm[unsafe_offset=p]) // top_k) * H)
        var j = j0
        while j + NC <= j1:
            _gu_dot_tile[dtype, NC](h, w_e, a, r, rows, j, H, I)
            j += NC
        while j < j1:
            _gu_dot_tile[dtype, 1](h, w_e, a, r, rows, j, H, I)
            j += 1
        r += MR


def gate_up_cpu[
    dtype: DType, hub: Bool
](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    E: Int, top_k: Int, H: Int, I: Int,
):
    """Grouped gate_up: h[p, :] = silu(x[tok] @ Wg) * (x[tok] @ Wu) for every sorted row p of every expert."""
    var chunks = row_chunks(offsets, E)
    var n_chunks = len(chunks) // 3
    if n_chunks == 0 or I == 0:
        return
    var cp = chunks.unsafe_ptr()
    comptime if hub:
        comptime NBW = GU_NV * VEC
        var n_tiles = ceildiv(I, NBW)
        var panel = panel_pairs_size(H, 2 * NBW)
        var scratch = List[Scalar[dtype]](length=num_workers(n_chunks * n_tiles) * panel, fill=0)
        var sp = scratch.unsafe_ptr().as_unsafe_any_origin()

        def task_outer(t: Int, wk: Int) {var h, var x, var w, var perm, var cp, var n_tiles, var top_k, var H, var I, var sp, var panel}:
            var scr = sp.unsafe_offset(wk * panel)
            var c = t // n_tiles
            var j = (t % n_tiles) * NBW
            var e = cp[unsafe_offset=3 * c]
            var r0 = cp[unsafe_offset=3 * c + 1]
            var r1 = cp[unsafe_offset=3 * c + 2]
            var w_e = w.unsafe_offset(e * H * 2 * I)
            if j + NBW <= I:
                _gu_outer_cols[dtype, GU_NV, VEC](h, x, w_e, perm, scr, r0, r1, j, top_k, H, I)
                return
            while j + VEC <= I:
                _gu_outer_cols[dtype, 1, VEC](h, x, w_e, perm, scr, r0, r1, j, top_k, H, I)
                j += VEC
            while j < I:
                _gu_outer_cols[dtype, 1, 1](h, x, w_e, perm, scr, r0, r1, j, top_k, H, I)
                j += 1

        run_dynamic(task_outer, n_chunks * n_tiles)
        _ = scratch^
    else:
        comptime NC = DOT_NC // 2
        comptime NT = DOT_COLS_PER_TASK
        var n_tiles = ceildiv(I, NT)

        def task_dot(t: Int, wk: Int) {var h, var x, var w, var perm, var cp, var n_tiles, var top_k, var H, var I}:
            var c = t // n_tiles
            var j = (t % n_tiles) * NT
            var j_end = min(j + NT, I)
            var e = cp[unsafe_offset=3 * c]
            var r0 = cp[unsafe_offset=3 * c + 1]
            var r1 = cp[unsafe_offset=3 * c + 2]
            var w_e = w.unsafe_offset(e * 2 * I * H)
            _gu_dot_block[dtype](h, x, w_e, perm, r0, r1, j, j_end, top_k, H, I)

        run_dynamic(task_dot, n_chunks * n_tiles)


# ----------------------------------------------------------------------------- down
@always_inline
def _dn_outer_cols[
    dtype: DType, NV: Int, VW: Int
](
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    hs: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    scratch: Pointer[Scalar[dtype], MutAnyOrigin],
    r0: Int, r1: Int, n: Int, H: Int, I: Int,
):
    """Columns: ws[slot, n ..< n+NV*VW] = rw[slot] * (h[p] @ W[e])[n ...] (hub layout W[e] = [I, H]).
    scratch: panel_pairs_size(I, NV*VW) elements (used by the packed bf16 path)."""
    comptime MR = DN_MR
    comptime PACKED = dtype == BF16 and USE_DPBF16 and VW == 16
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], 1](fill=w_e.unsafe_offset(n))
    var pk = rebind[Pointer[Scalar[BF16], MutAnyOrigin]](scratch)
    comptime if PACKED:
        pack_pairs[1, NV](pk, rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], 1]](b), H, I)
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=hs)
        comptime for i in range(MR):
            a[i] = hs.unsafe_offset((r + min(i, rows - 1)) * I)
        var acc: Array[SIMD[F32, VW], MR * NV]
        comptime if PACKED:
            var accd = outer_tile_dp[MR, NV](
                rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], MR]](a), pk, I)
            acc = rebind[Array[SIMD[F32, VW], MR * NV]](accd).copy()
        else:
            if r == r0:
                acc = outer_tile[dtype, MR, 1, NV, VW, True](a, b, H, I)
            else:
                acc = outer_tile[dtype, MR, 1, NV, VW](a, b, H, I)
        comptime for i in range(MR):
            if i < rows:
                var slot = Int(perm[unsafe_offset=r + i])
                var wt = rw[unsafe_offset=slot].cast[F32]()
                var dst = ws.unsafe_offset(slot * H + n)
                comptime for v in range(NV):
                    # torch: (h @ W) rounded to dtype, times the routing weight, rounded
                    var o = round_to[dtype](acc[i * NV + v]) * wt
                    dst.unsafe_store(v * VW, o.cast[dtype]())
        r += MR


@always_inline
def _dn_dot_tile[
    dtype: DType, NC: Int
](
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], DOT_MR],
    slots: Array[Int, DOT_MR],
    wts: Array[Float32, DOT_MR],
    rows: Int, n: Int, H: Int, I: Int,
):
    """Tile: ws[slot(r+i), n ..< n+NC] for i < rows (transformers layout W[e] = [H, I])."""
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], NC](fill=w_e)
    comptime for c in range(NC):
        b[c] = w_e.unsafe_offset((n + c) * I)
    var acc = dot_tile[dtype, DOT_MR, NC](a, b, I)
    comptime for i in range(DOT_MR):
        if i < rows:
            comptime for c in range(NC):
                var o = round_to[dtype](SIMD[F32, 1](acc[i * NC + c])) * wts[i]
                ws[unsafe_offset=slots[i] * H + n + c] = o.cast[dtype]()


@always_inline
def _dn_dot_block[
    dtype: DType
](
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    hs: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    r0: Int, r1: Int, n0: Int, n1: Int, H: Int, I: Int,
):
    """Block: ws[slot(p), n0 ..< n1] = rw[slot] * (W[e] @ h[p]) for sorted rows r0 ..< r1."""
    comptime MR = DOT_MR
    comptime NC = DOT_NC
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=hs)
        var slots = Array[Int, MR](fill=0)
        var wts = Array[Float32, MR](fill=0)
        comptime for i in range(MR):
            a[i] = hs.unsafe_offset((r + min(i, rows - 1)) * I)
            if i < rows:
                slots[i] = Int(perm[unsafe_offset=r + i])
                wts[i] = rw[unsafe_offset=slots[i]].cast[F32]()
        var n = n0
        while n + NC <= n1:
            _dn_dot_tile[dtype, NC](ws, w_e, a, slots, wts, rows, n, H, I)
            n += NC
        while n < n1:
            _dn_dot_tile[dtype, 1](ws, w_e, a, slots, wts, rows, n, H, I)
            n += 1
        r += MR


def down_cpu[
    dtype: DType, hub: Bool
](
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    hs: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    E: Int, H: Int, I: Int,
):
    """Grouped down: ws[perm[p], :] = rw[perm[p]] * (h[p] @ Wdown[e]) for every sorted row p."""
    var chunks = row_chunks(offsets, E)
    var n_chunks = len(chunks) // 3
    if n_chunks == 0 or H == 0:
        return
    var cp = chunks.unsafe_ptr()
    comptime if hub:
        comptime NBW = DN_NV * VEC
        var n_tiles = ceildiv(H, NBW)
        var panel = panel_pairs_size(I, NBW)
        var scratch = List[Scalar[dtype]](length=num_workers(n_chunks * n_tiles) * panel, fill=0)
        var sp = scratch.unsafe_ptr().as_unsafe_any_origin()

        def task_outer(t: Int, wk: Int) {var ws, var hs, var w, var perm, var rw, var cp, var n_tiles, var H, var I, var sp, var panel}:
            var scr = sp.unsafe_offset(wk * panel)
            var c = t // n_tiles
            var n = (t % n_tiles) * NBW
            var e = cp[unsafe_offset=3 * c]
            var r0 = cp[unsafe_offset=3 * c + 1]
            var r1 = cp[unsafe_offset=3 * c + 2]
            var w_e = w.unsafe_offset(e * I * H)
            if n + NBW <= H:
                _dn_outer_cols[dtype, DN_NV, VEC](ws, hs, w_e, perm, rw, scr, r0, r1, n, H, I)
                return
            while n + VEC <= H:
                _dn_outer_cols[dtype, 1, VEC](ws, hs, w_e, perm, rw, scr, r0, r1, n, H, I)
                n += VEC
            while n < H:
                _dn_outer_cols[dtype, 1, 1](ws, hs, w_e, perm, rw, scr, r0, r1, n, H, I)
                n += 1

        run_dynamic(task_outer, n_chunks * n_tiles)
        _ = scratch^
    else:
        comptime NC = DOT_NC
        comptime NT = DOT_COLS_PER_TASK
        var n_tiles = ceildiv(H, NT)

        def task_dot(t: Int, wk: Int) {var ws, var hs, var w, var perm, var rw, var cp, var n_tiles, var H, var I}:
            var c = t // n_tiles
            var n = (t % n_tiles) * NT
            var n_end = min(n + NT, H)
            var e = cp[unsafe_offset=3 * c]
            var r0 = cp[unsafe_offset=3 * c + 1]
            var r1 = cp[unsafe_offset=3 * c + 2]
            var w_e = w.unsafe_offset(e * H * I)
            _dn_dot_block[dtype](ws, hs, w_e, perm, rw, r0, r1, n, n_end, H, I)

        run_dynamic(task_dot, n_chunks * n_tiles)


def combine_cpu[
    dtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    T: Int, top_k: Int, H: Int,
):
    """Combine: y[t, :] = sum_k ws[t, k, :] in top-k order, float32 accumulation, rounded once."""
    if T == 0 or H == 0:
        return
    comptime ROWS = 8

    def task(i: Int, wk: Int) {var y, var ws, var T, var top_k, var H}:
        for t in range(i * ROWS, min(i * ROWS + ROWS, T)):
            var n = 0
            while n + VEC <= H:
                var acc = SIMD[F32, VEC](0)
                for k in range(top_k):
                    acc += ws.unsafe_load[width=VEC]((t * top_k + k) * H + n).cast[F32]()
                y.unsafe_store(t * H + n, acc.cast[dtype]())
                n += VEC
            while n < H:
                var acc = Float32(0)
                for k in range(top_k):
                    acc += ws[unsafe_offset=(t * top_k + k) * H + n].cast[F32]()
                y[unsafe_offset=t * H + n] = acc.cast[dtype]()
                n += 1

    run_dynamic(task, ceildiv(T, ROWS))
