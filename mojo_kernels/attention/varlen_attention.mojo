"""Varlen attention: softmax attention inside segments, optionally causal, GQA.

Formula (query head h, its key/value head g = h // (heads / kv_heads), one
segment [s0, s1) given by cu_seqlens):

    out[i, h, :] = sum_{j in keys(i)} softmax_j(scale * q[i, h, :] . k[j, g, :]) * v[j, g, :]
    keys(i) = [s0, s1)        bidirectional (the vision encoder)
    keys(i) = [s0, i]         causal (the text decoder's prefill of fresh prompts)

Shapes and dtypes:
    q, out      [N, heads, head_dim]      float32 or bfloat16, contiguous
    k, v        [N, kv_heads, head_dim]   same dtype; kv_heads divides heads
    cu_seqlens  [S + 1]                   int32, cu_seqlens[0] == 0, non-decreasing,
                                          cu_seqlens[S] == N (transformers'
                                          get_vision_cu_seqlens; for text the
                                          ragged batch's row offsets)
    scale       compile-time Float64 parameter (head_dim ** -0.5)
    causal      compile-time Bool parameter

No attention across segments; no dense mask is built. head_dim <= 128.
Online (flash) softmax with float32 accumulation; bf16 inputs are widened to
float32 and the result is rounded to bf16 once.

CPU path ("transposed" flash attention, everything vertical):
    per work item (head, query block of BQ = QV * simd_width queries; QV = 4, causal 2):
      Qt[d, i]  = q[i, h, d] * scale * log2(e)         (packed per item, f32)
      per key block of BK keys (causal: only blocks up to the block's last query):
        St[j, i] = sum_d k[j, g, d] * Qt[d, i]          register tile RK keys x QV vectors
        causal, diagonal blocks only: St[j, i] = -inf where key j > query i
        online softmax over j per query lane (base-2 exponent, vertical max/sum)
        Ot[d, i] = Ot[d, i] * alpha[i] + sum_j v[j, g, d] * Pt[j, i]   tile RD dims x QV vectors
      out[i, h, d] = Ot[d, i] / l[i]
    parallelised over (head, query block) with `parallelize`.

GPU path: one thread per query row, BQ_GPU queries per block; key/value tiles of
BK_GPU keys are staged in shared memory as float32 and every thread runs an
online softmax over them with its query row and accumulator in registers.
"""

from std.math import ceildiv
from std.memory import stack_allocation, bitcast
from std.memory.alloc import unsafe_alloc
from std.collections import Array
from std.sys import simd_width_of
from std.math import exp2, iota
from max.algorithm import parallelize
from max.gpu import thread_idx, block_idx, barrier
from max.gpu.memory import AddressSpace
from max.gpu.host import DeviceContext
import extensibility
from extensibility import InputTensor, OutputTensor


comptime F32 = DType.float32
comptime FPtr = Pointer[Float32, MutAnyOrigin]
comptime LOG2E = 1.4426950408889634

# ----------------------------------------------------------------------------- CPU
comptime VW = simd_width_of[F32]()   # 16 with AVX-512, 8 with AVX2
comptime QV_FULL = 4                 # query vectors per block, bidirectional (BQ = 64 with AVX-512)
comptime QV_CAUSAL = 3               # causal: narrower blocks (48 queries) waste less of the diagonal key block
comptime ACC = 24                    # register-tile accumulators: RK = RD = ACC / QV keys / dims
comptime BK = 96                     # keys per key block
comptime MAX_HEAD_DIM = 128


@always_inline
def exp2_fast[w: Int](x: SIMD[F32, w]) -> SIMD[F32, w]:
    """2**x for x <= 0 (Cephes exp2f polynomial, rel. error ~2e-7; x <= -127 -> 0)."""
    var xc = max(x, SIMD[F32, w](-127.0))
    var n = round(xc)
    var f = xc - n
    var p = SIMD[F32, w](1.535336188319500e-4)
    p = p.fma(f, SIMD[F32, w](1.339887440266574e-3))
    p = p.fma(f, SIMD[F32, w](9.618437357674640e-3))
    p = p.fma(f, SIMD[F32, w](5.550332471162809e-2))
    p = p.fma(f, SIMD[F32, w](2.402264791363012e-1))
    p = p.fma(f, SIMD[F32, w](6.931472028550421e-1))
    p = p.fma(f, SIMD[F32, w](1.0))
    var bits = (n.cast[DType.int32]() + 127) << 23
    return p * bitcast[F32, w](bits)


