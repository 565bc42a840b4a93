# Dense linear y = x @ W^T (W [N, K], the checkpoint's layout) for a few rows of x: the
# weight streams once, row after row, through the dot micro-kernel. W may be bfloat16
# under float32 activations (half the bytes; float32 accumulation either way).
from std.math import ceildiv

from .cpu_microkernels import dot_tile
from .cpu_scheduler import run_dynamic


comptime LIN_ROWS_PER_TASK = 48   # weight rows per parallel task (a multiple of every NC below)


@always_inline
def _linear_tile[
    dtype: DType, wdtype: DType, MR: Int, NC: Int
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    m0: Int, rows: Int, n: Int, N: Int, K: Int,
):
    """y[m0 ..< m0+rows, n ..< n+NC] = x[m0 ...] @ W[n ..< n+NC]^T (rows <= MR; extra rows repeat the last)."""
    var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=x)
    comptime for i in range(MR):
        a[i] = x.unsafe_offset((m0 + min(i, rows - 1)) * K)
    var b = Array[Pointer[Scalar[wdtype], MutAnyOrigin], NC](fill=w)
    comptime for c in range(NC):
        b[c] = w.unsafe_offset((n + c) * K)
    var acc = dot_tile[dtype, wdtype, MR, NC](a, b, K)
    comptime for i in range(MR):
        if i < rows:
            comptime for c in range(NC):
                y[unsafe_offset=(m0 + i) * N + n + c] = acc[i * NC + c].cast[dtype]()


@always_inline
def _linear_block[
    dtype: DType, wdtype: DType, MR: Int, NC: Int
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    M: Int, n0: Int, n1: Int, N: Int, K: Int,
):
    """y[:, n0 ..< n1]: NC weight rows at a time, each streamed from memory once;
    row groups of MR inside, re-reading the tile from L1."""
    var n = n0
    while n + NC <= n1:
        var m = 0
        while m < M:
            _linear_tile[dtype, wdtype, MR, NC](y, x, w, m, min(MR, M - m), n, N, K)
            m += MR
        n += NC
    while n < n1:
        var m = 0
        while m < M:
            _linear_tile[dtype, wdtype, MR, 1](y, x, w, m, min(MR, M - m), n, N, K)
            m += MR
        n += 1


def linear_rows_block[
    dtype: DType, wdtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    M: Int, n0: Int, n1: Int, N: Int, K: Int,
):
    """Computes y[:, n0 ..< n1] = x @ W[n0 ..< n1]^T (y rows N apart) on the calling thread.

    Register tiles (rows x weight rows): 1x8, 2x8, 4x6, 8x3, at most 24 accumulators."""
    if M == 1:
        _linear_block[dtype, wdtype, 1, 8](y, x, w, M, n0, n1, N, K)
    elif M == 2:
        _linear_block[dtype, wdtype, 2, 8](y, x, w, M, n0, n1, N, K)
    elif M <= 4:
        _linear_block[dtype, wdtype, 4, 6](y, x, w, M, n0, n1, N, K)
    else:
        _linear_block[dtype, wdtype, 8, 3](y, x, w, M, n0, n1, N, K)


def linear_rows_cpu[
    dtype: DType, wdtype: DType
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    M: Int, N: Int, K: Int,
):
    """Computes y = x @ W^T for a few rows of x (W [N, K] row-major): W streams once, row after row."""
    var tasks = ceildiv(N, LIN_ROWS_PER_TASK)

    def task(t: Int, wk: Int) {var y, var x, var w, var M, var N, var K}:
        var n0 = t * LIN_ROWS_PER_TASK
        linear_rows_block[dtype, wdtype](y, x, w, M, n0, min(n0 + LIN_ROWS_PER_TASK, N), N, K)

    run_dynamic(task, tasks)
