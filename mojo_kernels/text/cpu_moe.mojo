# CPU drivers of the MoE grouped GEMMs: gate_up with the SwiGLU epilogue, down with the
# routing weight and the un-permute, and the per-token combine.
#
# Notation: S = T*top_k routed (token, k) pairs ("slots"); rows of the grouped
# GEMMs are the slots sorted by expert: sorted row p holds slot perm[p], whose
# token is perm[p] // top_k; expert e owns sorted rows offsets[e] ..< offsets[e+1].
#
# Activations are `dtype`, expert weights `wdtype` (bfloat16 weights may serve float32
# activations: see cpu_microkernels.mojo).
#
# The weight layout (a compile-time parameter) picks the micro-kernel
# (cpu_microkernels.mojo): "outer" for the hub layout, "dot" for transformers'.
# gate_up and down share one driver per layout (hub_gemm_cpu, dot_gemm_cpu),
# parameterised at compile time on the epilogue (`gated`, as the GPU kernels in
# gpu_moe.mojo are):
#                  gated (gate_up)                          not gated (down)
#   K, N           H, I                                     I, H
#   NB groups      2: gate columns n.., up columns N + n..  1
#   row of p       x[perm[p] // top_k]                      h[p]
#   epilogue       h[p, n] = swiglu(gate, up)               ws[perm[p], n] = round(acc) * rw[perm[p]]
from std.math import ceildiv

from .activation import round_to, swiglu
from .cpu_microkernels import (
    BF16, F32, USE_DPBF16, VEC, dot_tile, outer_tile, outer_tile_dp, outer_tile_pairs, pack_pairs, pack_panel,
    panel_pairs_size,
)
from .cpu_scheduler import num_workers, run_dynamic
from .cpu_weight_stream import STREAM_MAX_ROWS, StreamPlan, stream_task

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


# ----------------------------------------------------------------------------- both layouts
@always_inline
def epilogue[
    dtype: DType, gated: Bool, W: Int
](acc: SIMD[F32, W], up: SIMD[F32, W], wt: Float32) -> SIMD[dtype, W]:
    """The output values from the float32 accumulators (see above; `up`: gated only)."""
    comptime if gated:
        return swiglu[dtype](acc, up).cast[dtype]()
    else:
        # torch: (h @ W) rounded to dtype, times the routing weight, rounded
        return (round_to[dtype](acc) * wt).cast[dtype]()


struct RowOut[dtype: DType, gated: Bool]:
    """Where the outputs of sorted row p go, and the routing weight they take (see above)."""

    var start: Int      # offset of the row's column 0 in the output
    var wt: Float32     # routing weight (not gated)

    @always_inline
    def __init__(
        out self,
        perm: Pointer[Int32, MutAnyOrigin],
        rw: Pointer[Scalar[Self.dtype], MutAnyOrigin],
        p: Int, N: Int,
    ):
        comptime if Self.gated:
            self.start = p * N
            self.wt = 1
        else:
            var slot = Int(perm[unsafe_offset=p])
            self.start = slot * N
            self.wt = rw[unsafe_offset=slot].cast[F32]()

    @always_inline
    def store[W: Int](
        self, out_ptr: Pointer[Scalar[Self.dtype], MutAnyOrigin], n: Int, acc: SIMD[F32, W], up: SIMD[F32, W]
    ):
        """Columns n ..< n+W through the epilogue."""
        out_ptr.unsafe_store(self.start + n, epilogue[Self.dtype, Self.gated, W](acc, up, self.wt))


