# GPU kernels of the MoE grouped GEMMs (gate_up with fused SwiGLU, down with fused
# routing weight + un-permute), and the per-token combine.
#
# Grid: block_idx.x = output column tile, block_idx.y = row tile. Row tiles are
# numbered expert by expert (ceil(rows_e / BM) tiles each); a block whose y is past
# the last tile exits. Grid y is sized ceil(S / BM) + E (an upper bound).
#
# Block tile: BM = 64 sorted rows x BCOLS = 128 weight columns (gate_up: 64 gate
# columns and the matching 64 up columns; down: 128 output columns), K in steps of BK.
#
# * bfloat16: tensor cores, `mma.sync.m16n8k16` bf16 x bf16 -> f32. 4 warps in a
#   2 x 2 grid, each warp 32 rows x (8 n8-tiles), global -> register prefetch of
#   the next K tile while the current one is multiplied from shared memory.
# * float32 (or any dtype): shared-memory tiled FMA kernel, 8 x 8 outputs per thread.
from max.gpu import thread_idx, block_idx, barrier
from max.gpu.compute.mma import ld_matrix, mma
from max.gpu.host import DeviceContext
from std.memory import stack_allocation, AddressSpace
from std.math import ceildiv
from std.sys import size_of

from .activation import round_to, swiglu

comptime F32 = DType.float32
comptime BF16 = DType.bfloat16

comptime BM = 64
comptime BCOLS = 128
comptime GEMM_THREADS = 128

# tensor-core kernel
comptime TC_BK = 32
comptime TC_ASTR = TC_BK + 8          # As[BM][TC_ASTR]   (row-major, k contiguous)
comptime TC_BSTR_N = TC_BK + 8        # Bs[BCOLS][..]     (n-major, transformers layout)
comptime TC_BSTR_K = BCOLS + 8        # Bs[TC_BK][..]     (k-major, hub layout)

# Fragments from shared memory with ldmatrix.x4 (6 instructions per k16 step and warp,
# instead of 24 (transformers layout) or 40 (hub layout, 16-bit) scalar shared loads).
# bench/gpu/check_moe.mojo checks both variants; set False to fall back.
comptime TC_LDMATRIX = True

# FMA kernel
comptime FMA_BK = 16
comptime FMA_ASTR = BM + 4            # As[FMA_BK][FMA_ASTR]  (k-major)
comptime FMA_BSTR = BCOLS + 4         # Bs[FMA_BK][FMA_BSTR]  (k-major)


def gemm_grid_y(S: Int, E: Int) -> Int:
    return ceildiv(S, BM) + E


