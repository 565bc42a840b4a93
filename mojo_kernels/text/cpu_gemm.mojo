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


@always_inline
def pack_panel[
    dtype: DType, NB: Int, NV: Int, VW: Int
](
    dst: Pointer[Scalar[dtype], MutAnyOrigin],
    b: Array[Pointer[Scalar[dtype], MutAnyOrigin], NB],
    ldb: Int,
    K: Int,
):
    """Copy NB groups of NV*VW columns of a [K, ldb] matrix into a dense [K, NB*NV*VW] panel.

    The row tiles after the first then read the panel sequentially (hardware
    prefetch, few pages) instead of NB short pieces of every ldb-long row.
    """
    comptime W = NV * VW
    comptime LINE = 64 // size_of[dtype]()
    for k in range(K):
        comptime for g in range(NB):
            comptime for c in range(0, W, LINE):
                prefetch(b[g].unsafe_offset((k + PF_DIST) * ldb + c))
            comptime for v in range(NV):
                dst.unsafe_store((k * NB + g) * W + v * VW, b[g].unsafe_load[width=VW](k * ldb + v * VW))


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
        var i = Int(counter.fetch_add(1))
        while i < n:
            func(i, w)
            i = Int(counter.fetch_add(1))

    parallelize(worker, workers, workers)


def row_chunks(offsets: Pointer[Int32, MutAnyOrigin], E: Int, skip_up_to: Int = 0) -> List[Int]:
    """Flat (expert, row_begin, row_end) triples covering the sorted rows of every expert
    with more than `skip_up_to` rows in chunks of at most ROWS_PER_CHUNK rows (empty
    experts get none), largest first so that the dynamic schedule ends with the small tasks."""
    var chunks = List[Int]()
    for e in range(E):
        var r = Int(offsets[unsafe_offset=e])
        var end = Int(offsets[unsafe_offset=e + 1])
        if end - r <= skip_up_to:
            continue
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



# ----------------------------------------------------------------------------- few rows per expert (hub layout)
# Decode routes one to a few rows to each expert. Reading an expert's [K, N] weight in
# column panels then walks K rows of a few cache lines each, pages apart, and leaves the
# DRAM bandwidth unused. Instead each (expert, k-block) task streams its rows of W in
# memory order, adding a[r][k] * W[k, :] into float32 partial rows (L1/L2); a second pass
# sums the k-blocks and applies the epilogue.
comptime STREAM_MAX_ROWS = 8   # experts with at most this many rows stream (hub layout)
comptime STREAM_TASKS = 16     # (expert, k-block) tasks to aim for per call