@always_inline
def _qk_tile[QV: Int, R: Int](qt: FPtr, k: FPtr, ldk: Int, D: Int, st: FPtr):
    """St[r, :] = sum_d k[r * ldk + d] * Qt[d, :] for r < R (BQ query lanes)."""
    comptime BQ = QV * VW
    var acc = Array[SIMD[F32, VW], R * QV](fill=SIMD[F32, VW](0))
    for d in range(D):
        var qv = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](0))
        comptime for c in range(QV):
            qv[c] = qt.unsafe_load[width=VW](d * BQ + c * VW)
        comptime for r in range(R):
            var b = SIMD[F32, VW](k[unsafe_offset=r * ldk + d])
            comptime for c in range(QV):
                acc[r * QV + c] = qv[c].fma(b, acc[r * QV + c])
    comptime for r in range(R):
        comptime for c in range(QV):
            st.unsafe_store(r * BQ + c * VW, acc[r * QV + c])


@always_inline
def _pv_tile[QV: Int, R: Int](pt: FPtr, v: FPtr, ldv: Int, bk: Int, ot: FPtr, alpha: FPtr):
    """Ot[r, :] = Ot[r, :] * alpha + sum_j v[j * ldv + r] * Pt[j, :] for r < R."""
    comptime BQ = QV * VW
    var acc = Array[SIMD[F32, VW], R * QV](fill=SIMD[F32, VW](0))
    comptime for c in range(QV):
        var a = alpha.unsafe_load[width=VW](c * VW)
        comptime for r in range(R):
            acc[r * QV + c] = ot.unsafe_load[width=VW](r * BQ + c * VW) * a
    for j in range(bk):
        var pv = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](0))
        comptime for c in range(QV):
            pv[c] = pt.unsafe_load[width=VW](j * BQ + c * VW)
        comptime for r in range(R):
            var b = SIMD[F32, VW](v[unsafe_offset=j * ldv + r])
            comptime for c in range(QV):
                acc[r * QV + c] = pv[c].fma(b, acc[r * QV + c])
    comptime for r in range(R):
        comptime for c in range(QV):
            ot.unsafe_store(r * BQ + c * VW, acc[r * QV + c])


@always_inline
def _mask_future_keys[QV: Int](st: FPtr, bk: Int, first_masked: Int):
    """St[j, i] = -inf where j > i + first_masked - 1, i.e. key kb + j after query q0 + i."""
    comptime BQ = QV * VW
    var lane = iota[F32, VW]()
    comptime for c in range(QV):
        var qi = lane + Float32(c * VW + first_masked)
        for j in range(bk):
            var x = st.unsafe_load[width=VW](j * BQ + c * VW)
            st.unsafe_store(j * BQ + c * VW, (SIMD[F32, VW](Float32(j)).ge(qi)).select(SIMD[F32, VW](Float32.MIN), x))


