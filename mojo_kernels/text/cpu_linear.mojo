# Dense linear y = x @ W^T (W [N, K], the checkpoint's layout) for a few rows of x: the
# weight streams once, row after row, through the dot micro-kernel. W may be bfloat16
# under float32 activations (half the bytes; float32 accumulation either way).
from std.math import ceildiv

from std.sys import size_of

from .cpu_microkernels import VEC, dot_tile
from .cpu_scheduler import run_dynamic


comptime LIN_ROWS_PER_TASK = 48   # weight rows per parallel task (a multiple of every NC below)


@always_inline
def _linear_tile[
    dtype: DType, wdtype: DType, MR: Int, NC: Int
](
    y: Pointer[Scalar[dtype], MutAnyOrigin],
    x: Pointer[Scalar[dtype], MutAnyOrigin],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    m0: Int, rows: Int, n: Int, N: Int, K: Int, pf_lines: Int,
):
    """y[m0 ..< m0+rows, n ..< n+NC] = x[m0 ...] @ W[n ..< n+NC]^T (rows <= MR; extra rows repeat the last),
    prefetching pf_lines cache lines of the next tile per VEC step of K (see dot_tile)."""
    var a = Array[Pointer[Scalar[dtype], MutAnyOrigin], MR](fill=x)
    comptime for i in range(MR):
        a[i] = x.unsafe_offset((m0 + min(i, rows - 1)) * K)
    var b = Array[Pointer[Scalar[wdtype], MutAnyOrigin], NC](fill=w)
    comptime for c in range(NC):
        b[c] = w.unsafe_offset((n + c) * K)
    var acc = dot_tile[dtype, wdtype, MR, NC](a, b, K, w.unsafe_offset((n + NC) * K), pf_lines)
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
    row groups of MR inside, re-reading the tile from L1.

    W's rows are contiguous, so the next tile is the next NC*K elements: the first
    row group prefetches them into L2 while it streams this tile, spread over its K
    loop. Rows of 2-4 KB are too short a stream for the hardware prefetchers, which
    stop at every 4 KB page (a decode layer's q/k/v and o_proj: 1.2-1.4x faster)."""
    comptime LINE = 64 // size_of[wdtype]()
    var steps = max(1, K // VEC)
    var n = n0
    while n + NC <= n1:
        var ahead = min(NC, n1 - n - NC) * K   # elements of the next tile
        var pf_lines = ceildiv(ceildiv(ahead, LINE), steps) if ahead > 0 else 0
        var m = 0
        while m < M:
            _linear_tile[dtype, wdtype, MR, NC](y, x, w, m, min(MR, M - m), n, N, K, pf_lines if m == 0 else 0)
            m += MR
        n += NC
    while n < n1:
        var m = 0
        while m < M:
            _linear_tile[dtype, wdtype, MR, 1](y, x, w, m, min(MR, M - m), n, N, K, 0)
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
