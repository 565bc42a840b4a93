# Causal attention of a step's queries over MAX's paged KV cache, on CPU.
#
# A decode step (and a prefill after a cached prefix) attends over every cached
# token; this replaces MAX 26.7's CPU flash_attention_ragged there. A task takes up
# to MAX_QUERIES (row, head) queries of one sequence: at decode (few rows) every head
# of its rows, so that it reads whole cache rows (all KV heads of a token, contiguous)
# in memory order; with more rows, the query heads of one KV head over a block of
# rows, so that each key is read once per block of rows. It streams its keys and
# values page by page and keeps scores, the running softmax and the outputs in L1;
# each key and value row is loaded once for QUERY_CHUNK queries. When there are fewer
# tasks than twice the workers (batch-1 decode), a sequence's keys are split between
# tasks and a second pass merges their partial sums.
#
# Cache layout (MAX's KVCacheParams.shape_per_block, one multi-layer buffer):
#   kv_blocks    [pages, 2 (k, v), layers, page_size, kv_heads, head_dim], dense
#                inside a page (pages kv_blocks.strides()[0] apart)
#   lookup_table [batch, max_pages]  page ids of each sequence, in token order
#   cache_lengths [batch]            tokens cached before this step
# Row r of sequence b (rows input_row_offsets[b] ..< [b + 1]) is token
# cache_lengths[b] + r and sees keys 0 ..< cache_lengths[b] + r + 1: its own
# k/v are in the cache already (stored before the op runs).
import extensibility
from extensibility import InputTensor, OutputTensor
from extensibility import _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext
from std.collections import Array
from std.math import ceildiv, exp, iota
from std.memory import stack_allocation
from std.sys import simd_width_of, size_of
from std.sys.intrinsics import PrefetchOptions, prefetch

from .contiguity import require_contiguous
from .cpu_scheduler import num_workers, run_dynamic

comptime F32 = DType.float32
comptime FPtr = Pointer[Float32, MutAnyOrigin]
comptime VW = simd_width_of[F32]()
comptime MAX_QUERIES = 64     # queries (row, head) of one task: every head of a 30B/235B row
comptime SPLIT_MIN_KEYS = 256 # keys per task at least, when a sequence's keys are split
comptime KEY_BLOCK = 32       # keys scored per online-softmax step (a multiple of VW)
comptime QUERY_CHUNK = 4      # queries sharing each key and value row load
comptime MAX_HEAD_DIM = 128
comptime ALL_HEADS_MIN_KEYS = 256   # a sequence's tasks take every KV head from this many keys on


@always_inline
def _prefetch_rows[cdtype: DType](
    rows: Pointer[Scalar[cdtype], MutAnyOrigin], n: Int, token_stride: Int, D: Int,
):
    """Software prefetch of n rows of D, token_stride apart."""
    comptime LINE = 64 // size_of[cdtype]()
    for j in range(n):
        for d in range(0, D, LINE):
            prefetch[PrefetchOptions().for_read().medium_locality()](rows.unsafe_offset(j * token_stride + d))


