# Routing helpers shared by the CPU and GPU paths of `moe_route`, and its GPU kernels.
#
# GPU pipeline (S = T*top_k slots, chunks of ROUTE_CHUNK slots):
#   route_topk_kernel    one thread per token: softmax, top-k, renormalised weights, ids
#   route_count_kernel   one block per chunk: counts[chunk, e] = #slots of expert e in the chunk
#   route_scan_kernel    one block: offsets[e] and, in place, counts[chunk, e] -> first sorted
#                        position of (chunk, e) (exclusive scan in (expert, chunk) order)
#   route_scatter_kernel one block per chunk: thread e writes its slots in slot order -> stable
from max.gpu import thread_idx, block_idx, barrier
from std.memory import stack_allocation, AddressSpace
from std.math import exp, ceildiv
from max.gpu.host import DeviceContext
from max.algorithm import parallelize

comptime F32 = DType.float32
comptime ROUTE_THREADS = 256
comptime ROUTE_CHUNK = 256
comptime ROUTE_MAX_EXPERTS = 1024


@always_inline
def topk_row[
    dtype: DType, top_k: Int
](
    logits: Pointer[Scalar[dtype], MutAnyOrigin],
    E: Int,
    mut vals: Array[Float32, top_k],
    mut idx: Array[Int32, top_k],
):
    """Softmax (float32) of one row of E logits and its top_k (probability, expert id),
    descending; on ties the lower expert id comes first."""
    var m = logits[unsafe_offset=0].cast[F32]()
    for e in range(1, E):
        m = max(m, logits[unsafe_offset=e].cast[F32]())
    var s = Float32(0)
    for e in range(E):
        s += exp(logits[unsafe_offset=e].cast[F32]() - m)
    comptime for k in range(top_k):
        vals[k] = -1.0
        idx[k] = 0
    for e in range(E):
        var p = exp(logits[unsafe_offset=e].cast[F32]() - m) / s
        if p > vals[top_k - 1]:
            var pos = top_k - 1
            while pos > 0 and p > vals[pos - 1]:
                vals[pos] = vals[pos - 1]
                idx[pos] = idx[pos - 1]
                pos -= 1
            vals[pos] = p
            idx[pos] = Int32(e)


@always_inline
def route_token[
    dtype: DType, top_k: Int
](
    logits: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Scalar[dtype], MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    t: Int, E: Int,
):
    """One token: weights[t, :], ids[t, :] of token t: top-k softmax probabilities / their sum."""
    var vals = Array[Float32, top_k](fill=0)
    var idx = Array[Int32, top_k](fill=0)
    topk_row[dtype, top_k](logits.unsafe_offset(t * E), E, vals, idx)
    var tot = Float32(0)
    comptime for k in range(top_k):
        tot += vals[k]
    comptime for k in range(top_k):
        weights[unsafe_offset=t * top_k + k] = (vals[k] / tot).cast[dtype]()
        ids[unsafe_offset=t * top_k + k] = idx[k]


def route_topk_kernel[
    dtype: DType, top_k: Int
](
    logits: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Scalar[dtype], MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    T: Int32, E: Int32,
):
    var t = Int(block_idx.x) * ROUTE_THREADS + Int(thread_idx.x)
    if t < Int(T):
        route_token[dtype, top_k](logits, weights, ids, t, Int(E))


def route_count_kernel(
    ids: Pointer[Int32, MutAnyOrigin],
    counts: Pointer[Int32, MutAnyOrigin],
    S: Int32, E: Int32,
):
    var ids_s = stack_allocation[ROUTE_CHUNK, DType.int32, address_space=AddressSpace.SHARED]()
    var c = Int(block_idx.x)
    var tid = Int(thread_idx.x)
    var begin = c * ROUTE_CHUNK
    var n = min(ROUTE_CHUNK, Int(S) - begin)
    for i in range(tid, n, ROUTE_THREADS):
        ids_s[unsafe_offset=i] = ids[unsafe_offset=begin + i]
    barrier()
    for e in range(tid, Int(E), ROUTE_THREADS):
        var cnt = 0
        for i in range(n):
            if Int(ids_s[unsafe_offset=i]) == e:
                cnt += 1
        counts[unsafe_offset=c * Int(E) + e] = Int32(cnt)


def route_scan_kernel(
    counts: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    n_chunks: Int32, E: Int32,
):
    """Single block. offsets[e] = sum of all counts of experts < e; counts[c, e] becomes
    offsets[e] + sum_{c' < c} counts[c', e]."""
    var tot = stack_allocation[ROUTE_MAX_EXPERTS + 1, DType.int32, address_space=AddressSpace.SHARED]()
    var tid = Int(thread_idx.x)
    var Ei = Int(E)
    var nc = Int(n_chunks)
    for e in range(tid, Ei, ROUTE_THREADS):
        var s = 0
        for c in range(nc):
            s += Int(counts[unsafe_offset=c * Ei + e])
        tot[unsafe_offset=e] = Int32(s)
    barrier()
    if tid == 0:
        var run = Int32(0)
        for e in range(Ei):
            var v = tot[unsafe_offset=e]
            tot[unsafe_offset=e] = run
            offsets[unsafe_offset=e] = run
            run += v
        offsets[unsafe_offset=Ei] = run
    barrier()
    for e in range(tid, Ei, ROUTE_THREADS):
        var run = tot[unsafe_offset=e]
        for c in range(nc):
            var v = counts[unsafe_offset=c * Ei + e]
            counts[unsafe_offset=c * Ei + e] = run
            run += v


