"""Qwen3-VL learned position embedding, bilinearly interpolated (transformers 5.12.1).

Formula, for every grid entry (t, h, w) in order (S = num_grid_per_side, m = merge_size):

    ys = linspace_f32(0, S-1, h)        xs = linspace_f32(0, S-1, w)
    y0 = trunc(ys), y1 = min(y0+1, S-1), dy = ys - y0   (same for x0, x1, dx)
    rows in merge-window order, repeated over t:
        for tt < t, bh < h/m, bw < w/m, mh < m, mw < m  (mw fastest):
            r = bh*m + mh,  c = bw*m + mw
            out[n, :] = (1-dy[r])*(1-dx[c]) * table[y0[r]*S + x0[c], :]
                      + (1-dy[r])*dx[c]     * table[y0[r]*S + x1[c], :]
                      + dy[r]*(1-dx[c])     * table[y1[r]*S + x0[c], :]
                      + dy[r]*dx[c]         * table[y1[r]*S + x1[c], :]
    linspace rule (bit-exact with torch.linspace float32):
        step = f32(S-1) / f32(n-1);  v_i = f32(i * step) for i < n//2,
        v_i = fma(-(n-1-i), step, S-1) (one rounding) otherwise; n == 1 -> [0].
    Weights and the weighted sum are float32 (products first, then summed in
    corner order), like `(table[idx] * w[:, :, None]).sum(0)` in transformers.

Shapes and dtypes:
    table     [S*S, hidden]         float32 or bfloat16
    grid_thw  [G, 3]                int64, h and w multiples of merge_size
    out       [sum_g t*h*w, hidden] float32 (the caller casts)

The number of output rows comes either from a graph dim supplied by the caller
(checked against sum t*h*w at run time) or from the registered shape function.

CPU path: parallel over (grid entry, tt, bh) row bands, each output row a SIMD
loop over hidden. GPU path: one block per output row; thread 0 decodes the row
into 4 indices + 4 weights in shared memory, the block then streams the row.
"""

from std.memory import stack_allocation
from std.sys import simd_width_of
from std.utils import IndexList
from max.algorithm import parallelize
from max.gpu import thread_idx, block_idx, barrier
from max.gpu.memory import AddressSpace
from max.gpu.host import DeviceContext
import extensibility
from extensibility import InputTensor, OutputTensor, TileTensorable


comptime F32 = DType.float32


@always_inline
def linspace_coord(i: Int, n: Int, side: Int) -> Tuple[Int, Int, Float32]:
    """(floor index, ceil index, fraction) of torch.linspace(0, side-1, n)[i] in float32."""
    var v = Float32(0)
    if n > 1:
        var step = Float32(side - 1) / Float32(n - 1)
        if i < n // 2:
            v = Float32(i) * step
        else:
            v = Float32(-(n - 1 - i)).fma(step, Float32(side - 1))
    var i0 = Int(v)
    var i1 = min(i0 + 1, side - 1)
    return (i0, i1, v - Float32(i0))


@always_inline
def _decode_row(local: Int, h: Int, w: Int, m: Int) -> Tuple[Int, Int]:
    """Merge-window row index inside one (h, w) frame -> (patch row r, patch col c)."""
    var hw = h * w
    var x = local % hw
    var mw = x % m
    x //= m
    var mh = x % m
    x //= m
    var wb = w // m
    var bw = x % wb
    var bh = x // wb
    return (bh * m + mh, bw * m + mw)