struct StreamPlan(Movable):
    """The experts with 1 ..< STREAM_MAX_ROWS + 1 sorted rows and how their streams split.

    Task t streams k-block t % nkb of expert experts[t // nkb]. Partial rows are
    compact over the streamed rows only: row r of streamed expert i in k-block kb
    is partial row kb * rows + base[i] + r (a buffer sized by all S rows would be
    nkb * S rows, ~100 MB for one small expert in a 512-token prefill).
    """
    var experts: List[Int]
    var base: List[Int]
    var rows: Int       # streamed rows in all
    var nkb: Int        # k-blocks per expert: enough tasks for every core, blocks >= 64 rows
    var kb_rows: Int

    def __init__(out self, offsets: Pointer[Int32, MutAnyOrigin], E: Int, K: Int):
        self.experts = List[Int]()
        self.base = List[Int]()
        self.rows = 0
        for e in range(E):
            var n = Int(offsets[unsafe_offset=e + 1]) - Int(offsets[unsafe_offset=e])
            if n > 0 and n <= STREAM_MAX_ROWS:
                self.experts.append(e)
                self.base.append(self.rows)
                self.rows += n
        var n_experts = len(self.experts)
        self.nkb = 0 if n_experts == 0 else max(1, min(ceildiv(STREAM_TASKS, n_experts), K // 64))
        self.kb_rows = ceildiv(K, max(self.nkb, 1))

    def n_tasks(self) -> Int:
        return len(self.experts) * self.nkb


@always_inline
def _stream_step[
    dtype: DType, MR: Int, KU: Int
](
    part: Pointer[Float32, MutAnyOrigin],
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    ldw: Int, k: Int, N: Int,
):
    """part[r, :N] += sum_{q < KU} a[r][k+q] * W[k+q, :N]  (W rows ldw apart, part rows N apart)."""
    var xb = Array[SIMD[F32, VEC], MR * KU](fill=0)
    comptime for r in range(MR):
        comptime for q in range(KU):
            xb[r * KU + q] = SIMD[F32, VEC](a[r].unsafe_load[width=1](k + q).cast[F32]())
    var n = 0
    while n + VEC <= N:
        var wv = Array[SIMD[F32, VEC], KU](fill=0)
        comptime for q in range(KU):
            wv[q] = w.unsafe_load[width=VEC]((k + q) * ldw + n).cast[F32]()
        comptime for r in range(MR):
            var acc = part.unsafe_load[width=VEC](r * N + n)
            comptime for q in range(KU):
                acc = xb[r * KU + q].fma(wv[q], acc)
            part.unsafe_store(r * N + n, acc)
        n += VEC
    while n < N:
        comptime for r in range(MR):
            var acc = part[unsafe_offset=r * N + n]
            comptime for q in range(KU):
                acc += xb[r * KU + q][0] * w[unsafe_offset=(k + q) * ldw + n].cast[F32]()
            part[unsafe_offset=r * N + n] = acc
        n += 1


@always_inline
def _stream_rows[
    dtype: DType, MR: Int
](
    part: Pointer[Float32, MutAnyOrigin],
    rows: Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    ldw: Int, k0: Int, k1: Int, N: Int,
):
    """part[r, :N] = sum_{k0 <= k < k1} rows[r][k] * W[k, :N] for r < MR (float32)."""
    # Weight rows read together: more concurrent streams use more of the DRAM bandwidth
    # (8 layers of 4 experts, one row: 4 rows 5.8 ms, 8 rows 5.3, 16 rows 4.9, 32 rows 6.7).
    comptime KU = 16 if MR == 1 else (8 if MR <= 4 else 4)
    var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=rows[0])
    comptime for r in range(MR):
        a[r] = rows[r]
    for i in range(MR * N):
        part[unsafe_offset=i] = 0
    var k = k0
    while k + KU <= k1:
        _stream_step[dtype, MR, KU](part, a, w, ldw, k, N)
        k += KU
    while k < k1:
        _stream_step[dtype, MR, 1](part, a, w, ldw, k, N)
        k += 1


def stream_task[
    dtype: DType
](
    part: Pointer[Float32, MutAnyOrigin],
    rows: Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS],
    n_rows: Int,
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    ldw: Int, k0: Int, k1: Int, N: Int,
):
    """One (expert, k-block) task of n_rows (1 ... STREAM_MAX_ROWS) rows."""
    comptime for mr in range(1, STREAM_MAX_ROWS + 1):
        if n_rows == mr:
            _stream_rows[dtype, mr](part, rows, w, ldw, k0, k1, N)


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
    scratch: panel_pairs_size(H, 2*NV*VW) elements (the packed bf16 or dense panel)."""
    comptime MR = GU_MR
    comptime PACKED = dtype == BF16 and USE_DPBF16 and VW == 16
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], 2](fill=w_e.unsafe_offset(j))
    b[1] = w_e.unsafe_offset(I + j)
    var pk = rebind[Pointer[Scalar[BF16], MutAnyOrigin]](scratch)
    comptime if PACKED:
        pack_pairs[2, NV](pk, rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], 2]](b), 2 * I, H)
    # several row tiles: copy the panel (gate and up columns) to a dense scratch panel first
    var dense_panel = r1 - r0 > MR
    var bd = Array[Pointer[Scalar[dtype], MutAnyOrigin], 2](fill=scratch)
    bd[1] = scratch.unsafe_offset(NV * VW)
    comptime if not PACKED:
        if dense_panel:
            pack_panel[dtype, 2, NV, VW](scratch, b, 2 * I, H)
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
            if dense_panel:
                acc = outer_tile[dtype, MR, 2, NV, VW](a, bd, 2 * NV * VW, H)
            else:           # one row tile: stream the weight panel from memory
                acc = outer_tile[dtype, MR, 2, NV, VW, True](a, b, 2 * I, H)
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
    if I == 0:
        return
    comptime if hub:
        comptime NBW = GU_NV * VEC
        # Experts with many rows: column panels (outer-product tiles); with few: weight streams.
        var chunks = row_chunks(offsets, E, STREAM_MAX_ROWS)
        var n_chunks = len(chunks) // 3
        var cp = chunks.unsafe_ptr()
        var n_tiles = ceildiv(I, NBW)
        var panel = panel_pairs_size(H, 2 * NBW)
        var plan = StreamPlan(offsets, E, H)
        var n_streams = len(plan.experts)
        var ep = plan.experts.unsafe_ptr()
        var bp = plan.base.unsafe_ptr()
        var nkb = plan.nkb
        var kb_rows = plan.kb_rows
        var RS = plan.rows
        var partials = List[Float32](length=nkb * RS * 2 * I, fill=0)
        var pp = partials.unsafe_ptr().as_unsafe_any_origin()
        var n_stream_tasks = plan.n_tasks()
        var n_tasks = n_stream_tasks + n_chunks * n_tiles
        # One packing panel per worker (a worker's index can reach num_workers(n_tasks) - 1);
        # none when every expert streams (decode), where zero-filling it would cost ~1 MB a call.
        var scratch = List[Scalar[dtype]](length=num_workers(n_tasks) * panel if n_chunks > 0 else 0, fill=0)
        var sp = scratch.unsafe_ptr().as_unsafe_any_origin()

        def task(t: Int, wk: Int) {var h, var x, var w, var perm, var offsets, var cp, var n_tiles, var top_k, var H, var I, var sp, var panel, var ep, var bp, var nkb, var kb_rows, var RS, var pp, var n_stream_tasks}:
            if t < n_stream_tasks:
                var e = ep[unsafe_offset=t // nkb]
                var b = bp[unsafe_offset=t // nkb]
                var kb = t % nkb
                var r0 = Int(offsets[unsafe_offset=e])
                var n_rows = Int(offsets[unsafe_offset=e + 1]) - r0
                var rows = Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS](fill=x)
                for i in range(n_rows):
                    rows[i] = x.unsafe_offset((Int(perm[unsafe_offset=r0 + i]) // top_k) * H)
                var k0 = kb * kb_rows
                stream_task[dtype](
                    pp.unsafe_offset((kb * RS + b) * 2 * I), rows, n_rows,
                    w.unsafe_offset(e * H * 2 * I), 2 * I, k0, min(k0 + kb_rows, H), 2 * I,
                )
                return
            var u = t - n_stream_tasks
            var scr = sp.unsafe_offset(wk * panel)
            var c = u // n_tiles
            var j = (u % n_tiles) * NBW
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

        run_dynamic(task, n_tasks)

        def finish(i: Int, wk: Int) {var h, var offsets, var ep, var bp, var nkb, var RS, var I, var pp}:
            """Sum the k-blocks of one streamed expert's rows, then SwiGLU."""
            var e = ep[unsafe_offset=i]
            var r0 = Int(offsets[unsafe_offset=e])
            for p in range(r0, Int(offsets[unsafe_offset=e + 1])):
                var c = bp[unsafe_offset=i] + p - r0
                var j = 0
                while j + VEC <= I:
                    var g = SIMD[F32, VEC](0)
                    var u = SIMD[F32, VEC](0)
                    for kb in range(nkb):
                        var row = pp.unsafe_offset((kb * RS + c) * 2 * I)
                        g += row.unsafe_load[width=VEC](j)
                        u += row.unsafe_load[width=VEC](I + j)
                    h.unsafe_store(p * I + j, swiglu[dtype](g, u).cast[dtype]())
                    j += VEC
                while j < I:
                    var g = SIMD[F32, 1](0)
                    var u = SIMD[F32, 1](0)
                    for kb in range(nkb):
                        var row = pp.unsafe_offset((kb * RS + c) * 2 * I)
                        g += row[unsafe_offset=j]
                        u += row[unsafe_offset=I + j]
                    h[unsafe_offset=p * I + j] = swiglu[dtype](g, u).cast[dtype]()
                    j += 1

        run_dynamic(finish, n_streams)
        _ = scratch^
        _ = partials^
        _ = plan^
        _ = chunks^
    else:
        comptime NC = DOT_NC // 2
        comptime NT = DOT_COLS_PER_TASK
        var chunks = row_chunks(offsets, E)
        var n_chunks = len(chunks) // 3
        var cp = chunks.unsafe_ptr()
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
        _ = chunks^


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
    scratch: panel_pairs_size(I, NV*VW) elements (the packed bf16 or dense panel)."""
    comptime MR = DN_MR
    comptime PACKED = dtype == BF16 and USE_DPBF16 and VW == 16
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], 1](fill=w_e.unsafe_offset(n))
    var pk = rebind[Pointer[Scalar[BF16], MutAnyOrigin]](scratch)
    comptime if PACKED:
        pack_pairs[1, NV](pk, rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], 1]](b), H, I)
    # several row tiles: copy the panel to a dense scratch panel first
    var dense_panel = r1 - r0 > MR
    var bd = Array[Pointer[Scalar[dtype], MutAnyOrigin], 1](fill=scratch)
    comptime if not PACKED:
        if dense_panel:
            pack_panel[dtype, 1, NV, VW](scratch, b, H, I)
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
            if dense_panel:
                acc = outer_tile[dtype, MR, 1, NV, VW](a, bd, NV * VW, I)
            else:           # one row tile: stream the weight panel from memory
                acc = outer_tile[dtype, MR, 1, NV, VW, True](a, b, H, I)
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
    if H == 0:
        return
    comptime if hub:
        comptime NBW = DN_NV * VEC
        # Experts with many rows: column panels (outer-product tiles); with few: weight streams.
        var chunks = row_chunks(offsets, E, STREAM_MAX_ROWS)
        var n_chunks = len(chunks) // 3
        var cp = chunks.unsafe_ptr()
        var n_tiles = ceildiv(H, NBW)
        var panel = panel_pairs_size(I, NBW)
        var plan = StreamPlan(offsets, E, I)
        var n_streams = len(plan.experts)
        var ep = plan.experts.unsafe_ptr()
        var bp = plan.base.unsafe_ptr()
        var nkb = plan.nkb
        var kb_rows = plan.kb_rows
        var RS = plan.rows
        var partials = List[Float32](length=nkb * RS * H, fill=0)
        var pp = partials.unsafe_ptr().as_unsafe_any_origin()
        var n_stream_tasks = plan.n_tasks()
        var n_tasks = n_stream_tasks + n_chunks * n_tiles
        # One packing panel per worker (a worker's index can reach num_workers(n_tasks) - 1);
        # none when every expert streams (decode), where zero-filling it would cost ~1 MB a call.
        var scratch = List[Scalar[dtype]](length=num_workers(n_tasks) * panel if n_chunks > 0 else 0, fill=0)
        var sp = scratch.unsafe_ptr().as_unsafe_any_origin()

        def task(t: Int, wk: Int) {var ws, var hs, var w, var perm, var rw, var offsets, var cp, var n_tiles, var H, var I, var sp, var panel, var ep, var bp, var nkb, var kb_rows, var RS, var pp, var n_stream_tasks}:
            if t < n_stream_tasks:
                var e = ep[unsafe_offset=t // nkb]
                var b = bp[unsafe_offset=t // nkb]
                var kb = t % nkb
                var r0 = Int(offsets[unsafe_offset=e])
                var n_rows = Int(offsets[unsafe_offset=e + 1]) - r0
                var rows = Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS](fill=hs)
                for i in range(n_rows):
                    rows[i] = hs.unsafe_offset((r0 + i) * I)
                var k0 = kb * kb_rows
                stream_task[dtype](
                    pp.unsafe_offset((kb * RS + b) * H), rows, n_rows,
                    w.unsafe_offset(e * I * H), H, k0, min(k0 + kb_rows, I), H,
                )
                return
            var u = t - n_stream_tasks
            var scr = sp.unsafe_offset(wk * panel)
            var c = u // n_tiles
            var n = (u % n_tiles) * NBW
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

        run_dynamic(task, n_tasks)

        def finish(i: Int, wk: Int) {var ws, var perm, var rw, var offsets, var ep, var bp, var nkb, var RS, var H, var pp}:
            """Sum the k-blocks of one streamed expert's rows, round, weight, un-permute."""
            var e = ep[unsafe_offset=i]
            var r0 = Int(offsets[unsafe_offset=e])
            for p in range(r0, Int(offsets[unsafe_offset=e + 1])):
                var c = bp[unsafe_offset=i] + p - r0
                var slot = Int(perm[unsafe_offset=p])
                var wt = rw[unsafe_offset=slot].cast[F32]()
                var dst = ws.unsafe_offset(slot * H)
                var n = 0
                while n + VEC <= H:
                    var acc = SIMD[F32, VEC](0)
                    for kb in range(nkb):
                        acc += pp.unsafe_load[width=VEC]((kb * RS + c) * H + n)
                    dst.unsafe_store(n, (round_to[dtype](acc) * wt).cast[dtype]())
                    n += VEC
                while n < H:
                    var acc = SIMD[F32, 1](0)
                    for kb in range(nkb):
                        acc += pp[unsafe_offset=(kb * RS + c) * H + n]
                    dst[unsafe_offset=n] = (round_to[dtype](acc) * wt).cast[dtype]()
                    n += 1

        run_dynamic(finish, n_streams)
        _ = scratch^
        _ = partials^
        _ = plan^
        _ = chunks^
    else:
        comptime NC = DOT_NC
        comptime NT = DOT_COLS_PER_TASK
        var chunks = row_chunks(offsets, E)
        var n_chunks = len(chunks) // 3
        var cp = chunks.unsafe_ptr()
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
        _ = chunks^


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