@always_inline
def _attend_block_cpu[dtype: DType, causal: Bool, QV: Int](
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    kp: FPtr,
    vp: FPtr,
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    ld: Int,
    ldkv: Int,
    D: Int,
    q0: Int,
    bq: Int,
    k0: Int,
    k1: Int,
    qscale: Float32,
):
    """One (head, query block): q/out point at head h (row stride ld), kp/vp at its kv head (ldkv).

    Keys [k0, k1); when causal, key blocks that reach past query q0 get the
    future keys of each query lane masked. Blocks of QV vectors of queries.
    """
    comptime BQ = QV * VW
    comptime RK = ACC // QV
    comptime RD = ACC // QV
    var qt = rebind[FPtr](stack_allocation[MAX_HEAD_DIM * BQ, F32, alignment=64]())
    var ot = rebind[FPtr](stack_allocation[MAX_HEAD_DIM * BQ, F32, alignment=64]())
    var st = rebind[FPtr](stack_allocation[BK * BQ, F32, alignment=64]())
    var ab = rebind[FPtr](stack_allocation[BQ, F32, alignment=64]())

    # pack Qt[d, i] (scaled, zero lanes past bq) and zero Ot
    for i in range(BQ):
        if i < bq:
            var row = q.unsafe_offset((q0 + i) * ld)
            for d in range(D):
                qt[unsafe_offset=d * BQ + i] = row[unsafe_offset=d].cast[F32]() * qscale
        else:
            for d in range(D):
                qt[unsafe_offset=d * BQ + i] = 0
    for x in range(0, D * BQ, VW):
        ot.unsafe_store(x, SIMD[F32, VW](0))

    var m = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](Float32.MIN))
    var l = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](0))

    for kb in range(k0, k1, BK):
        var bk = min(BK, k1 - kb)
        var kbase = kp.unsafe_offset(kb * ldkv)
        var vbase = vp.unsafe_offset(kb * ldkv)
        # St = K_blk . Qt
        var nfull = bk // RK
        for t in range(nfull):
            _qk_tile[QV, RK](qt, kbase.unsafe_offset(t * RK * ldkv), ldkv, D, st.unsafe_offset(t * RK * BQ))
        var rem = bk - nfull * RK
        comptime for r in range(1, RK):
            if rem == r:
                _qk_tile[QV, r](qt, kbase.unsafe_offset(nfull * RK * ldkv), ldkv, D, st.unsafe_offset(nfull * RK * BQ))
        comptime if causal:
            if kb + bk - 1 > q0:
                # key kb + j is in the future of query q0 + i when j > i + (q0 - kb)
                _mask_future_keys[QV](st, bk, q0 - kb + 1)
        # online softmax (vertical: one lane per query)
        var mloc = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](Float32.MIN))
        for j in range(bk):
            comptime for c in range(QV):
                mloc[c] = max(mloc[c], st.unsafe_load[width=VW](j * BQ + c * VW))
        var mnew = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](0))
        comptime for c in range(QV):
            mnew[c] = max(m[c], mloc[c])
            ab.unsafe_store(c * VW, exp2_fast(m[c] - mnew[c]))
            m[c] = mnew[c]
        var lsum = Array[SIMD[F32, VW], QV](fill=SIMD[F32, VW](0))
        for j in range(bk):
            comptime for c in range(QV):
                var p = exp2_fast(st.unsafe_load[width=VW](j * BQ + c * VW) - mnew[c])
                st.unsafe_store(j * BQ + c * VW, p)
                lsum[c] += p
        comptime for c in range(QV):
            l[c] = l[c] * ab.unsafe_load[width=VW](c * VW) + lsum[c]
        # Ot = Ot * alpha + V_blk^T . Pt
        var dfull = D // RD
        for t in range(dfull):
            _pv_tile[QV, RD](st, vbase.unsafe_offset(t * RD), ldkv, bk, ot.unsafe_offset(t * RD * BQ), ab)
        var drem = D - dfull * RD
        comptime for r in range(1, RD):
            if drem == r:
                _pv_tile[QV, r](st, vbase.unsafe_offset(dfull * RD), ldkv, bk, ot.unsafe_offset(dfull * RD * BQ), ab)

    # normalise and write back (transpose)
    comptime for c in range(QV):
        ab.unsafe_store(c * VW, SIMD[F32, VW](1) / l[c])
    for d in range(D):
        comptime for c in range(QV):
            ot.unsafe_store(d * BQ + c * VW, ot.unsafe_load[width=VW](d * BQ + c * VW) * ab.unsafe_load[width=VW](c * VW))
    for i in range(bq):
        var row = o.unsafe_offset((q0 + i) * ld)
        for d in range(D):
            row[unsafe_offset=d] = ot[unsafe_offset=d * BQ + i].cast[dtype]()