# ----------------------------------------------------------------------------- CPU
def bilinear_pos_embed_cpu[tdtype: DType](
    table: Pointer[Scalar[tdtype], MutAnyOrigin],
    grid: Pointer[Int64, MutAnyOrigin],
    o: Pointer[Float32, MutAnyOrigin],
    G: Int,
    hidden: Int,
    n_rows: Int,
    table_rows: Int,
    merge: Int,
    side: Int,
) raises:
    """Host entry point of the CPU path."""
    if side * side > table_rows:
        raise Error("qwen3vl_bilinear_pos_embed: num_grid_per_side**2 exceeds the table rows")
    # bands: (row base of frame, h, w, bh)
    var bands = List[Int]()
    var base = 0
    for g in range(G):
        var t = Int(grid[unsafe_offset=3 * g])
        var h = Int(grid[unsafe_offset=3 * g + 1])
        var w = Int(grid[unsafe_offset=3 * g + 2])
        if t < 0 or h <= 0 or w <= 0 or h % merge != 0 or w % merge != 0:
            raise Error("qwen3vl_bilinear_pos_embed: grid_thw entries need t >= 0 and h, w positive multiples of merge_size")
        for tt in range(t):
            for bh in range(h // merge):
                bands.append(base + tt * h * w)
                bands.append(h)
                bands.append(w)
                bands.append(bh)
        base += t * h * w
    if base != n_rows:
        raise Error("qwen3vl_bilinear_pos_embed: output rows != sum(t*h*w) of grid_thw")
    var nb = len(bands) // 4
    if nb == 0:
        return
    var bp = bands.unsafe_ptr()
    comptime W = simd_width_of[F32]()

    def band(b: Int) {var table, var o, var bp, var hidden, var merge, var side}:
        var row0 = bp[unsafe_offset=4 * b]
        var h = bp[unsafe_offset=4 * b + 1]
        var w = bp[unsafe_offset=4 * b + 2]
        var bh = bp[unsafe_offset=4 * b + 3]
        var wb = w // merge
        for mh in range(merge):
            var r = bh * merge + mh
            var ycoord = linspace_coord(r, h, side)
            var y0 = ycoord[0]
            var y1 = ycoord[1]
            var dy = ycoord[2]
            for bw in range(wb):
                for mw in range(merge):
                    var c = bw * merge + mw
                    var xcoord = linspace_coord(c, w, side)
                    var x0 = xcoord[0]
                    var x1 = xcoord[1]
                    var dx = xcoord[2]
                    var w00 = (1 - dy) * (1 - dx)
                    var w01 = (1 - dy) * dx
                    var w10 = dy * (1 - dx)
                    var w11 = dy * dx
                    var n = row0 + ((bh * wb + bw) * merge + mh) * merge + mw
                    var t00 = table.unsafe_offset((y0 * side + x0) * hidden)
                    var t01 = table.unsafe_offset((y0 * side + x1) * hidden)
                    var t10 = table.unsafe_offset((y1 * side + x0) * hidden)
                    var t11 = table.unsafe_offset((y1 * side + x1) * hidden)
                    var dst = o.unsafe_offset(n * hidden)
                    var x = 0
                    while x + W <= hidden:
                        var a = t00.unsafe_load[width=W](x).cast[F32]() * w00
                        var b2 = t01.unsafe_load[width=W](x).cast[F32]() * w01
                        var c2 = t10.unsafe_load[width=W](x).cast[F32]() * w10
                        var d2 = t11.unsafe_load[width=W](x).cast[F32]() * w11
                        dst.unsafe_store(x, ((a + b2) + c2) + d2)
                        x += W
                    while x < hidden:
                        var a = t00[unsafe_offset=x].cast[F32]() * w00
                        var b2 = t01[unsafe_offset=x].cast[F32]() * w01
                        var c2 = t10[unsafe_offset=x].cast[F32]() * w10
                        var d2 = t11[unsafe_offset=x].cast[F32]() * w11
                        dst[unsafe_offset=x] = ((a + b2) + c2) + d2
                        x += 1

    parallelize(band, nb)
    _ = bands^


# ----------------------------------------------------------------------------- GPU
comptime POS_THREADS = 256


def bilinear_pos_embed_gpu_kernel[tdtype: DType](
    table: Pointer[Scalar[tdtype], MutAnyOrigin],
    grid: Pointer[Int64, MutAnyOrigin],
    o: Pointer[Float32, MutAnyOrigin],
    G_arg: Int32,
    hidden_arg: Int32,
    merge_arg: Int32,
    side_arg: Int32,
):
    """One block per output row (block_idx.x = row n), POS_THREADS threads over hidden."""
    var hidden = Int(hidden_arg)
    var side = Int(side_arg)
    var n = Int(block_idx.x)
    var tid = Int(thread_idx.x)
    var idx = stack_allocation[4, DType.int32, address_space=AddressSpace.SHARED]()
    var wt = stack_allocation[4, F32, address_space=AddressSpace.SHARED]()
    if tid == 0:
        var m = Int(merge_arg)
        var base = 0
        var h = m
        var w = m
        var found = False
        for g in range(Int(G_arg)):
            var t = Int(grid[unsafe_offset=3 * g])
            var hg = Int(grid[unsafe_offset=3 * g + 1])
            var wg = Int(grid[unsafe_offset=3 * g + 2])
            if n < base + t * hg * wg:
                h = hg
                w = wg
                found = True
                break
            base += t * hg * wg
        var zero = not found   # row past sum(t*h*w) (wrong row count): write zeros
        if zero:
            base = n
        var rc = _decode_row(n - base, h, w, m)
        var yc = linspace_coord(rc[0], h, side)
        var xc = linspace_coord(rc[1], w, side)
        var dy = yc[2]
        var dx = xc[2]
        idx[unsafe_offset=0] = Int32(yc[0] * side + xc[0])
        idx[unsafe_offset=1] = Int32(yc[0] * side + xc[1])
        idx[unsafe_offset=2] = Int32(yc[1] * side + xc[0])
        idx[unsafe_offset=3] = Int32(yc[1] * side + xc[1])
        wt[unsafe_offset=0] = (1 - dy) * (1 - dx)
        wt[unsafe_offset=1] = (1 - dy) * dx
        wt[unsafe_offset=2] = dy * (1 - dx)
        wt[unsafe_offset=3] = dy * dx
        if zero:
            idx[unsafe_offset=0] = 0
            idx[unsafe_offset=1] = 0
            idx[unsafe_offset=2] = 0
            idx[unsafe_offset=3] = 0
            wt[unsafe_offset=0] = 0
            wt[unsafe_offset=1] = 0
            wt[unsafe_offset=2] = 0
            wt[unsafe_offset=3] = 0
    barrier()
    var t00 = table.unsafe_offset(Int(idx[unsafe_offset=0]) * hidden)
    var t01 = table.unsafe_offset(Int(idx[unsafe_offset=1]) * hidden)
    var t10 = table.unsafe_offset(Int(idx[unsafe_offset=2]) * hidden)
    var t11 = table.unsafe_offset(Int(idx[unsafe_offset=3]) * hidden)
    var w00 = wt[unsafe_offset=0]
    var w01 = wt[unsafe_offset=1]
    var w10 = wt[unsafe_offset=2]
    var w11 = wt[unsafe_offset=3]
    var dst = o.unsafe_offset(n * hidden)
    if hidden % 4 == 0:
        for x in range(tid * 4, hidden, POS_THREADS * 4):
            var a = t00.unsafe_load[width=4](x).cast[F32]() * w00
            var b = t01.unsafe_load[width=4](x).cast[F32]() * w01
            var c = t10.unsafe_load[width=4](x).cast[F32]() * w10
            var d = t11.unsafe_load[width=4](x).cast[F32]() * w11
            dst.unsafe_store(x, ((a + b) + c) + d)
    else:
        for x in range(tid, hidden, POS_THREADS):
            var a = t00[unsafe_offset=x].cast[F32]() * w00
            var b = t01[unsafe_offset=x].cast[F32]() * w01
            var c = t10[unsafe_offset=x].cast[F32]() * w10
            var d = t11[unsafe_offset=x].cast[F32]() * w11
            dst[unsafe_offset=x] = ((a + b) + c) + d


def bilinear_pos_embed_gpu[tdtype: DType](
    table: Pointer[Scalar[tdtype], MutAnyOrigin],
    grid: Pointer[Int64, MutAnyOrigin],
    o: Pointer[Float32, MutAnyOrigin],
    G: Int,
    hidden: Int,
    n_rows: Int,
    merge: Int,
    side: Int,
    ctx: DeviceContext,
) raises:
    """Launch the GPU path (device pointers); rows past sum(t*h*w) are written as zeros."""
    if n_rows == 0:
        return
    ctx.enqueue_function[bilinear_pos_embed_gpu_kernel[tdtype]](
        table, grid, o, Int32(G), Int32(hidden), Int32(merge), Int32(side),
        grid_dim=n_rows, block_dim=POS_THREADS,
    )


# ----------------------------------------------------------------------------- op
@extensibility.register("qwen3vl_bilinear_pos_embed")
struct BilinearPosEmbed:
    """MAX custom op "qwen3vl_bilinear_pos_embed"; merge_size / num_grid_per_side are compile-time."""

    @staticmethod
    def execute[target: StaticString, merge_size: Int, num_grid_per_side: Int](
        output: OutputTensor[dtype=DType.float32, rank=2, ...],
        table: InputTensor[rank=2, ...],
        grid_thw: InputTensor[dtype=DType.int64, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var hidden = table.dim_size(1)
        var G = grid_thw.dim_size(0)
        if grid_thw.dim_size(1) != 3:
            raise Error("qwen3vl_bilinear_pos_embed: grid_thw must be [G, 3]")
        if output.dim_size(1) != hidden:
            raise Error("qwen3vl_bilinear_pos_embed: output hidden != table hidden")
        if num_grid_per_side * num_grid_per_side > table.dim_size(0):
            raise Error("qwen3vl_bilinear_pos_embed: num_grid_per_side**2 exceeds the table rows")
        # the kernels index raw pointers: require dense row-major tensors
        var ts = table.strides()
        var gs = grid_thw.strides()
        var os = output.strides()
        if (hidden > 1 and (ts[1] != 1 or os[1] != 1)) or (table.dim_size(0) > 1 and ts[0] != hidden) or (
            output.dim_size(0) > 1 and os[0] != hidden) or gs[1] != 1 or (G > 1 and gs[0] != 3):
            raise Error("qwen3vl_bilinear_pos_embed: table, grid_thw and the output must be contiguous")
        comptime tdtype = table.dtype
        var tp = rebind[Pointer[Scalar[tdtype], MutAnyOrigin]](table.unsafe_ptr())
        var gp = rebind[Pointer[Int64, MutAnyOrigin]](grid_thw.unsafe_ptr())
        var op = rebind[Pointer[Float32, MutAnyOrigin]](output.unsafe_ptr())
        comptime if target == "cpu":
            bilinear_pos_embed_cpu[tdtype](
                tp, gp, op, G, hidden, output.dim_size(0), table.dim_size(0), merge_size, num_grid_per_side)
        else:
            bilinear_pos_embed_gpu[tdtype](
                tp, gp, op, G, hidden, output.dim_size(0), merge_size, num_grid_per_side, ctx)


@extensibility.register_shape_function("qwen3vl_bilinear_pos_embed")
def bilinear_pos_embed_shape(
    table: Some[TileTensorable], grid_thw: Some[TileTensorable]
) raises -> IndexList[2]:
    """[sum_g t*h*w, hidden], read from grid_thw's values (host memory)."""
    var g = grid_thw.to_tile_tensor()
    var n = 0
    for i in range(Int(g.dim[0]())):
        n += Int(g[i, 0]) * Int(g[i, 1]) * Int(g[i, 2])
    return IndexList[2](n, Int(table.to_tile_tensor().dim[1]()))
