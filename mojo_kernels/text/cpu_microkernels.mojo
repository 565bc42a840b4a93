# Register-blocked SIMD micro-kernels of the CPU GEMMs (MoE experts and dense linear).
# Each computes one register tile and returns it; the drivers (cpu_moe.mojo,
# cpu_linear.mojo) choose the tiles, schedule them and apply the epilogues.
#
# Two kinds, chosen by the weight layout:
# * "outer" (hub layout, W is [K, N], out = a @ W): MR rows x (NB groups of NV SIMD
#   vectors of columns) of the output live in registers; the K loop loads NB*NV weight
#   vectors and broadcasts one activation per row.
# * "dot" (transformers layout, W is [N, K], out = W @ a): MR rows x NC weight rows;
#   each accumulator is a SIMD vector along K, reduced at the end.
# Both accumulate in float32, whatever the storage dtypes: activations `dtype` and weights
# `wdtype` (float32 or bfloat16 each; bfloat16 weights with float32 activations halve
# the bytes a decode step reads and compute exactly what upcast weights would).
from std.math import ceildiv
from std.sys import simd_width_of, size_of
from std.sys.intrinsics import PrefetchOptions, prefetch
from std.sys import llvm_intrinsic
from std.sys.info import CompilationTarget
from std.memory import bitcast

comptime F32 = DType.float32
comptime BF16 = DType.bfloat16
comptime VEC = simd_width_of[DType.float32]()     # 16 with AVX-512, 8 with AVX2
# bf16 x bf16 -> f32 pair dot products (vdpbf16ps, AVX512-BF16: Zen 4, Sapphire Rapids):
# twice the FMA rate, float32 accumulation. Decided for the machine compiling the graph.
comptime USE_DPBF16 = VEC == 16 and CompilationTarget._has_feature["avx512bf16"]()
comptime PF_DIST = 16             # outer kernels: prefetch weight rows this many k ahead


@always_inline
def outer_tile[
    dtype: DType, wdtype: DType, MR: Int, NB: Int, NV: Int, VW: Int, PF: Bool = False
](
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    b: Array[Pointer[Scalar[wdtype], MutAnyOrigin], NB],
    ldb: Int,
    K: Int,
) -> Array[SIMD[F32, VW], MR * NB * NV]:
    """Outer-product tile: acc[r, g, v] = sum_k a[r][k] * b[g][k*ldb + v*VW ..< +VW]  (float32).

    PF: software-prefetch the weight rows PF_DIST steps ahead. The weight rows of a
    hub-layout panel are 2I or H elements apart, so every k touches new pages and the
    hardware prefetchers do not help; the first row tile of a panel streams it from DRAM.
    """
    comptime NBV = NB * NV
    comptime LINE = 64 // size_of[wdtype]()
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
    dtype: DType, wdtype: DType, MR: Int, NC: Int
](
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    b: Array[Pointer[Scalar[wdtype], MutAnyOrigin], NC],
    K: Int,
    pf: Pointer[Scalar[wdtype], MutAnyOrigin],
    pf_lines: Int,
) -> Array[Float32, MR * NC]:
    """Dot-product tile: out[r, c] = sum_k a[r][k] * b[c][k]  (float32 accumulation).

    pf_lines > 0: each VEC step of the float32 loop also prefetches that many cache
    lines, to L2, of the contiguous bytes from pf on (the caller's next tile)."""
    comptime LINE = 64 // size_of[wdtype]()
    var acc = Array[SIMD[F32, VEC], MR * NC](fill=0)
    var k = 0
    var pf_at = 0
    comptime if dtype == BF16 and wdtype == BF16 and USE_DPBF16:
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
        for _ in range(pf_lines):
            prefetch[PrefetchOptions().for_read().medium_locality()](pf.unsafe_offset(pf_at))
            pf_at += LINE
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


@always_inline
def outer_tile_pairs[
    dtype: DType, MR: Int, NB: Int, NV: Int, VW: Int
](
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    b: Array[Pointer[UInt32, MutAnyOrigin], NB],
    ldb: Int,
    K: Int,
) -> Array[SIMD[F32, VW], MR * NB * NV]:
    """Like outer_tile, over bf16 weights stored as k-pairs (the packed panels of the MoE ops):
    b[g][kp*ldb + c] holds W[2kp, c] in its low and W[2kp+1, c] in its high 16 bits (0
    past K). Each half widens to float32 exactly (a shift or a mask) and the FMAs run k
    by k as in outer_tile, so the results are outer_tile's bit for bit."""
    comptime NBV = NB * NV
    var acc = Array[SIMD[F32, VW], MR * NBV](fill=0)
    for kp in range(ceildiv(K, 2)):
        comptime for h in range(2):
            var k = 2 * kp + h
            if k < K:
                var bv = Array[SIMD[F32, VW], NBV](fill=0)
                comptime for g in range(NB):
                    comptime for v in range(NV):
                        var u = b[g].unsafe_load[width=VW](kp * ldb + v * VW)
                        # even k: the low half shifted up; odd k: the high half
                        comptime if h == 0:
                            bv[g * NV + v] = bitcast[F32, VW](u << 16)
                        else:
                            bv[g * NV + v] = bitcast[F32, VW](u & 0xFFFF0000)
                comptime for r in range(MR):
                    var av = SIMD[F32, VW](a[r].unsafe_load[width=1](k).cast[F32]())
                    comptime for i in range(NBV):
                        acc[r * NBV + i] = av.fma(bv[i], acc[r * NBV + i])
    return acc^
