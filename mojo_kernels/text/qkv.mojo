import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from std.math import rsqrt

from .contiguity import require_contiguous
from .cpu_linear import linear_rows_block
from .cpu_microkernels import F32, VEC
from .cpu_scheduler import run_dynamic
from .linear import GEMV_MAX_ROWS, matmul_cpu

comptime NORM_ROWS_PER_TASK = 16   # rows per task of the separate norm + rope pass (many rows)


@always_inline
def _norm_rope_head(
    h: Pointer[Float32, MutAnyOrigin],
    gamma: Pointer[Float32, MutAnyOrigin],
    cos: Pointer[Float32, MutAnyOrigin],
    sin: Pointer[Float32, MutAnyOrigin],
    D: Int, eps: Float32,
):
    """One head of one row, in place: RMSNorm (x * rsqrt(mean(x^2) + eps), then * gamma:
    transformers' float32 order) followed by the NeoX half-split rotation
    (x * cos + [-x2, x1] * sin), each product rounded apart as the unfused graph does."""
    var acc = SIMD[F32, VEC](0)
    var i = 0
    while i + VEC <= D:
        var x = h.unsafe_load[width=VEC](i)
        acc += x * x
        i += VEC
    var ss = acc.reduce_add()
    while i < D:
        ss += h[unsafe_offset=i] * h[unsafe_offset=i]
        i += 1
    var inv = rsqrt(ss / Float32(D) + eps)
    var half = D // 2
    i = 0
    while i + VEC <= half:
        var a = (h.unsafe_load[width=VEC](i) * inv) * gamma.unsafe_load[width=VEC](i)
        var b = (h.unsafe_load[width=VEC](i + half) * inv) * gamma.unsafe_load[width=VEC](i + half)
        h.unsafe_store(i, a * cos.unsafe_load[width=VEC](i) - b * sin.unsafe_load[width=VEC](i))
        h.unsafe_store(i + half, b * cos.unsafe_load[width=VEC](i + half) + a * sin.unsafe_load[width=VEC](i + half))
        i += VEC
    while i < half:
        var a = (h[unsafe_offset=i] * inv) * gamma[unsafe_offset=i]
        var b = (h[unsafe_offset=i + half] * inv) * gamma[unsafe_offset=i + half]
        h[unsafe_offset=i] = a * cos[unsafe_offset=i] - b * sin[unsafe_offset=i]
        h[unsafe_offset=i + half] = b * cos[unsafe_offset=i + half] + a * sin[unsafe_offset=i + half]
        i += 1