@always_inline
def _act_row[
    dtype: DType, gated: Bool
](
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    p: Int, top_k: Int, K: Int,
) -> Pointer[Scalar[dtype], MutAnyOrigin]:
    """The activation row of sorted row p (see above)."""
    comptime if gated:
        return a.unsafe_offset((Int(perm[unsafe_offset=p]) // top_k) * K)
    else:
        return a.unsafe_offset(p * K)


# ----------------------------------------------------------------------------- hub layout: W[e] is [K, NB*N], out = a @ W[e]
@always_inline
def _hub_cols[
    dtype: DType, wdtype: DType, gated: Bool, NV: Int, VW: Int
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    scratch: Pointer[Scalar[wdtype], MutAnyOrigin],
    r0: Int, r1: Int, n: Int, top_k: Int, K: Int, N: Int,
):
    """Columns n ..< n+NV*VW of sorted rows r0 ..< r1 of one expert, through the epilogue.
    scratch: panel_pairs_size(K, NB*NV*VW) elements (the packed bf16 or dense panel)."""
    comptime NB = 2 if gated else 1
    comptime MR = GU_MR if gated else DN_MR
    comptime PACKED = dtype == BF16 and wdtype == BF16 and USE_DPBF16 and VW == 16
    var b = Array[Pointer[Scalar[wdtype], MutAnyOrigin], NB](fill=w_e.unsafe_offset(n))
    comptime if gated:
        b[1] = w_e.unsafe_offset(N + n)
    var pk = rebind[Pointer[Scalar[BF16], MutAnyOrigin]](scratch)
    comptime if PACKED:
        pack_pairs[NB, NV](pk, rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], NB]](b), NB * N, K)
    # several row tiles: copy the panel (all NB groups) to a dense scratch panel first
    var dense_panel = r1 - r0 > MR
    var bd = Array[Pointer[Scalar[wdtype], MutAnyOrigin], NB](fill=scratch)
    comptime if gated:
        bd[1] = scratch.unsafe_offset(NV * VW)
    comptime if not PACKED:
        if dense_panel:
            pack_panel[wdtype, NB, NV, VW](scratch, b, NB * N, K)
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        var ar = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=a)
        comptime for i in range(MR):
            # rows past the end repeat the last real row (computed, not stored)
            ar[i] = _act_row[dtype, gated](a, perm, r + min(i, rows - 1), top_k, K)
        var acc: Array[SIMD[F32, VW], MR * NB * NV]
        comptime if PACKED:
            var accd = outer_tile_dp[MR, NB * NV](
                rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], MR]](ar), pk, K)
            acc = rebind[Array[SIMD[F32, VW], MR * NB * NV]](accd).copy()
        else:
            if dense_panel:
                acc = outer_tile[dtype, wdtype, MR, NB, NV, VW](ar, bd, NB * NV * VW, K)
            else:           # one row tile: stream the weight panel from memory
                acc = outer_tile[dtype, wdtype, MR, NB, NV, VW, True](ar, b, NB * N, K)
        comptime for i in range(MR):
            if i < rows:
                var dst = RowOut[dtype, gated](perm, rw, r + i, N)
                comptime for v in range(NV):
                    # row i's accumulators: NV vectors of group 0 (gate), then of group 1 (up)
                    dst.store[VW](out_ptr, n + v * VW, acc[i * NB * NV + v], acc[i * NB * NV + (NB - 1) * NV + v])
        r += MR


@always_inline
def _finish_cols[
    dtype: DType, gated: Bool, W: Int
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    dst: RowOut[dtype, gated],
    part: Pointer[Float32, MutAnyOrigin],
    kb_stride: Int, nkb: Int, n: Int, N: Int,
):
    """Columns n ..< n+W of one streamed row: the sum of its nkb k-block partial rows
    (part, kb_stride apart), through the epilogue."""
    var acc = SIMD[F32, W](0)
    var up = SIMD[F32, W](0)
    for kb in range(nkb):
        var row = part.unsafe_offset(kb * kb_stride)
        acc += row.unsafe_load[width=W](n)
        comptime if gated:
            up += row.unsafe_load[width=W](N + n)
    dst.store[W](out_ptr, n, acc, up)