# ----------------------------------------------------------------------------- dense linear, few rows
comptime LIN_ROWS_PER_TASK = 48   # weight rows per parallel task (a multiple of every NC below)


@always_inline
def _linear_tile[
    dtype: DType, MR: Int, NC: Int
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    m0: Int, rows: Int, n: Int, N: Int, K: Int,
):
    """y[m0 ..< m0+rows, n ..< n+NC] = x[m0 ...] @ W[n ..< n+NC]^T (rows <= MR; extra rows repeat the last)."""
    var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=x)
    comptime for i in range(MR):
        a[i] = x.unsafe_offset((m0 + min(i, rows - 1)) * K)
    var b = Array[Pointer[Scalar[dtype], MutAnyOrigin], NC](fill=w)
    comptime for c in range(NC):
        b[c] = w.unsafe_offset((n + c) * K)
    var acc = dot_tile[dtype, MR, NC](a, b, K)
    comptime for i in range(MR):
        if i < rows:
            comptime for c in range(NC):
                y[unsafe_offset=(m0 + i) * N + n + c] = acc[i * NC + c].cast[dtype]()


@always_inline
def _linear_block[
    dtype: DType, MR: Int, NC: Int
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    M: Int, n0: Int, n1: Int, N: Int, K: Int,
):
    """y[:, n0 ..< n1]: NC weight rows at a time, each streamed from memory once;
    row groups of MR inside, re-reading the tile from L1."""
    var n = n0
    while n + NC <= n1:
        var m = 0
        while m < M:
            _linear_tile[dtype, MR, NC](y, x, w, m, min(MR, M - m), n, N, K)
            m += MR
        n += NC
    while n < n1:
        var m = 0
        while m < M:
            _linear_tile[dtype, MR, 1](y, x, w, m, min(MR, M - m), n, N, K)
            m += MR
        n += 1


def linear_rows_cpu[
    dtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    M: Int, N: Int, K: Int,
):
    """Computes y = x @ W^T for a few rows of x (W [N, K] row-major): W streams once, row after row.

    Register tiles (rows x weight rows): 1x8, 2x8, 4x6, 8x3, at most 24 accumulators."""
    var tasks = ceildiv(N, LIN_ROWS_PER_TASK)

    def task(t: Int, wk: Int) {var y, var x, var w, var M, var N, var K}:
        var n0 = t * LIN_ROWS_PER_TASK
        var n1 = min(n0 + LIN_ROWS_PER_TASK, N)
        if M == 1:
            _linear_block[dtype, 1, 8](y, x, w, M, n0, n1, N, K)
        elif M == 2:
            _linear_block[dtype, 2, 8](y, x, w, M, n0, n1, N, K)
        elif M <= 4:
            _linear_block[dtype, 4, 6](y, x, w, M, n0, n1, N, K)
        else:
            _linear_block[dtype, 8, 3](y, x, w, M, n0, n1, N, K)

    run_dynamic(task, tasks)