@always_inline
def _chunk[cdtype: DType, QC: Int](
    qs: FPtr, os: FPtr, ss: FPtr, m: FPtr, l: FPtr,
    kb: Pointer[Scalar[cdtype], MutAnyOrigin], vb: Pointer[Scalar[cdtype], MutAnyOrigin],
    prefetching: Bool, next_kb: Pointer[Scalar[cdtype], MutAnyOrigin], next_bk: Int,
    token_stride: Int, D: Int, bk: Int, visible: Int, c0: Int, nh: Int, scale: Float32,
):
    """One key block for QC queries c0 ..< c0 + QC of a task (their q at qs, running max m,
    sum l and output os; query i, of row i // nh, sees visible + i // nh keys of the block;
    scores in ss). With ``prefetching``, scoring key j prefetches this block's value row j
    (read by the p @ V pass below) and, for j < next_bk, the next block's key row j."""
    # scores: each key row is loaded once for the QC queries
    for j in range(bk):
        if prefetching:
            _prefetch_rows(vb.unsafe_offset(j * token_stride), 1, token_stride, D)
            if j < next_bk:
                _prefetch_rows(next_kb.unsafe_offset(j * token_stride), 1, token_stride, D)
        var k = kb.unsafe_offset(j * token_stride)
        var acc = Array[SIMD[F32, VW], QC](fill=SIMD[F32, VW](0))
        var d = 0
        while d + VW <= D:
            var kv = k.unsafe_load[width=VW](d).cast[F32]()
            comptime for c in range(QC):
                acc[c] = qs.unsafe_load[width=VW](c * D + d).fma(kv, acc[c])
            d += VW
        comptime for c in range(QC):
            var sc = acc[c].reduce_add()
            for t in range(d, D):
                sc += qs[unsafe_offset=c * D + t] * k[unsafe_offset=t].cast[F32]()
            ss[unsafe_offset=c * KEY_BLOCK + j] = sc * scale
    # online softmax, KEY_BLOCK lanes at a time (lanes past what a query sees are masked)
    var lane = iota[F32, VW]()
    var alpha = Array[Float32, QC](fill=0)
    var seen = 0
    comptime for c in range(QC):
        var lim = Float32(max(0, min(bk, visible + (c0 + c) // nh)))
        seen = max(seen, Int(lim))
        var row = ss.unsafe_offset(c * KEY_BLOCK)
        var mx = m[unsafe_offset=c]
        comptime for j0 in range(0, KEY_BLOCK, VW):
            var x = (lane + Float32(j0)).lt(lim).select(row.unsafe_load[width=VW](j0), SIMD[F32, VW](Float32.MIN))
            row.unsafe_store(j0, x)
            mx = max(mx, x.reduce_max())
        var total = SIMD[F32, VW](0)
        comptime for j0 in range(0, KEY_BLOCK, VW):
            # masked lanes are 0 even when the query has seen no key yet (mx still MIN)
            var p = (lane + Float32(j0)).lt(lim).select(exp(row.unsafe_load[width=VW](j0) - mx), SIMD[F32, VW](0))
            row.unsafe_store(j0, p)
            total += p
        alpha[c] = exp(m[unsafe_offset=c] - mx)
        l[unsafe_offset=c] = l[unsafe_offset=c] * alpha[c] + total.reduce_add()
        m[unsafe_offset=c] = mx
    # out = out * alpha + p @ V: each value row is loaded once for the QC queries
    var d = 0
    while d + VW <= D:
        var acc = Array[SIMD[F32, VW], QC](fill=SIMD[F32, VW](0))
        comptime for c in range(QC):
            acc[c] = os.unsafe_load[width=VW](c * D + d) * alpha[c]
        for j in range(seen):
            var vv = vb.unsafe_load[width=VW](j * token_stride + d).cast[F32]()
            comptime for c in range(QC):
                acc[c] = SIMD[F32, VW](ss[unsafe_offset=c * KEY_BLOCK + j]).fma(vv, acc[c])
        comptime for c in range(QC):
            os.unsafe_store(c * D + d, acc[c])
        d += VW
    while d < D:
        comptime for c in range(QC):
            var o = os[unsafe_offset=c * D + d] * alpha[c]
            for j in range(seen):
                o += ss[unsafe_offset=c * KEY_BLOCK + j] * vb[unsafe_offset=j * token_stride + d].cast[F32]()
            os[unsafe_offset=c * D + d] = o
        d += 1


struct _Task(ImplicitlyCopyable):
    """Rows r0 ..< r1 of sequence b, KV heads g0 ..< g1 (all their G query heads each),
    keys k0 ..< k1; split >= 0: the task's partial sums go to scratch from offset split
    (its outputs, queries x head_dim, then each query's running max and sum). Its
    queries are ordered (KV head, row, head of the group): query i is KV head
    g0 + i // (rows * G), row r0 + i % (rows * G) // G, query head of the group i % G."""
    var b: Int
    var r0: Int
    var r1: Int
    var g0: Int
    var g1: Int
    var k0: Int
    var k1: Int
    var split: Int

    def __init__(out self, b: Int, r0: Int, r1: Int, g0: Int, g1: Int, k0: Int, k1: Int, split: Int):
        self.b = b
        self.r0 = r0
        self.r1 = r1
        self.g0 = g0
        self.g1 = g1
        self.k0 = k0
        self.k1 = k1
        self.split = split

    def queries(self, G: Int) -> Int:
        return (self.r1 - self.r0) * G * (self.g1 - self.g0)

    def partial_size(self, G: Int, D: Int) -> Int:
        """Floats of a split task's partial sums."""
        return self.queries(G) * (D + 2)

    def row_offset(self, i: Int, row0: Int, H: Int, G: Int, D: Int) -> Int:
        """Where query i's row starts in q and out [T, H, D] (row0: the sequence's first row)."""
        var per_head = (self.r1 - self.r0) * G
        var w = i % per_head
        return ((row0 + self.r0 + w // G) * H + (self.g0 + i // per_head) * G + w % G) * D


def _attend[dtype: DType, cdtype: DType](
    task: _Task,
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    q: Pointer[Scalar[dtype], MutAnyOrigin],
    kv: Pointer[Scalar[cdtype], MutAnyOrigin],
    pages: Pointer[UInt32, MutAnyOrigin],
    partial: FPtr,
    row0: Int, cached: Int, H: Int, G: Int, D: Int, page_size: Int,
    k_off: Int, v_off: Int, page_stride: Int, token_stride: Int,
    scale: Float32,
):
    """One task (see _Task) of a sequence whose first row is row0, key block by key block
    (a run inside one page). A final task writes out; a split task writes its
    unnormalised output, running max and sum to its slot of partial."""
    var nq = task.queries(G)
    var per_head = (task.r1 - task.r0) * G   # queries of one KV head
    var heads = task.g1 - task.g0
    var qs = rebind[FPtr](stack_allocation[MAX_QUERIES * MAX_HEAD_DIM, F32, alignment=64]())
    var os = rebind[FPtr](stack_allocation[MAX_QUERIES * MAX_HEAD_DIM, F32, alignment=64]())
    var ss = rebind[FPtr](stack_allocation[QUERY_CHUNK * KEY_BLOCK, F32, alignment=64]())
    var m = rebind[FPtr](stack_allocation[MAX_QUERIES, F32, alignment=64]())
    var l = rebind[FPtr](stack_allocation[MAX_QUERIES, F32, alignment=64]())
    for i in range(nq):
        var src = q.unsafe_offset(task.row_offset(i, row0, H, G, D))
        for d in range(D):
            qs[unsafe_offset=i * D + d] = src[unsafe_offset=d].cast[F32]()
            os[unsafe_offset=i * D + d] = 0
        m[unsafe_offset=i] = Float32.MIN
        l[unsafe_offset=i] = 0
    # A key block is a run of up to KEY_BLOCK keys inside one page: its rows (every KV
    # head of a token) start at block_start(t) and lie token_stride apart; KV head g's
    # part is at g * D (2 such parts per 4 KiB page at medium's dims, which the hardware
    # prefetchers do not follow), so each head's part of the next block is prefetched.
    def block_start(t: Int) {var pages, var page_size, var page_stride, var token_stride} -> Int:
        return Int(pages[unsafe_offset=t // page_size]) * page_stride + (t % page_size) * token_stride

    def block_len(t: Int) {var page_size, var task} -> Int:
        return min(KEY_BLOCK, page_size - t % page_size, task.k1 - t)

    var t0 = task.k0
    if t0 < task.k1:  # the first block's keys; later ones are prefetched a block ahead
        _prefetch_rows(kv.unsafe_offset(block_start(t0) + k_off + task.g0 * D), block_len(t0), token_stride,
                       heads * D)
    while t0 < task.k1:
        var bk = block_len(t0)
        var base = block_start(t0)
        var next_base = base
        var next_bk = 0
        if t0 + bk < task.k1:
            next_base = block_start(t0 + bk)
            next_bk = block_len(t0 + bk)
        var visible = cached + task.r0 + 1 - t0   # keys of this block the task's first row sees
        for h in range(heads):   # KV head g0 + h: queries h * per_head ..< + per_head
            var g_off = (task.g0 + h) * D
            var kb = kv.unsafe_offset(base + k_off + g_off)
            var vb = kv.unsafe_offset(base + v_off + g_off)
            var next_kb = kv.unsafe_offset(next_base + k_off + g_off)
            var c0 = 0
            while c0 + QUERY_CHUNK <= per_head:  # the head's first chunk of queries prefetches for all
                var c = h * per_head + c0
                _chunk[cdtype, QUERY_CHUNK](qs.unsafe_offset(c * D), os.unsafe_offset(c * D), ss, m.unsafe_offset(c),
                                             l.unsafe_offset(c), kb, vb, c0 == 0, next_kb, next_bk,
                                             token_stride, D, bk, visible, c0, G, scale)
                c0 += QUERY_CHUNK
            while c0 < per_head:
                var c = h * per_head + c0
                _chunk[cdtype, 1](qs.unsafe_offset(c * D), os.unsafe_offset(c * D), ss, m.unsafe_offset(c),
                                  l.unsafe_offset(c), kb, vb, c0 == 0, next_kb, next_bk,
                                  token_stride, D, bk, visible, c0, G, scale)
                c0 += 1
        t0 += bk
    if task.split >= 0:
        var slot = partial.unsafe_offset(task.split)
        for i in range(nq):
            for d in range(D):
                slot[unsafe_offset=i * D + d] = os[unsafe_offset=i * D + d]
            slot[unsafe_offset=nq * D + 2 * i] = m[unsafe_offset=i]
            slot[unsafe_offset=nq * D + 2 * i + 1] = l[unsafe_offset=i]
        return
    for i in range(nq):
        var dst = o.unsafe_offset(task.row_offset(i, row0, H, G, D))
        var inv = 1 / l[unsafe_offset=i]
        for d in range(D):
            dst[unsafe_offset=d] = (os[unsafe_offset=i * D + d] * inv).cast[dtype]()


def _combine[dtype: DType](
    task: _Task, splits: Int,
    o: Pointer[Scalar[dtype], MutAnyOrigin],
    partial: FPtr,
    row0: Int, H: Int, G: Int, D: Int,
):
    """Merges the partial sums of `splits` split tasks (the first is task) into out:
    sum_s e^(m_s - M) o_s / sum_s e^(m_s - M) l_s (the splits' partial sums lie one after another)."""
    var nq = task.queries(G)
    var size = task.partial_size(G, D)
    for i in range(nq):
        var mx = Float32.MIN
        for s in range(splits):
            mx = max(mx, partial[unsafe_offset=task.split + s * size + nq * D + 2 * i])
        var total = Float32(0)
        for s in range(splits):
            var stats = task.split + s * size + nq * D + 2 * i
            total += exp(partial[unsafe_offset=stats] - mx) * partial[unsafe_offset=stats + 1]
        var dst = o.unsafe_offset(task.row_offset(i, row0, H, G, D))
        for d in range(D):
            var acc = Float32(0)
            for s in range(splits):
                var slot = task.split + s * size
                acc += exp(partial[unsafe_offset=slot + nq * D + 2 * i] - mx) * partial[unsafe_offset=slot + i * D + d]
            dst[unsafe_offset=d] = (acc / total).cast[dtype]()


@extensibility.register("qwen3vl_paged_attention")
struct PagedAttention:
    """Causal GQA attention of a ragged batch of queries over MAX's paged KV cache (CPU).

    out[i, h] = softmax_j(scale * q[i, h] . k[j, g]) @ v[j, g], g = h // (H / Hkv), over
    the keys j of row i's sequence up to and including its own token (see the file
    header for the cache layout). Float32 accumulation; the cache may be float32 or
    bfloat16, q and out float32 or bfloat16.

    Shapes: output and q [T, H, D]; kv_blocks [pages, 2, layers, page_size, Hkv, D];
    lookup_table [B, max_pages] uint32; cache_lengths [B] uint32; input_row_offsets
    [B + 1] uint32; layer [1] uint32.
    """

    @staticmethod
    def execute[target: StaticString, scale: Float64](
        output: OutputTensor[rank=3, ...],
        q: InputTensor[dtype=output.dtype, rank=3, ...],
        kv_blocks: MutableInputTensor[rank=6, ...],
        lookup_table: InputTensor[dtype=DType.uint32, rank=2, ...],
        cache_lengths: InputTensor[dtype=DType.uint32, rank=1, ...],
        input_row_offsets: InputTensor[dtype=DType.uint32, rank=1, ...],
        layer: InputTensor[dtype=DType.uint32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime OP = "qwen3vl_paged_attention"
        comptime if target != "cpu":
            raise Error(String(OP, ": CPU only (GPU graphs use MAX's flash attention)"))
        var T = q.dim_size(0)
        var H = q.dim_size(1)
        var D = q.dim_size(2)
        var B = input_row_offsets.dim_size(0) - 1
        var L = kv_blocks.dim_size(2)
        var page_size = kv_blocks.dim_size(3)
        var Hkv = kv_blocks.dim_size(4)
        if (
            output.dim_size(0) != T or output.dim_size(1) != H or output.dim_size(2) != D
            or kv_blocks.dim_size(1) != 2 or kv_blocks.dim_size(5) != D
            or Hkv == 0 or H % Hkv != 0 or B < 0 or cache_lengths.dim_size(0) != B
            or lookup_table.dim_size(0) < B or layer.dim_size(0) != 1
        ):
            raise Error(String(OP, ": expected q and out [T, H, D], kv_blocks [pages, 2, layers, page_size, Hkv, D] ",
                               "with Hkv dividing H, cache_lengths [B], lookup_table [>= B, pages], ",
                               "input_row_offsets [B + 1], layer [1]"))
        if D > MAX_HEAD_DIM:
            raise Error(String(OP, ": head_dim above ", MAX_HEAD_DIM))
        require_contiguous(OP, "output", output.shape(), output.strides())
        require_contiguous(OP, "q", q.shape(), q.strides())
        # Pages may lie further apart than a page's size (MAX passes the pool's page
        # stride); inside a page the layout must be dense.
        var kv_strides = kv_blocks.strides()
        var dense = 1
        for i in range(5, 0, -1):
            if kv_blocks.dim_size(i) > 1 and kv_strides[i] != dense:
                raise Error(String(OP, ": kv_blocks must be dense inside a page"))
            dense *= kv_blocks.dim_size(i)
        require_contiguous(OP, "lookup_table", lookup_table.shape(), lookup_table.strides())
        var layer_idx = Int(layer[0])
        if layer_idx >= L:
            raise Error(String(OP, ": layer ", layer_idx, " of a cache of ", L, " layers"))
        if T == 0:
            return
        var G = H // Hkv
        var token_stride = Hkv * D
        var layer_stride = page_size * token_stride
        var page_stride = kv_strides[0] if kv_blocks.dim_size(0) > 1 else 2 * L * layer_stride
        var k_off = layer_idx * layer_stride
        var v_off = (L + layer_idx) * layer_stride
        var max_pages = lookup_table.dim_size(1)
        if G > MAX_QUERIES:
            raise Error(String(OP, ": more than ", MAX_QUERIES, " query heads per KV head"))
        # Tasks: at most MAX_QUERIES (row, head) queries each. A sequence with at least
        # ALL_HEADS_MIN_KEYS keys whose rows fit in one task with every head (decode)
        # gets such a task: it reads whole cache rows (every KV head of a token)
        # together. Per-KV-head tasks read 512-byte parts of rows 2 KiB apart (medium's
        # dims), which from DRAM, where a decode step's weight streams leave the KV
        # cache, took 1.5x (508 keys) to 1.6x (1,200) as long; below ~256 keys they
        # are as fast and need no split. Other sequences (short ones, a prefill after a
        # cached prefix) get (block of rows, KV head) tasks, which read each key once
        # per block of rows. When the tasks are fewer than twice the workers, their
        # keys are split (at least SPLIT_MIN_KEYS keys each, half that for a task of
        # several KV heads; in a multiple of the workers) and a second pass merges them.
        var all_heads_rows = MAX_QUERIES // H   # 0 when H > MAX_QUERIES
        var rows_per_task = max(1, MAX_QUERIES // G)
        var base = List[_Task]()
        for b in range(B):
            var lo = Int(input_row_offsets[b])
            var hi = Int(input_row_offsets[b + 1])
            if hi < lo or hi > T:
                raise Error(String(OP, ": input_row_offsets must be non-decreasing and end at T"))
            var cached = Int(cache_lengths[b])
            if cached + hi - lo > max_pages * page_size:
                raise Error(String(OP, ": a sequence's tokens exceed its lookup table row"))
            if hi - lo <= all_heads_rows and cached + hi - lo >= ALL_HEADS_MIN_KEYS:
                base.append(_Task(b, 0, hi - lo, 0, Hkv, 0, cached + hi - lo, -1))
                continue
            for r0 in range(0, hi - lo, rows_per_task):
                var r1 = min(r0 + rows_per_task, hi - lo)
                for g in range(Hkv):
                    base.append(_Task(b, r0, r1, g, g + 1, 0, cached + r1, -1))
        var workers = num_workers(T * H)
        var want = 2 * workers
        var tasks = List[_Task]()
        var merges = List[Int]()   # index of each merged group's first task, then its split count
        var n_partial = 0   # floats of the split tasks' partial sums
        for t in base:
            var splits = 1
            if len(base) < want:
                var min_keys = SPLIT_MIN_KEYS // 2 if t.g1 - t.g0 > 1 else SPLIT_MIN_KEYS
                splits = max(1, min(ceildiv(want, len(base)), t.k1 // min_keys))
                if splits > workers:
                    splits -= splits % workers
            if splits == 1:
                tasks.append(t)
                continue
            merges.append(len(tasks))
            merges.append(splits)
            var chunk = ceildiv(t.k1, splits)
            for s in range(splits):
                tasks.append(_Task(t.b, t.r0, t.r1, t.g0, t.g1, s * chunk, min(t.k1, s * chunk + chunk), n_partial))
                n_partial += t.partial_size(G, D)
        var partial = List[Float32](unsafe_uninit_length=n_partial)
        var op = output.unsafe_ptr()
        var qp = q.unsafe_ptr()
        var kvp = kv_blocks.unsafe_ptr()
        var ltp = lookup_table.unsafe_ptr()
        var clp = cache_lengths.unsafe_ptr()
        var offp = input_row_offsets.unsafe_ptr()
        var tp = tasks.unsafe_ptr()
        var pp = partial.unsafe_ptr().as_unsafe_any_origin()
        var sc = Float32(scale)

        def attend(t: Int, w: Int) {
            var op, var qp, var kvp, var ltp, var clp, var offp, var tp, var pp, var sc, var H, var G, var D,
            var page_size, var k_off, var v_off, var page_stride, var token_stride, var max_pages
        }:
            var task = tp[unsafe_offset=t]
            _attend[output.dtype, kv_blocks.dtype](
                task, op, qp, kvp, ltp.unsafe_offset(task.b * max_pages), pp,
                Int(offp[unsafe_offset=task.b]), Int(clp[unsafe_offset=task.b]), H, G, D, page_size,
                k_off, v_off, page_stride, token_stride, sc,
            )

        run_dynamic(attend, len(tasks))
        if len(merges) > 0:
            var mp = merges.unsafe_ptr()

            def combine(t: Int, w: Int) {var op, var tp, var pp, var offp, var mp, var H, var G, var D}:
                var task = tp[unsafe_offset=Int(mp[unsafe_offset=2 * t])]
                _combine[output.dtype](task, Int(mp[unsafe_offset=2 * t + 1]), op, pp,
                                       Int(offp[unsafe_offset=task.b]), H, G, D)

            run_dynamic(combine, len(merges) // 2)
        _ = merges^
        _ = partial^
        _ = tasks^
        _ = base^