def hub_gemm_cpu[
    dtype: DType, wdtype: DType, gated: Bool
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    E: Int, top_k: Int, K: Int, N: Int,
):
    """Grouped GEMM over hub-layout weights W [E, K, NB*N] for every sorted row of every
    expert, then the epilogue (see above). rw is read only when not gated."""
    comptime NB = 2 if gated else 1
    comptime NBW = (GU_NV if gated else DN_NV) * VEC
    # Experts with many rows: column panels (outer-product tiles); with few: weight streams.
    var chunks = row_chunks(offsets, E, STREAM_MAX_ROWS)
    var n_chunks = len(chunks) // 3
    var cp = chunks.unsafe_ptr()
    var n_tiles = ceildiv(N, NBW)
    var panel = panel_pairs_size(K, NB * NBW)
    var plan = StreamPlan(offsets, E, K)
    var n_streams = len(plan.experts)
    var ep = plan.experts.unsafe_ptr()
    var bp = plan.base.unsafe_ptr()
    var nkb = plan.nkb
    var kb_rows = plan.kb_rows
    var RS = plan.rows
    var partials = List[Float32](length=nkb * RS * NB * N, fill=0)
    var pp = partials.unsafe_ptr().as_unsafe_any_origin()
    var n_stream_tasks = plan.n_tasks()
    var n_tasks = n_stream_tasks + n_chunks * n_tiles
    # One packing panel per worker (a worker's index can reach num_workers(n_tasks) - 1);
    # none when every expert streams (decode), where zero-filling it would cost ~1 MB a call.
    var scratch = List[Scalar[wdtype]](length=num_workers(n_tasks) * panel if n_chunks > 0 else 0, fill=0)
    var sp = scratch.unsafe_ptr().as_unsafe_any_origin()

    def task(t: Int, wk: Int) {var out_ptr, var a, var w, var perm, var rw, var offsets, var cp, var n_tiles, var top_k, var K, var N, var sp, var panel, var ep, var bp, var nkb, var kb_rows, var RS, var pp, var n_stream_tasks}:
        if t < n_stream_tasks:
            var e = ep[unsafe_offset=t // nkb]
            var b = bp[unsafe_offset=t // nkb]
            var kb = t % nkb
            var r0 = Int(offsets[unsafe_offset=e])
            var n_rows = Int(offsets[unsafe_offset=e + 1]) - r0
            var rows = Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS](fill=a)
            for i in range(n_rows):
                rows[i] = _act_row[dtype, gated](a, perm, r0 + i, top_k, K)
            var k0 = kb * kb_rows
            stream_task[dtype, wdtype](
                pp.unsafe_offset((kb * RS + b) * NB * N), rows, n_rows,
                w.unsafe_offset(e * K * NB * N), NB * N, k0, min(k0 + kb_rows, K), NB * N,
            )
            return
        var u = t - n_stream_tasks
        var scr = sp.unsafe_offset(wk * panel)
        var c = u // n_tiles
        var n = (u % n_tiles) * NBW
        var e = cp[unsafe_offset=3 * c]
        var r0 = cp[unsafe_offset=3 * c + 1]
        var r1 = cp[unsafe_offset=3 * c + 2]
        var w_e = w.unsafe_offset(e * K * NB * N)
        if n + NBW <= N:
            _hub_cols[dtype, wdtype, gated, NBW // VEC, VEC](out_ptr, a, w_e, perm, rw, scr, r0, r1, n, top_k, K, N)
            return
        while n + VEC <= N:
            _hub_cols[dtype, wdtype, gated, 1, VEC](out_ptr, a, w_e, perm, rw, scr, r0, r1, n, top_k, K, N)
            n += VEC
        while n < N:
            _hub_cols[dtype, wdtype, gated, 1, 1](out_ptr, a, w_e, perm, rw, scr, r0, r1, n, top_k, K, N)
            n += 1

    run_dynamic(task, n_tasks)

    def finish(i: Int, wk: Int) {var out_ptr, var perm, var rw, var offsets, var ep, var bp, var nkb, var RS, var N, var pp}:
        """Sum the k-blocks of one streamed expert's rows, then the epilogue."""
        var e = ep[unsafe_offset=i]
        var r0 = Int(offsets[unsafe_offset=e])
        for p in range(r0, Int(offsets[unsafe_offset=e + 1])):
            var part = pp.unsafe_offset((bp[unsafe_offset=i] + p - r0) * NB * N)
            var dst = RowOut[dtype, gated](perm, rw, p, N)
            var n = 0
            while n + VEC <= N:
                _finish_cols[dtype, gated, VEC](out_ptr, dst, part, RS * NB * N, nkb, n, N)
                n += VEC
            while n < N:
                _finish_cols[dtype, gated, 1](out_ptr, dst, part, RS * NB * N, nkb, n, N)
                n += 1

    run_dynamic(finish, n_streams)
    _ = scratch^
    _ = partials^
    _ = plan^
    _ = chunks^


# ----------------------------------------------------------------------------- transformers layout: W[e] is [NB*N, K], out = W[e] @ a
@always_inline
def _dot_cols[
    dtype: DType, wdtype: DType, gated: Bool, NC: Int
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[wdtype], MutAnyOrigin],
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], DOT_MR],
    starts: Array[Int, DOT_MR],
    wts: Array[Float32, DOT_MR],
    rows: Int, n: Int, K: Int, N: Int,
):
    """Tile: columns n ..< n+NC of rows i < rows (RowOut start and weight given), through the epilogue."""
    comptime NB = 2 if gated else 1
    var b = Array[Pointer[Scalar[wdtype], MutAnyOrigin], NB * NC](fill=w_e)
    comptime for g in range(NB):
        comptime for c in range(NC):
            b[g * NC + c] = w_e.unsafe_offset((g * N + n + c) * K)
    var acc = dot_tile[dtype, wdtype, DOT_MR, NB * NC](a, b, K, b[0], 0)
    comptime for i in range(DOT_MR):
        if i < rows:
            comptime for c in range(NC):
                var o = epilogue[dtype, gated, 1](
                    SIMD[F32, 1](acc[i * NB * NC + c]), SIMD[F32, 1](acc[i * NB * NC + (NB - 1) * NC + c]), wts[i]
                )
                out_ptr[unsafe_offset=starts[i] + n + c] = o