def varlen_attention_cpu[dtype: DType, causal: Bool = False](
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    cu: Pointer[Int32, MutAnyOrigin],
    N: Int,
    H: Int,
    D: Int,
    S: Int,
    scale: Float64,
    HKV: Int = -1,
) raises:
    """Host entry point of the CPU path (all pointers in host memory)."""
    if D < 1 or D > MAX_HEAD_DIM:
        raise Error("qwen3vl_varlen_attention: head_dim must be in [1, 128]")
    if Int(cu[unsafe_offset=0]) != 0 or Int(cu[unsafe_offset=S]) != N:
        raise Error("qwen3vl_varlen_attention: cu_seqlens must start at 0 and end at N")
    comptime QV = QV_CAUSAL if causal else QV_FULL
    comptime BQ = QV * VW
    # query blocks: (segment start, segment end, q0)
    var blk = List[Int]()
    for s in range(S):
        var s0 = Int(cu[unsafe_offset=s])
        var s1 = Int(cu[unsafe_offset=s + 1])
        if s1 < s0:
            raise Error("qwen3vl_varlen_attention: cu_seqlens must be non-decreasing")
        for q0 in range(s0, s1, BQ):
            blk.append(s0)
            blk.append(s1)
            blk.append(q0)
    var nqb = len(blk) // 3
    if nqb == 0:
        return
    var kvh = H if HKV < 0 else HKV
    if kvh < 1 or H % kvh != 0:
        raise Error("qwen3vl_varlen_attention: kv heads must divide the query heads")
    var group = H // kvh
    var bp = blk.unsafe_ptr()
    var ld = H * D
    var ldkv = kvh * D
    var qscale = Float32(scale * LOG2E)

    # K and V in float32 (a widened copy for bf16; the inputs themselves for f32)
    var kf: FPtr
    var vf: FPtr
    var owned = False
    comptime if dtype == F32:
        kf = rebind[FPtr](k)
        vf = rebind[FPtr](v)
    else:
        owned = True
        kf = rebind[FPtr](unsafe_alloc[Float32](N * ldkv, alignment=64))
        vf = rebind[FPtr](unsafe_alloc[Float32](N * ldkv, alignment=64))
        var rows_per = 64
        def widen(t: Int) {var k, var v, var kf, var vf, var N, var ldkv, var rows_per}:
            var r0 = t * rows_per
            var r1 = min(N, r0 + rows_per)
            for x in range(r0 * ldkv, r1 * ldkv):
                kf[unsafe_offset=x] = k[unsafe_offset=x].cast[F32]()
                vf[unsafe_offset=x] = v[unsafe_offset=x].cast[F32]()
        parallelize(widen, ceildiv(N, rows_per))

    def work(item: Int) {var q, var kf, var vf, var o, var bp, var nqb, var ld, var ldkv, var group, var D, var qscale}:
        var h = item // nqb
        var b = item - h * nqb
        var s0 = bp[unsafe_offset=3 * b]
        var s1 = bp[unsafe_offset=3 * b + 1]
        var q0 = bp[unsafe_offset=3 * b + 2]
        var bq = min(BQ, s1 - q0)
        var k1 = q0 + bq if causal else s1
        var g = h // group
        _attend_block_cpu[dtype, causal, QV](
            q.unsafe_offset(h * D), kf.unsafe_offset(g * D), vf.unsafe_offset(g * D), o.unsafe_offset(h * D),
            ld, ldkv, D, q0, bq, s0, k1, qscale,
        )

    parallelize(work, nqb * H)
    _ = blk^
    if owned:
        kf.unsafe_free()
        vf.unsafe_free()


# ----------------------------------------------------------------------------- GPU
comptime BQG = 128   # queries (= threads) per block
comptime BKG = 32    # keys per shared-memory tile