def gemm_grid_x(N: Int, gated: Bool) -> Int:
    """Column tiles: gate_up covers 64 output columns per block, down 128."""
    return ceildiv(N, BCOLS // 2 if gated else BCOLS)


@always_inline
def _find_tile(
    offsets: Pointer[Int32, MutAnyOrigin], E: Int, y: Int
) -> Tuple[Int, Int, Int]:
    """(expert, first row, end row) of row tile y, or expert -1 past the last tile."""
    var before = 0
    for e in range(E):
        var s = Int(offsets[unsafe_offset=e])
        var t = Int(offsets[unsafe_offset=e + 1])
        var n = ceildiv(t - s, BM)
        if y < before + n:
            var r0 = s + (y - before) * BM
            return (e, r0, min(r0 + BM, t))
        before += n
    return (-1, 0, 0)


@always_inline
def _load8[
    dtype: DType
](src: Pointer[Scalar[dtype], MutAnyOrigin], valid: Int, fast: Bool) -> SIMD[dtype, 8]:
    """src[0 ..< 8] with elements at index >= valid read as 0 (no access past `valid`)."""
    if fast and valid >= 8:
        return src.unsafe_load[width=8, alignment=8 * size_of[dtype]()](0)
    var v = SIMD[dtype, 8](0)
    comptime for q in range(8):
        if q < valid:
            v[q] = src[unsafe_offset=q]
    return v


@always_inline
def _b_col(c: Int, n0: Int, N: Int, gated: Bool) -> Tuple[Int, Int]:
    """Weight column (global) of B-tile column c, and how many columns from there on
    (within c's group) are still in range."""
    if gated:
        var g = c // (BCOLS // 2)
        var j = n0 + c % (BCOLS // 2)
        return (g * N + j, N - j)
    return (n0 + c, N - n0 - c)


# ============================================================================ tensor cores
def moe_gemm_tc_kernel[
    hub: Bool, gated: Bool, ldsm: Bool = TC_LDMATRIX
](
    out_ptr: Pointer[Scalar[BF16], MutAnyOrigin],
    a_ptr: Pointer[Scalar[BF16], MutAnyOrigin],
    w_ptr: Pointer[Scalar[BF16], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[BF16], MutAnyOrigin],
    top_k: Int32, E: Int32, K: Int32, N: Int32, fast_a: Int32, fast_b: Int32,
):
    """Grouped GEMM on tensor cores.

    gated:  out[p, n]      = swiglu(a[tok(p)] . Wg[:, n], a[tok(p)] . Wu[:, n])   (out = h [S, N])
    not gated: out[slot(p), n] = rw[slot(p)] * (a[p] . W[:, n])                        (out = ws [S, N])
    a is x [T, K] (gated, rows gathered through perm) or h [S, K]; W is expert e's
    [K, Ntot] (hub) or [Ntot, K] matrix, Ntot = 2N (gated) or N."""
    var tile = _find_tile(offsets, Int(E), Int(block_idx.y))
    var e = tile[0]
    if e < 0:
        return
    var row0 = tile[1]
    var row1 = tile[2]
    var Ki = Int(K)
    var Ni = Int(N)
    var topk = Int(top_k)
    var n_tot = 2 * Ni if gated else Ni
    var n0 = Int(block_idx.x) * (BCOLS // 2 if gated else BCOLS)
    var w_e = w_ptr.unsafe_offset(e * n_tot * Ki)
    var fa = fast_a != 0
    var fb = fast_b != 0

    var As = stack_allocation[BM * TC_ASTR, BF16, alignment=16, address_space=AddressSpace.SHARED]()
    comptime BS_SIZE = BCOLS * TC_BSTR_N if not hub else TC_BK * TC_BSTR_K
    var Bs = stack_allocation[BS_SIZE, BF16, alignment=16, address_space=AddressSpace.SHARED]()

    var tid = Int(thread_idx.x)
    var lane = tid % 32
    var warp = tid // 32
    var wm = warp // 2
    var wn = warp % 2
    var g = lane // 4
    var tig = lane % 4

    # ---- global -> register loaders
    # A: thread loads row (tid // 2), k [kh, kh + 16)
    var a_r = tid // 2
    var a_kh = (tid % 2) * 16
    var a_p = row0 + a_r
    var a_valid_row = a_p < row1
    var a_src = a_ptr
    if a_valid_row:
        comptime if gated:
            a_src = a_ptr.unsafe_offset((Int(perm[unsafe_offset=a_p]) // topk) * Ki)
        else:
            a_src = a_ptr.unsafe_offset(a_p * Ki)
    var ra = Array[SIMD[BF16, 8], 2](fill=0)
    var rb = Array[SIMD[BF16, 8], 4](fill=0)

    @always_inline
    def load_tiles(k0: Int) {mut ra, mut rb, var a_src, var a_valid_row, var a_kh, var fa, var fb, var Ki, var Ni, var n0, var w_e, var tid, var n_tot}:
        comptime for q in range(2):
            var kk = k0 + a_kh + q * 8
            ra[q] = _load8[BF16](a_src.unsafe_offset(kk), Ki - kk if a_valid_row else 0, fa)
        comptime if hub:
            # B rows k (contiguous columns): 16 threads x 8 columns per k row, 4 passes
            var kr = tid // 16
            var cc = (tid % 16) * 8
            var bc = _b_col(cc, n0, Ni, gated)
            comptime for q in range(4):
                var k = k0 + kr + 8 * q
                var valid = bc[1] if k < Ki else 0
                rb[q] = _load8[BF16](w_e.unsafe_offset(k * n_tot + bc[0]), valid, fb)
        else:
            # B column c = tid is weight row bc[0] (contiguous k)
            var bc = _b_col(tid, n0, Ni, gated)
            comptime for q in range(4):
                var kk = k0 + q * 8
                var valid = Ki - kk if bc[1] > 0 else 0
                rb[q] = _load8[BF16](w_e.unsafe_offset(bc[0] * Ki + kk), valid, fb)

    @always_inline
    def store_tiles() {imm ra, imm rb, var As, var Bs, var a_r, var a_kh, var tid}:
        comptime for q in range(2):
            As.unsafe_store[alignment=16](a_r * TC_ASTR + a_kh + q * 8, ra[q])
        comptime if hub:
            var kr = tid // 16
            var cc = (tid % 16) * 8
            comptime for q in range(4):
                Bs.unsafe_store[alignment=16]((kr + 8 * q) * TC_BSTR_K + cc, rb[q])
        else:
            comptime for q in range(4):
                Bs.unsafe_store[alignment=16](tid * TC_BSTR_N + q * 8, rb[q])

    # accumulators: [mi in 0..2][nt in 0..8] of the mma C fragment (4 f32)
    var acc = Array[SIMD[F32, 4], 16](fill=0)

    @always_inline
    def b_tile_col(nt: Int) {var wn} -> Int:
        comptime if gated:
            return (nt // 4) * (BCOLS // 2) + wn * 32 + (nt % 4) * 8
        else:
            return wn * 64 + nt * 8

    var n_k = ceildiv(Ki, TC_BK)
    load_tiles(0)
    store_tiles()
    barrier()
    for kt in range(n_k):
        if kt + 1 < n_k:
            load_tiles((kt + 1) * TC_BK)
        comptime for ks in range(0, TC_BK, 16):
            var af = Array[SIMD[BF16, 8], 2](fill=0)
            var bfr = Array[SIMD[BF16, 4], 8](fill=0)
            comptime if ldsm:
                # x4: lane l addresses row (l % 8) of 8x8 matrix l // 8
                var lm = lane // 8
                var li = lane % 8
                comptime for mi in range(2):
                    # matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
                    var r = wm * 32 + mi * 16 + (lm % 2) * 8 + li
                    af[mi] = ld_matrix[8](As.unsafe_offset(r * TC_ASTR + ks + (lm // 2) * 8))
                comptime for np in range(4):
                    # matrices: (n-tile 2np, k 0-7), (2np, k 8-15), (2np+1, k 0-7), (2np+1, k 8-15)
                    var n = b_tile_col(2 * np) + (lm // 2) * 8
                    var v: SIMD[BF16, 8]
                    comptime if hub:   # Bs[k][n]: transpose while loading
                        v = ld_matrix[8, transpose=True](
                            Bs.unsafe_offset((ks + (lm % 2) * 8 + li) * TC_BSTR_K + n)
                        )
                    else:              # Bs[n][k]
                        v = ld_matrix[8](Bs.unsafe_offset((n + li) * TC_BSTR_N + ks + (lm % 2) * 8))
                    bfr[2 * np] = v.slice[4, offset=0]()
                    bfr[2 * np + 1] = v.slice[4, offset=4]()
            else:
                comptime for mi in range(2):
                    var r = wm * 32 + mi * 16 + g
                    var k = ks + tig * 2
                    var v0 = As.unsafe_load[width=2, alignment=4](r * TC_ASTR + k)
                    var v1 = As.unsafe_load[width=2, alignment=4]((r + 8) * TC_ASTR + k)
                    var v2 = As.unsafe_load[width=2, alignment=4](r * TC_ASTR + k + 8)
                    var v3 = As.unsafe_load[width=2, alignment=4]((r + 8) * TC_ASTR + k + 8)
                    af[mi] = v0.join(v1).join(v2.join(v3))
                comptime for nt in range(8):
                    var c = b_tile_col(nt) + g
                    var k = ks + tig * 2
                    comptime if hub:
                        bfr[nt][0] = Bs[unsafe_offset=k * TC_BSTR_K + c]
                        bfr[nt][1] = Bs[unsafe_offset=(k + 1) * TC_BSTR_K + c]
                        bfr[nt][2] = Bs[unsafe_offset=(k + 8) * TC_BSTR_K + c]
                        bfr[nt][3] = Bs[unsafe_offset=(k + 9) * TC_BSTR_K + c]
                    else:
                        var u0 = Bs.unsafe_load[width=2, alignment=4](c * TC_BSTR_N + k)
                        var u1 = Bs.unsafe_load[width=2, alignment=4](c * TC_BSTR_N + k + 8)
                        bfr[nt] = u0.join(u1)
            comptime for nt in range(8):
                comptime for mi in range(2):
                    var d = acc[mi * 8 + nt]
                    mma(d, af[mi], bfr[nt], acc[mi * 8 + nt])
                    acc[mi * 8 + nt] = d
        barrier()
        if kt + 1 < n_k:
            store_tiles()
            barrier()

    # ---- epilogue: C fragment element (half*2 + q) is row g + 8*half, column tig*2 + q
    comptime for mi in range(2):
        comptime for half in range(2):
            var p = row0 + wm * 32 + mi * 16 + g + 8 * half
            if p < row1:
                comptime if gated:
                    comptime for nj in range(4):
                        var col = n0 + wn * 32 + nj * 8 + tig * 2
                        comptime for q in range(2):
                            if col + q < Ni:
                                var hv = swiglu[BF16](
                                    acc[mi * 8 + nj][half * 2 + q], acc[mi * 8 + 4 + nj][half * 2 + q]
                                )
                                out_ptr[unsafe_offset=p * Ni + col + q] = hv.cast[BF16]()
                else:
                    var slot = Int(perm[unsafe_offset=p])
                    var wt = rw[unsafe_offset=slot].cast[F32]()
                    comptime for nt in range(8):
                        var col = n0 + wn * 64 + nt * 8 + tig * 2
                        comptime for q in range(2):
                            if col + q < Ni:
                                var o = round_to[BF16](acc[mi * 8 + nt][half * 2 + q]) * wt
                                out_ptr[unsafe_offset=slot * Ni + col + q] = o.cast[BF16]()


# ============================================================================ FMA (float32)
def moe_gemm_fma_kernel[
    dtype: DType, hub: Bool, gated: Bool
](
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    w_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    top_k: Int32, E: Int32, K: Int32, N: Int32, fast_a: Int32, fast_b: Int32,
):
    """Same contract as moe_gemm_tc_kernel, computed with FMAs (float32 accumulation).
    Thread (tr, tc) = (tid // 16, tid % 16) owns rows tr + 8i (i < 8) and B-tile
    columns 16j + tc (j < 8; for gate_up j < 4 are gate columns, j + 4 the matching up)."""
    var tile = _find_tile(offsets, Int(E), Int(block_idx.y))
    var e = tile[0]
    if e < 0:
        return
    var row0 = tile[1]
    var row1 = tile[2]
    var Ki = Int(K)
    var Ni = Int(N)
    var topk = Int(top_k)
    var n_tot = 2 * Ni if gated else Ni
    var n0 = Int(block_idx.x) * (BCOLS // 2 if gated else BCOLS)
    var w_e = w_ptr.unsafe_offset(e * n_tot * Ki)

    var As = stack_allocation[FMA_BK * FMA_ASTR, F32, address_space=AddressSpace.SHARED]()
    var Bs = stack_allocation[FMA_BK * FMA_BSTR, F32, address_space=AddressSpace.SHARED]()
    var tid = Int(thread_idx.x)
    var tr = tid // 16
    var tc = tid % 16

    # per-thread source rows for the A loads: lane q = tid % 16 reads k0 + q of rows r = tid//16 + 8*i
    var a_rows = Array[Int, 8](fill=-1)
    comptime for i in range(8):
        var p = row0 + tr + 8 * i
        if p < row1:
            comptime if gated:
                a_rows[i] = (Int(perm[unsafe_offset=p]) // topk) * Ki
            else:
                a_rows[i] = p * Ki

    var acc = Array[Float32, 64](fill=0)
    for k0 in range(0, Ki, FMA_BK):
        # A tile, k-major: As[q][r]
        var ka = k0 + tc
        comptime for i in range(8):
            var v = Float32(0)
            if a_rows[i] >= 0 and ka < Ki:
                v = a_ptr[unsafe_offset=a_rows[i] + ka].cast[F32]()
            As[unsafe_offset=tc * FMA_ASTR + tr + 8 * i] = v
        # B tile, k-major: Bs[q][c]
        comptime if hub:
            var bc = _b_col(tid, n0, Ni, gated)
            for q in range(FMA_BK):
                var v = Float32(0)
                if k0 + q < Ki and bc[1] > 0:
                    v = w_e[unsafe_offset=(k0 + q) * n_tot + bc[0]].cast[F32]()
                Bs[unsafe_offset=q * FMA_BSTR + tid] = v
        else:
            for i in range(BCOLS // 8):
                var c = tr + 8 * i
                var bc = _b_col(c, n0, Ni, gated)
                var v = Float32(0)
                if ka < Ki and bc[1] > 0:
                    v = w_e[unsafe_offset=bc[0] * Ki + ka].cast[F32]()
                Bs[unsafe_offset=tc * FMA_BSTR + c] = v
        barrier()
        for q in range(FMA_BK):
            var av = Array[Float32, 8](fill=0)
            var bv = Array[Float32, 8](fill=0)
            comptime for i in range(8):
                av[i] = As[unsafe_offset=q * FMA_ASTR + tr + 8 * i]
                bv[i] = Bs[unsafe_offset=q * FMA_BSTR + 16 * i + tc]
            comptime for i in range(8):
                comptime for j in range(8):
                    acc[i * 8 + j] += av[i] * bv[j]
        barrier()

    comptime for i in range(8):
        var p = row0 + tr + 8 * i
        if p < row1:
            comptime if gated:
                comptime for j in range(4):
                    var col = n0 + 16 * j + tc
                    if col < Ni:
                        var hv = swiglu[dtype](acc[i * 8 + j], acc[i * 8 + 4 + j])
                        out_ptr[unsafe_offset=p * Ni + col] = hv.cast[dtype]()
            else:
                var slot = Int(perm[unsafe_offset=p])
                var wt = rw[unsafe_offset=slot].cast[F32]()
                comptime for j in range(8):
                    var col = n0 + 16 * j + tc
                    if col < Ni:
                        out_ptr[unsafe_offset=slot * Ni + col] = (round_to[dtype](acc[i * 8 + j]) * wt).cast[dtype]()


# ============================================================================ combine
comptime COMBINE_THREADS = 256


def moe_combine_kernel[
    dtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    T: Int32, top_k: Int32, H: Int32,
):
    """Combine: y[t, n] = sum_k ws[t, k, n] (top-k order, float32), one thread per (t, n)."""
    var i = Int(block_idx.x) * COMBINE_THREADS + Int(thread_idx.x)
    var Hi = Int(H)
    if i >= Int(T) * Hi:
        return
    var t = i // Hi
    var n = i % Hi
    var acc = Float32(0)
    for k in range(Int(top_k)):
        acc += ws[unsafe_offset=(t * Int(top_k) + k) * Hi + n].cast[F32]()
    y[unsafe_offset=i] = acc.cast[dtype]()


# ============================================================================ launches
def _enqueue_gemm[
    dtype: DType, hub: Bool, gated: Bool, ldsm: Bool
](
    ctx: DeviceContext,
    out_ptr: Pointer[Scalar[dtype], MutAnyOrigin],
    a: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    S: Int, top_k: Int, E: Int, K: Int, N: Int,
) raises:
    """Launch the grouped GEMM (see moe_gemm_tc_kernel): tensor cores in bf16, FMAs otherwise."""
    var fast_a = Int32(1 if K % 8 == 0 else 0)
    var fast_b = Int32(1 if (N % 8 == 0 if hub else K % 8 == 0) else 0)
    var grid = (gemm_grid_x(N, gated), gemm_grid_y(S, E))
    comptime if dtype == BF16:
        ctx.enqueue_function[moe_gemm_tc_kernel[hub, gated, ldsm]](
            out_ptr, a, w, perm, offsets, rw,
            Int32(top_k), Int32(E), Int32(K), Int32(N), fast_a, fast_b,
            grid_dim=grid, block_dim=GEMM_THREADS,
        )
    else:
        ctx.enqueue_function[moe_gemm_fma_kernel[dtype, hub, gated]](
            out_ptr, a, w, perm, offsets, rw,
            Int32(top_k), Int32(E), Int32(K), Int32(N), fast_a, fast_b,
            grid_dim=grid, block_dim=GEMM_THREADS,
        )


def enqueue_gate_up_gpu[
    dtype: DType, hub: Bool, ldsm: Bool = TC_LDMATRIX
](
    ctx: DeviceContext,
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    T: Int, top_k: Int, E: Int, H: Int, I: Int,
) raises:
    """Launch: h [S, I] = swiglu of the grouped gate_up GEMM (see moe_gemm_tc_kernel)."""
    var S = T * top_k
    if S == 0 or I == 0:
        return
    _enqueue_gemm[dtype, hub, True, ldsm](ctx, h, x, w, perm, offsets, x, S, top_k, E, H, I)


def enqueue_down_gpu[
    dtype: DType, hub: Bool, ldsm: Bool = TC_LDMATRIX
](
    ctx: DeviceContext,
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    ws: Pointer[Scalar[dtype], MutAnyOrigin],
    h: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[dtype], MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    rw: Pointer[Scalar[dtype], MutAnyOrigin],
    T: Int, top_k: Int, E: Int, H: Int, I: Int,
) raises:
    """Launch: ws [S, H] = rw * grouped down GEMM (un-permuted), then y [T, H] = sum over k."""
    var S = T * top_k
    if T == 0 or H == 0:
        return
    if S > 0:
        _enqueue_gemm[dtype, hub, False, ldsm](ctx, ws, h, w, perm, offsets, rw, S, top_k, E, I, H)
    ctx.enqueue_function[moe_combine_kernel[dtype]](
        y, ws, Int32(T), Int32(top_k), Int32(H),
        grid_dim=ceildiv(T * H, COMBINE_THREADS), block_dim=COMBINE_THREADS,
    )