@always_inline
def _dot_block[
    dtype: DType, wdtype: DType, gated: Bool
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a_base: Pointer[Scalar[dtype], MutAnyOrigin],
    w_e: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    r0: Int, r1: Int, n0: Int, n1: Int, top_k: Int, K: Int, N: Int,
):
    """Block: columns n0 ..< n1 of sorted rows r0 ..< r1. Row tiles outside, column tiles
    inside: the tile's activation rows stay in L1 while weight rows stream from L2."""
    comptime MR = DOT_MR
    comptime NC = DOT_NC // (2 if gated else 1)
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=a_base)
        var starts = Array[Int, MR](fill=0)
        var wts = Array[Float32, MR](fill=0)
        comptime for i in range(MR):
            # rows past the end repeat the last real row (computed, not stored)
            a[i] = _act_row[dtype, gated](a_base, perm, r + min(i, rows - 1), top_k, K)
            if i < rows:
                var dst = RowOut[dtype, gated](perm, rw, r + i, N)
                starts[i] = dst.start
                wts[i] = dst.wt
        var n = n0
        while n + NC <= n1:
            _dot_cols[dtype, wdtype, gated, NC](out_ptr, w_e, a, starts, wts, rows, n, K, N)
            n += NC
        while n < n1:
            _dot_cols[dtype, wdtype, gated, 1](out_ptr, w_e, a, starts, wts, rows, n, K, N)
            n += 1
        r += MR