def varlen_attention_gpu_kernel[dtype: DType, HD: Int, causal: Bool](
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    cu: Pointer[Int32, MutAnyOrigin],
    S_arg: Int32,
    H_arg: Int32,
    HKV_arg: Int32,
    D_arg: Int32,
    qscale: Float32,
):
    """Grid (query blocks upper bound, heads); block = BQG threads, one query each.

    Block x is the x-th query block when every segment is cut into blocks of
    BQG rows (blocks past the last one return). K/V tiles of BKG keys (kv head
    h // (H / HKV)) are widened to float32 in shared memory (HD >= head_dim
    columns, zero padded); scores use base-2 exponents (q pre-scaled by
    scale * log2(e)). Causal: key tiles stop at the block's last query and
    each thread masks the keys after its own row.
    """
    comptime HV = HD // 4
    var S = Int(S_arg)
    var H = Int(H_arg)
    var HKV = Int(HKV_arg)
    var D = Int(D_arg)
    var h = Int(block_idx.y)
    var g = h // (H // HKV)
    var b = Int(block_idx.x)
    var tid = Int(thread_idx.x)
    # locate this block's segment (uniform across the block)
    var seg0 = 0
    var seg1 = 0
    var q0 = -1
    var nb_before = 0
    for s in range(S):
        var s0 = Int(cu[unsafe_offset=s])
        var s1 = Int(cu[unsafe_offset=s + 1])
        var nb = ceildiv(s1 - s0, BQG)
        if b < nb_before + nb:
            seg0 = s0
            seg1 = s1
            q0 = s0 + (b - nb_before) * BQG
            break
        nb_before += nb
    if q0 < 0:
        return

    var ks = stack_allocation[BKG * HD, F32, alignment=16, address_space=AddressSpace.SHARED]()
    var vs = stack_allocation[BKG * HD, F32, alignment=16, address_space=AddressSpace.SHARED]()

    var i = q0 + tid
    var valid = i < seg1
    var qr = Array[SIMD[F32, 4], HV](fill=SIMD[F32, 4](0))
    var acc = Array[SIMD[F32, 4], HV](fill=SIMD[F32, 4](0))
    if valid:
        var row = q.unsafe_offset((i * H + h) * D)
        comptime for c in range(HV):
            comptime for e in range(4):
                if c * 4 + e < D:
                    qr[c][e] = row[unsafe_offset=c * 4 + e].cast[F32]() * qscale
    var m = Float32(-1.0e30)
    var l = Float32(0)

    var kend = min(seg1, q0 + BQG) if causal else seg1
    for kb in range(seg0, kend, BKG):
        var bk = min(BKG, kend - kb)
        barrier()
        for x in range(tid, BKG * HD, BQG):
            var j = x // HD
            var d = x - j * HD
            var kv = Float32(0)
            var vv = Float32(0)
            if j < bk and d < D:
                var x_kv = ((kb + j) * HKV + g) * D + d
                kv = k[unsafe_offset=x_kv].cast[F32]()
                vv = v[unsafe_offset=x_kv].cast[F32]()
            ks[unsafe_offset=x] = kv
            vs[unsafe_offset=x] = vv
        barrier()
        var sc = Array[Float32, BKG](fill=Float32(0))
        var mt = m
        comptime for j in range(BKG):
            var dot = SIMD[F32, 4](0)
            comptime for c in range(HV):
                dot = qr[c].fma(ks.unsafe_load[width=4, alignment=16](j * HD + c * 4), dot)
            var sj = dot.reduce_add()
            var masked = j >= bk
            comptime if causal:
                masked = masked or kb + j > i
            if masked:
                sj = Float32(-1.0e30)
            sc[j] = sj
            mt = max(mt, sj)
        var alpha = exp2(m - mt)
        l = l * alpha
        comptime for c in range(HV):
            acc[c] = acc[c] * alpha
        comptime for j in range(BKG):
            var p = exp2(sc[j] - mt)
            var masked = j >= bk
            comptime if causal:
                masked = masked or kb + j > i
            if masked:
                p = 0
            l += p
            comptime for c in range(HV):
                acc[c] = SIMD[F32, 4](p).fma(vs.unsafe_load[width=4, alignment=16](j * HD + c * 4), acc[c])
        m = mt

    if valid:
        var inv = 1 / l
        var row = o.unsafe_offset((i * H + h) * D)
        comptime for c in range(HV):
            comptime for e in range(4):
                if c * 4 + e < D:
                    row[unsafe_offset=c * 4 + e] = (acc[c][e] * inv).cast[dtype]()


comptime GPU_HEAD_DIMS = (32, 64, 72, 96, 128)


