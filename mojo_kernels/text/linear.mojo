import extensibility
from extensibility import InputTensor, OutputTensor
from layout import TileTensor
from layout.tile_layout import row_major
from max.gpu.host import DeviceContext
from linalg.matmul import matmul
from std.math import ceildiv

from .contiguity import require_contiguous
from .cpu_linear import linear_rows_cpu
from .cpu_scheduler import run_dynamic

# Up to this many rows a linear layer is a weight stream (decode); above it,
# MAX's packed GEMM (prefill), whose per-call packing of W is then amortised.
comptime GEMV_MAX_ROWS = 16
# Weight rows converted to the activation dtype per MAX matmul call when W is stored
# narrower than x (bfloat16 W, float32 x): bounds the scratch at CONVERT_ROWS x K.
comptime CONVERT_ROWS = 1024


def _matmul_converted[
    dtype: DType, wdtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    M: Int, N: Int, K: Int,
    ctx: DeviceContext,
) raises:
    """y = x @ W^T with W converted to dtype CONVERT_ROWS rows at a time (exact for
    bfloat16 -> float32), each block through MAX's matmul into y's columns. The
    scratch blocks are left uninitialised (every element is written before it is
    read) and a block's result is scattered into y by all workers, row by row."""
    var rows = min(N, CONVERT_ROWS)
    var wc = List[Scalar[dtype]](unsafe_uninit_length=rows * K)
    var yc = List[Scalar[dtype]](unsafe_uninit_length=M * rows if rows < N else 0)
    var wp = wc.unsafe_ptr().as_unsafe_any_origin()
    var yp = yc.unsafe_ptr().as_unsafe_any_origin()
    comptime CHUNK = 16384   # elements converted per task
    comptime VEC = 16        # elements per vector copy when scattering a block's rows
    var xt = TileTensor(x, row_major((M, K)))
    for n0 in range(0, N, rows):
        var nb = min(rows, N - n0)
        var src = w.unsafe_offset(n0 * K)
        var total = nb * K

        def convert(t: Int, wk: Int) {var wp, var src, var total}:
            for i in range(t * CHUNK, min(t * CHUNK + CHUNK, total)):
                wp[unsafe_offset=i] = src[unsafe_offset=i].cast[dtype]()

        run_dynamic(convert, ceildiv(total, CHUNK))
        var wt = TileTensor(wp, row_major((nb, K)))
        if nb == N:
            matmul[transpose_b=True, target="cpu"](TileTensor(y, row_major((M, N))), xt, wt, ctx)
        else:
            matmul[transpose_b=True, target="cpu"](TileTensor(yp, row_major((M, nb))), xt, wt, ctx)

            def scatter(m: Int, wk: Int) {var y, var yp, var nb, var n0, var N}:
                var dst = y.unsafe_offset(m * N + n0)
                var row = yp.unsafe_offset(m * nb)
                var j = 0
                while j + VEC <= nb:
                    dst.unsafe_store(j, row.unsafe_load[width=VEC](j))
                    j += VEC
                for t in range(j, nb):
                    dst[unsafe_offset=t] = row[unsafe_offset=t]

            run_dynamic(scatter, M)
    _ = wc^
    _ = yc^


def matmul_cpu[
    dtype: DType, wdtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    M: Int, N: Int, K: Int,
    ctx: DeviceContext,
) raises:
    """Computes y = x @ W^T through MAX's packed GEMM (many rows; qwen3vl_linear's path above
    GEMV_MAX_ROWS), for callers that hold raw pointers."""
    comptime if wdtype == dtype:
        matmul[transpose_b=True, target="cpu"](
            TileTensor(y, row_major((M, N))), TileTensor(x, row_major((M, K))),
            TileTensor(w, row_major((N, K))), ctx,
        )
    else:
        _matmul_converted[dtype, wdtype](y, x, w, M, N, K, ctx)


@extensibility.register("qwen3vl_linear")
struct Linear:
    """Computes y = x @ W^T with W in the checkpoint's [N, K] layout (no bias).

    MAX's CPU matmul packs (and, for W^T, transposes) the weight on every call;
    with few rows that copy costs as much as the product itself. Up to
    GEMV_MAX_ROWS rows this op streams W once, row by row, with float32
    accumulation; above, it calls MAX's matmul with transpose_b. CPU only: GPU
    graphs use MAX's matmul, which reads W^T in place.

    Shapes: y [M, N], x [M, K], w [N, K]; float32 or bfloat16 (x and y alike; w may
    be bfloat16 under float32 x: streamed as it is, or converted block by block
    for MAX's matmul; both exact, float32 accumulation).
    """

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=y.dtype, rank=2, ...],
        w: InputTensor[rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var M = x.dim_size(0)
        var K = x.dim_size(1)
        var N = w.dim_size(0)
        if w.dim_size(1) != K or y.dim_size(0) != M or y.dim_size(1) != N:
            raise Error("qwen3vl_linear: expected y [M, N], x [M, K], w [N, K]")
        comptime OP = "qwen3vl_linear"
        require_contiguous(OP, "y", y.shape(), y.strides())
        require_contiguous(OP, "x", x.shape(), x.strides())
        require_contiguous(OP, "w", w.shape(), w.strides())
        comptime if target != "cpu":
            raise Error("qwen3vl_linear: CPU only (GPU graphs use MAX's matmul)")
        if M == 0 or N == 0:
            return
        if M <= GEMV_MAX_ROWS:
            linear_rows_cpu[y.dtype, w.dtype](y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), M, N, K)
        else:
            comptime if w.dtype == y.dtype:
                matmul[transpose_b=True, target="cpu"](y.to_tile_tensor(), x.to_tile_tensor(), w.to_tile_tensor(), ctx)
            else:
                _matmul_converted[y.dtype, w.dtype](y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), M, N, K, ctx)