def dot_gemm_cpu[
    dtype: DType, wdtype: DType, gated: Bool
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    E: Int, top_k: Int, K: Int, N: Int,
):
    """Grouped GEMM over transformers-layout weights W [E, NB*N, K] for every sorted row of
    every expert, then the epilogue (see above). rw is read only when not gated."""
    comptime NB = 2 if gated else 1
    comptime NT = DOT_COLS_PER_TASK
    var chunks = row_chunks(offsets, E)
    var n_chunks = len(chunks) // 3
    var cp = chunks.unsafe_ptr()
    var n_tiles = ceildiv(N, NT)

    def task(t: Int, wk: Int) {var out_ptr, var a, var w, var perm, var rw, var cp, var n_tiles, var top_k, var K, var N}:
        var c = t // n_tiles
        var n = (t % n_tiles) * NT
        var n_end = min(n + NT, N)
        var e = cp[unsafe_offset=3 * c]
        var r0 = cp[unsafe_offset=3 * c + 1]
        var r1 = cp[unsafe_offset=3 * c + 2]
        var w_e = w.unsafe_offset(e * NB * N * K)
        _dot_block[dtype, wdtype, gated](out_ptr, a, w_e, perm, rw, r0, r1, n, n_end, top_k, K, N)

    run_dynamic(task, n_chunks * n_tiles)
    _ = chunks^


# ----------------------------------------------------------------------------- panel layout: W[e] packed at load (CPU)
# The hub-layout weight [K, NB*N] of expert e stored as NP = ceil(N/PW) column panels,
# each contiguous, in the order the outer-product tiles read it (columns past N are 0):
#   float32:  [E, NP, K, NB*PW]             panel j, row k = gate cols j*PW ..< +PW, then up cols
#   bfloat16: [E, NP, ceil(K/2), 2*NB*PW]   the same rows in k-pairs: element 2c of pair-row kp is
#             W[2kp, c], element 2c+1 is W[2kp+1, c] (0 past K): what outer_tile_dp reads as it
#             is and outer_tile_pairs widens to float32
# Python packs them (qwen3vl_moe.kernels.moe.pack_expert_panels). A task reads one panel
# straight from the weights: no copy to scratch, and the hardware prefetcher streams it.
comptime GU_PW = 32           # gate_up panel: 32 gate and 32 up columns (256 bytes a row in both dtypes)
comptime DN_PW = 64           # down panel: 64 columns
comptime FUSED_COMBINE_ROWS = 64   # down: up to this many routed rows (decode), one task per panel combines too


def panel_elems[wdtype: DType](K: Int, cols: Int) -> Int:
    """Elements of one packed panel of `cols` columns over K rows (see above)."""
    comptime if wdtype == BF16:
        return panel_pairs_size(K, cols)
    else:
        return K * cols


@always_inline
def _panel_tile[
    dtype: DType, wdtype: DType, gated: Bool, MR: Int
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    panel: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    r: Int, rows: Int, n0: Int, sub: Int, top_k: Int, K: Int, N: Int,
):
    """Rows r ..< r+rows (rows <= MR) of one expert against panel columns sub ..< sub+NV*VEC
    (output columns n0+sub ..), through the epilogue; columns past N are not stored."""
    comptime NB = 2 if gated else 1
    comptime PW = GU_PW if gated else DN_PW
    comptime NV = GU_NV if gated else DN_NV
    comptime NBV = NB * NV
    var ar = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=a)
    comptime for i in range(MR):
        # rows past the end repeat the last real row (computed, not stored)
        ar[i] = _act_row[dtype, gated](a, perm, r + min(i, rows - 1), top_k, K)
    var acc: Array[SIMD[F32, VEC], MR * NBV]
    comptime if wdtype == F32:
        var b = Array[Pointer[Scalar[F32], MutAnyOrigin], NB](fill=rebind[Pointer[Scalar[F32], MutAnyOrigin]](panel))
        comptime for g in range(NB):
            b[g] = b[g].unsafe_offset(g * PW + sub)
        acc = outer_tile[dtype, F32, MR, NB, NV, VEC](ar, b, NB * PW, K)
    elif dtype == BF16 and USE_DPBF16 and NV * VEC == PW:
        var accd = outer_tile_dp[MR, NBV](
            rebind[Array[Pointer[Scalar[BF16], MutAnyOrigin], MR]](ar), rebind[Pointer[Scalar[BF16], MutAnyOrigin]](panel), K)
        acc = rebind[Array[SIMD[F32, VEC], MR * NBV]](accd).copy()
    else:
        var b = Array[Pointer[UInt32, MutAnyOrigin], NB](fill=panel.unsafe_bitcast[UInt32]())
        comptime for g in range(NB):
            b[g] = b[g].unsafe_offset(g * PW + sub)
        acc = outer_tile_pairs[dtype, MR, NB, NV, VEC](ar, b, NB * PW, K)
    comptime for i in range(MR):
        if i < rows:
            var dst = RowOut[dtype, gated](perm, rw, r + i, N)
            comptime for v in range(NV):
                var g = acc[i * NBV + v]
                var u = acc[i * NBV + (NB - 1) * NV + v]
                var c = n0 + sub + v * VEC
                if c + VEC <= N:
                    dst.store[VEC](out_ptr, c, g, u)
                else:
                    for l in range(max(0, N - c)):
                        dst.store[1](out_ptr, c + l, SIMD[F32, 1](g[l]), SIMD[F32, 1](u[l]))


