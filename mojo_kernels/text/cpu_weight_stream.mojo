# Weight streaming for experts with few rows (hub layout, W[e] is [K, N]).
#
# Decode routes one to a few rows to each expert. Reading an expert's [K, N] weight in
# column panels then walks K rows of a few cache lines each, pages apart, and leaves the
# DRAM bandwidth unused. Instead each (expert, k-block) task streams its rows of W in
# memory order, adding a[r][k] * W[k, :] into float32 partial rows (L1/L2); a second pass
# sums the k-blocks and applies the epilogue (cpu_moe.mojo).
from std.math import ceildiv

from .cpu_microkernels import F32, VEC

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
    dtype: DType, wdtype: DType, MR: Int, KU: Int
](
    part: Pointer[Float32, MutAnyOrigin],
    a: Array[Pointer[Scalar[dtype], MutAnyOrigin], MR],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
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
    dtype: DType, wdtype: DType, MR: Int
](
    part: Pointer[Float32, MutAnyOrigin],
    rows: Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS],
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
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
        _stream_step[dtype, wdtype, MR, KU](part, a, w, ldw, k, N)
        k += KU
    while k < k1:
        _stream_step[dtype, wdtype, MR, 1](part, a, w, ldw, k, N)
        k += 1


def stream_task[
    dtype: DType, wdtype: DType
](
    part: Pointer[Float32, MutAnyOrigin],
    rows: Array[Pointer[Scalar[dtype], MutAnyOrigin], STREAM_MAX_ROWS],
    n_rows: Int,
    w: Pointer[Scalar[wdtype], MutAnyOrigin],
    ldw: Int, k0: Int, k1: Int, N: Int,
):
    """One (expert, k-block) task of n_rows (1 ... STREAM_MAX_ROWS) rows."""
    comptime for mr in range(1, STREAM_MAX_ROWS + 1):
        if n_rows == mr:
            _stream_rows[dtype, wdtype, mr](part, rows, w, ldw, k0, k1, N)