def route_scatter_kernel(
    ids: Pointer[Int32, MutAnyOrigin],
    bases: Pointer[Int32, MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    S: Int32, E: Int32,
):
    var ids_s = stack_allocation[ROUTE_CHUNK, DType.int32, address_space=AddressSpace.SHARED]()
    var c = Int(block_idx.x)
    var tid = Int(thread_idx.x)
    var begin = c * ROUTE_CHUNK
    var n = min(ROUTE_CHUNK, Int(S) - begin)
    for i in range(tid, n, ROUTE_THREADS):
        ids_s[unsafe_offset=i] = ids[unsafe_offset=begin + i]
    barrier()
    for e in range(tid, Int(E), ROUTE_THREADS):
        var j = Int(bases[unsafe_offset=c * Int(E) + e])
        for i in range(n):
            if Int(ids_s[unsafe_offset=i]) == e:
                perm[unsafe_offset=j] = Int32(begin + i)
                j += 1


def enqueue_route_gpu[
    dtype: DType, top_k: Int
](
    ctx: DeviceContext,
    logits: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Scalar[dtype], MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    counts: Pointer[Int32, MutAnyOrigin],
    counts_size: Int,
    T: Int, E: Int,
) raises:
    """The four routing kernels (see the top of this file). ``counts``: device scratch of
    ``counts_size`` >= ``route_counts_size(T * top_k, E)`` int32, given by the caller so
    that routing allocates nothing per call (device graph capture needs that)."""
    if E > ROUTE_MAX_EXPERTS:
        raise Error("qwen3vl_moe_route: at most 1024 experts on GPU")
    var S = T * top_k
    var n_chunks = ceildiv(S, ROUTE_CHUNK)
    if counts_size < route_counts_size(S, E):
        raise Error("qwen3vl_moe_route: the scratch holds fewer than max(ceil(T*top_k/256), 1) * E counts")
    # counts[chunk, e], turned into the first sorted position of (chunk, e) by the scan
    if S > 0:
        ctx.enqueue_function[route_topk_kernel[dtype, top_k]](
            logits, weights, ids, Int32(T), Int32(E),
            grid_dim=ceildiv(T, ROUTE_THREADS), block_dim=ROUTE_THREADS,
        )
        ctx.enqueue_function[route_count_kernel](
            ids, counts, Int32(S), Int32(E),
            grid_dim=n_chunks, block_dim=ROUTE_THREADS,
        )
    ctx.enqueue_function[route_scan_kernel](
        counts, offsets, Int32(n_chunks), Int32(E),
        grid_dim=1, block_dim=ROUTE_THREADS,
    )
    if S > 0:
        ctx.enqueue_function[route_scatter_kernel](
            ids, counts, perm, Int32(S), Int32(E),
            grid_dim=n_chunks, block_dim=ROUTE_THREADS,
        )


def route_counts_size(S: Int, E: Int) -> Int:
    """Int32 counts the GPU routing needs for S slots and E experts: one row of E per chunk."""
    return max(ceildiv(S, ROUTE_CHUNK), 1) * E


def route_cpu[
    dtype: DType, top_k: Int
](
    logits: Pointer[Scalar[dtype], MutAnyOrigin],
    weights: Pointer[Scalar[dtype], MutAnyOrigin],
    ids: Pointer[Int32, MutAnyOrigin],
    perm: Pointer[Int32, MutAnyOrigin],
    offsets: Pointer[Int32, MutAnyOrigin],
    T: Int, E: Int,
):
    """Tokens in parallel (blocks of 32; one block inline), then a serial stable counting sort."""
    comptime ROWS = 32

    def token_block(b: Int) {var logits, var weights, var ids, var T, var E}:
        for t in range(b * ROWS, min(b * ROWS + ROWS, T)):
            route_token[dtype, top_k](logits, weights, ids, t, E)

    if T > ROWS:
        parallelize(token_block, ceildiv(T, ROWS))
    elif T > 0:     # one block (decode): in the calling thread, no fork/join
        token_block(0)
    var S = T * top_k
    for e in range(E + 1):
        offsets[unsafe_offset=e] = 0
    for s in range(S):
        offsets[unsafe_offset=Int(ids[unsafe_offset=s]) + 1] += 1
    for e in range(E):
        offsets[unsafe_offset=e + 1] += offsets[unsafe_offset=e]
    var fill = List[Int32](length=E, fill=0)
    for s in range(S):
        var e = Int(ids[unsafe_offset=s])
        perm[unsafe_offset=Int(offsets[unsafe_offset=e] + fill[e])] = Int32(s)
        fill[e] += 1