def _panel_rows[
    dtype: DType, wdtype: DType, gated: Bool
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    panel: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    r0: Int, r1: Int, n0: Int, top_k: Int, K: Int, N: Int,
):
    """Sorted rows r0 ..< r1 of one expert against one panel (output columns n0 ..< n0+PW).
    A short last row tile (and decode's one or two rows) takes a smaller tile instead of
    computing MR rows; each row's sums are the same whatever the tile."""
    comptime MR = GU_MR if gated else DN_MR
    comptime PW = GU_PW if gated else DN_PW
    comptime SUB = (GU_NV if gated else DN_NV) * VEC
    comptime MR4 = min(4, MR)
    var r = r0
    while r < r1:
        var rows = min(MR, r1 - r)
        comptime for sub in range(0, PW, SUB):
            if n0 + sub < N:
                if rows == 1:
                    _panel_tile[dtype, wdtype, gated, 1](out_ptr, a, panel, perm, rw, r, rows, n0, sub, top_k, K, N)
                elif rows == 2:
                    _panel_tile[dtype, wdtype, gated, 2](out_ptr, a, panel, perm, rw, r, rows, n0, sub, top_k, K, N)
                elif rows <= MR4:
                    _panel_tile[dtype, wdtype, gated, MR4](out_ptr, a, panel, perm, rw, r, rows, n0, sub, top_k, K, N)
                else:
                    _panel_tile[dtype, wdtype, gated, MR](out_ptr, a, panel, perm, rw, r, rows, n0, sub, top_k, K, N)
        r += MR