def varlen_attention_gpu[dtype: DType, causal: Bool = False](
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    k: Pointer[Scalar[dtype], MutAnyOrigin],
    v: Pointer[Scalar[dtype], MutAnyOrigin],
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    cu: Pointer[Int32, MutAnyOrigin],
    N: Int,
    H: Int,
    D: Int,
    S: Int,
    scale: Float64,
    ctx: DeviceContext,
    HKV: Int = -1,
) raises:
    """Launch the GPU path (all pointers in device memory)."""
    if D < 1 or D > MAX_HEAD_DIM:
        raise Error("qwen3vl_varlen_attention: head_dim must be in [1, 128]")
    var kvh = H if HKV < 0 else HKV
    if kvh < 1 or H % kvh != 0:
        raise Error("qwen3vl_varlen_attention: kv heads must divide the query heads")
    if N == 0 or S == 0 or H == 0:
        return
    var grid_x = N // BQG + S    # >= sum_s ceil(L_s / BQG)
    var qscale = Float32(scale * LOG2E)
    comptime for hd_i in range(len(GPU_HEAD_DIMS)):
        comptime HD = GPU_HEAD_DIMS[hd_i]
        comptime LO = 0 if hd_i == 0 else GPU_HEAD_DIMS[hd_i - 1]
        if D > LO and D <= HD:
            ctx.enqueue_function[varlen_attention_gpu_kernel[dtype, HD, causal]](
                q, k, v, o, cu, Int32(S), Int32(H), Int32(kvh), Int32(D), qscale,
                grid_dim=(grid_x, H), block_dim=BQG,
            )


# ----------------------------------------------------------------------------- op
@extensibility.register("qwen3vl_varlen_attention")
struct VarlenAttention:
    """MAX custom op "qwen3vl_varlen_attention"; `scale` and `causal` are compile-time parameters."""

    @staticmethod
    def execute[target: StaticString, scale: Float64, causal: Bool](
        output: OutputTensor[rank=3, ...],
        q: InputTensor[dtype=output.dtype, rank=3, ...],
        k: InputTensor[dtype=output.dtype, rank=3, ...],
        v: InputTensor[dtype=output.dtype, rank=3, ...],
        cu_seqlens: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var N = q.dim_size(0)
        var H = q.dim_size(1)
        var D = q.dim_size(2)
        var HKV = k.dim_size(1)
        var S = cu_seqlens.dim_size(0) - 1
        if S < 0:
            raise Error("qwen3vl_varlen_attention: cu_seqlens must have at least one entry")
        for r in range(3):
            if output.dim_size(r) != q.dim_size(r) or v.dim_size(r) != k.dim_size(r):
                raise Error("qwen3vl_varlen_attention: the output must match q, and v must match k")
        if k.dim_size(0) != N or k.dim_size(2) != D or HKV < 1 or H % HKV != 0:
            raise Error("qwen3vl_varlen_attention: k and v must be [N, kv_heads, head_dim] with kv_heads dividing heads")
        # the kernels index raw pointers: require dense row-major [N, heads, D]
        var qs = q.strides()
        var ks = k.strides()
        var vs = v.strides()
        var os = output.strides()
        comptime for r in range(3):
            var dense = 1 if r == 2 else (D if r == 1 else H * D)
            var dense_kv = 1 if r == 2 else (D if r == 1 else HKV * D)
            if q.dim_size(r) > 1 and (qs[r] != dense or os[r] != dense):
                raise Error("qwen3vl_varlen_attention: q and the output must be contiguous")
            if k.dim_size(r) > 1 and (ks[r] != dense_kv or vs[r] != dense_kv):
                raise Error("qwen3vl_varlen_attention: k and v must be contiguous")
        comptime dtype = output.dtype
        var qp = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](q.unsafe_ptr())
        var kp = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](k.unsafe_ptr())
        var vp = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](v.unsafe_ptr())
        var op = rebind[Pointer[Scalar[dtype], MutAnyOrigin]](output.unsafe_ptr())
        var cp = rebind[Pointer[Int32, MutAnyOrigin]](cu_seqlens.unsafe_ptr())
        comptime if target == "cpu":
            varlen_attention_cpu[dtype, causal](qp, kp, vp, op, cp, N, H, D, S, scale, HKV)
        else:
            varlen_attention_gpu[dtype, causal](qp, kp, vp, op, cp, N, H, D, S, scale, ctx, HKV)