@extensibility.register("qwen3vl_attention_qkv")
struct AttentionQKV:
    """The inputs of a text attention layer in one CPU op: q = rope(q_norm(x @ Wq^T)),
    k = rope(k_norm(x @ Wk^T)), v = x @ Wv^T, per head.

    Unfused, a layer spends 7 kernels (three linear, two RMSNorm, two rope), each a
    fork/join of the CPU workers; at decode those launches cost about as much as the
    streamed weights. Up to GEMV_MAX_ROWS rows one parallel pass streams the three
    weights a head at a time (the tiles of qwen3vl_linear) and normalises and rotates
    each q/k head while it is in L1; above, MAX's GEMM per weight, then one pass for
    norm and rope. Float32 activations; weights float32 or bfloat16 (upcast exactly).

    Shapes: q [M, Hq*D], k and v [M, Hkv*D] (heads of D contiguous), x [M, K], wq
    [Hq*D, K], wk and wv [Hkv*D, K] (the checkpoint's layout), q_norm and k_norm [D],
    cos and sin [M, D].
    """

    @staticmethod
    def execute[target: StaticString, eps: Float64](
        q: OutputTensor[dtype=DType.float32, rank=2, ...],
        k: OutputTensor[dtype=DType.float32, rank=2, ...],
        v: OutputTensor[dtype=DType.float32, rank=2, ...],
        x: InputTensor[dtype=DType.float32, rank=2, ...],
        wq: InputTensor[rank=2, ...],
        wk: InputTensor[dtype=wq.dtype, rank=2, ...],
        wv: InputTensor[dtype=wq.dtype, rank=2, ...],
        q_norm: InputTensor[dtype=DType.float32, rank=1, ...],
        k_norm: InputTensor[dtype=DType.float32, rank=1, ...],
        cos: InputTensor[dtype=DType.float32, rank=2, ...],
        sin: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime OP = "qwen3vl_attention_qkv"
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var D = q_norm.dim_size(0)
        var Nq = wq.dim_size(0)
        var Nkv = wk.dim_size(0)
        if D == 0 or D % 2 != 0 or Nq % D != 0 or Nkv % D != 0:
            raise Error(String(OP, ": head_dim (the norms' size) must be even and divide the weights' rows"))
        var Hq = Nq // D
        var Hkv = Nkv // D
        if (
            q.dim_size(0) != M or k.dim_size(0) != M or v.dim_size(0) != M
            or q.dim_size(1) != Nq or k.dim_size(1) != Nkv or v.dim_size(1) != Nkv or wv.dim_size(0) != Nkv
            or wq.dim_size(1) != K or wk.dim_size(1) != K or wv.dim_size(1) != K
            or k_norm.dim_size(0) != D
            or cos.dim_size(0) != M or cos.dim_size(1) != D or sin.dim_size(0) != M or sin.dim_size(1) != D
        ):
            raise Error(String(OP, ": expected q [M, Hq*D], k and v [M, Hkv*D], x [M, K], ",
                               "wq [Hq*D, K], wk and wv [Hkv*D, K], norms [D], cos and sin [M, D]"))
        require_contiguous(OP, "q", q.shape(), q.strides())
        require_contiguous(OP, "k", k.shape(), k.strides())
        require_contiguous(OP, "v", v.shape(), v.strides())
        require_contiguous(OP, "x", x.shape(), x.strides())
        require_contiguous(OP, "wq", wq.shape(), wq.strides())
        require_contiguous(OP, "wk", wk.shape(), wk.strides())
        require_contiguous(OP, "wv", wv.shape(), wv.strides())
        require_contiguous(OP, "cos", cos.shape(), cos.strides())
        require_contiguous(OP, "sin", sin.shape(), sin.strides())
        comptime if target != "cpu":
            raise Error(String(OP, ": CPU only (GPU graphs keep the separate ops)"))
        if M == 0:
            return
        comptime wdtype = wq.dtype
        var xp = x.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var kp = k.unsafe_ptr()
        var vp = v.unsafe_ptr()
        var wqp = wq.unsafe_ptr()
        var wkp = wk.unsafe_ptr()
        var wvp = wv.unsafe_ptr()
        var gq = q_norm.unsafe_ptr()
        var gk = k_norm.unsafe_ptr()
        var cp = cos.unsafe_ptr()
        var sp = sin.unsafe_ptr()
        var epsf = Float32(eps)
        if M <= GEMV_MAX_ROWS:
            # Task t: head t of q, then of k, then of v; a q/k head is normalised and
            # rotated by the task that computed it.
            def head_task(t: Int, wk_: Int) {
                var xp, var qp, var kp, var vp, var wqp, var wkp, var wvp, var gq, var gk,
                var cp, var sp, var M, var K, var D, var Hq, var Hkv, var Nq, var Nkv, var epsf
            }:
                var y = vp
                var w = wvp
                var g = gq
                var h = t - Hq - Hkv
                var N = Nkv
                if t < Hq:
                    y = qp
                    w = wqp
                    h = t
                    N = Nq
                elif t < Hq + Hkv:
                    y = kp
                    w = wkp
                    g = gk
                    h = t - Hq
                linear_rows_block[F32, wdtype](y, xp, w, M, h * D, h * D + D, N, K)
                if t < Hq + Hkv:
                    for m in range(M):
                        _norm_rope_head(y.unsafe_offset(m * N + h * D), g,
                                        cp.unsafe_offset(m * D), sp.unsafe_offset(m * D), D, epsf)

            run_dynamic(head_task, Hq + 2 * Hkv)
        else:
            matmul_cpu[F32, wdtype](qp, xp, wqp, M, Nq, K, ctx)
            matmul_cpu[F32, wdtype](kp, xp, wkp, M, Nkv, K, ctx)
            matmul_cpu[F32, wdtype](vp, xp, wvp, M, Nkv, K, ctx)

            def norm_task(t: Int, wk_: Int) {
                var qp, var kp, var gq, var gk, var cp, var sp, var M, var D, var Hq, var Hkv, var epsf
            }:
                for m in range(t * NORM_ROWS_PER_TASK, min(t * NORM_ROWS_PER_TASK + NORM_ROWS_PER_TASK, M)):
                    var c = cp.unsafe_offset(m * D)
                    var s = sp.unsafe_offset(m * D)
                    for h in range(Hq):
                        _norm_rope_head(qp.unsafe_offset((m * Hq + h) * D), gq, c, s, D, epsf)
                    for h in range(Hkv):
                        _norm_rope_head(kp.unsafe_offset((m * Hkv + h) * D), gk, c, s, D, epsf)

            run_dynamic(norm_task, (M + NORM_ROWS_PER_TASK - 1) // NORM_ROWS_PER_TASK)