def gate_up_panels_cpu[
    dtype: DType, wdtype: DType
](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    E: Int, top_k: Int, H: Int, I: Int,
):
    """The gate_up_cpu GEMM over panel-layout weights: one (row chunk, panel) task each, one fork/join."""
    var NP = ceildiv(I, GU_PW)
    var pe = panel_elems[wdtype](H, 2 * GU_PW)
    var chunks = row_chunks(offsets, E)
    var cp = chunks.unsafe_ptr()

    def task(t: Int, wk: Int) {var h, var x, var w, var perm, var cp, var NP, var pe, var top_k, var H, var I}:
        var c = t // NP
        var j = t % NP
        var e = cp[unsafe_offset=3 * c]
        var panel = w.unsafe_offset((e * NP + j) * pe)
        _panel_rows[dtype, wdtype, True](
            h, x, panel, perm, x, cp[unsafe_offset=3 * c + 1], cp[unsafe_offset=3 * c + 2], j * GU_PW, top_k, H, I)

    run_dynamic(task, len(chunks) // 3 * NP)
    _ = chunks^


def down_panels_cpu[
    dtype: DType, wdtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    hs: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    E: Int, T: Int, top_k: Int, H: Int, I: Int,
):
    """The down_cpu GEMM then combine_cpu over panel-layout weights. Up to FUSED_COMBINE_ROWS routed
    rows (decode), task j runs every expert's rows against panel j and then combines
    columns j*DN_PW ..: one fork/join for the op. More rows: (row chunk, panel) tasks, then
    the combine."""
    var NP = ceildiv(H, DN_PW)
    var pe = panel_elems[wdtype](I, DN_PW)
    if T * top_k <= FUSED_COMBINE_ROWS:

        def panel_task(j: Int, wk: Int) {var y, var ws, var hs, var w, var perm, var offsets, var rw, var E, var T, var top_k, var NP, var pe, var H, var I}:
            for e in range(E):
                var r0 = Int(offsets[unsafe_offset=e])
                var r1 = Int(offsets[unsafe_offset=e + 1])
                if r1 > r0:
                    _panel_rows[dtype, wdtype, False](
                        ws, hs, w.unsafe_offset((e * NP + j) * pe), perm, rw, r0, r1, j * DN_PW, 1, I, H)
            for t in range(T):
                _combine_cols[dtype](y, ws, t, top_k, H, j * DN_PW, min(H, (j + 1) * DN_PW))

        run_dynamic(panel_task, NP)
        return
    var chunks = row_chunks(offsets, E)
    var cp = chunks.unsafe_ptr()

    def task(t: Int, wk: Int) {var ws, var hs, var w, var perm, var rw, var cp, var NP, var pe, var H, var I}:
        var c = t // NP
        var j = t % NP
        var e = cp[unsafe_offset=3 * c]
        _panel_rows[dtype, wdtype, False](
            ws, hs, w.unsafe_offset((e * NP + j) * pe), perm, rw,
            cp[unsafe_offset=3 * c + 1], cp[unsafe_offset=3 * c + 2], j * DN_PW, 1, I, H)

    run_dynamic(task, len(chunks) // 3 * NP)
    _ = chunks^
    combine_cpu[dtype](y, ws, T, top_k, H)


# ----------------------------------------------------------------------------- the two GEMMs
def gate_up_cpu[
    dtype: DType, wdtype: DType, hub: Bool
](
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    E: Int, top_k: Int, H: Int, I: Int,
):
    """Grouped gate_up: h[p, :] = silu(x[tok] @ Wg) * (x[tok] @ Wu) for every sorted row p of every expert."""
    if I == 0:
        return
    comptime if hub:
        hub_gemm_cpu[dtype, wdtype, True](h, x, w, perm, offsets, x, E, top_k, H, I)
    else:
        dot_gemm_cpu[dtype, wdtype, True](h, x, w, perm, offsets, x, E, top_k, H, I)


def down_cpu[
    dtype: DType, wdtype: DType, hub: Bool
](
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    hs: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    E: Int, H: Int, I: Int,
):
    """Grouped down: ws[perm[p], :] = rw[perm[p]] * (h[p] @ Wdown[e]) for every sorted row p."""
    if H == 0:
        return
    comptime if hub:
        hub_gemm_cpu[dtype, wdtype, False](ws, hs, w, perm, offsets, rw, E, 1, I, H)
    else:
        dot_gemm_cpu[dtype, wdtype, False](ws, hs, w, perm, offsets, rw, E, 1, I, H)


# ----------------------------------------------------------------------------- combine
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
            _combine_cols[dtype](y, ws, t, top_k, H, 0, H)

    run_dynamic(task, ceildiv(T, ROWS))


@always_inline
def _combine_cols[
    dtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    t: Int, top_k: Int, H: Int, n0: Int, n1: Int,
):
    """y[t, n0 ..< n1] = sum_k ws[t, k, n0 ..< n1] (see combine_cpu)."""
    var n = n0
    while n + VEC <= n1:
        var acc = SIMD[F32, VEC](0)
        for k in range(top_k):
            acc += ws.unsafe_load[width=VEC]((t * top_k + k) * H + n).cast[F32]()
        y.unsafe_store(t * H + n, acc.cast[dtype]())
        n += VEC
    while n < n1:
        var acc = Float32(0)
        for k in range(top_k):
            acc += ws[unsafe_offset=(t * top_k + k) * H + n].cast[F32]()
        y[unsafe_offset=t * H + n] = acc.cast[dtype]()
        n += 1
