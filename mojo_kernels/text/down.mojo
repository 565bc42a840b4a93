from std.math import ceildiv

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext

from .contiguity import require_contiguous
from .cpu_moe import DN_PW, combine_cpu, down_cpu, down_panels_cpu
from .gpu_moe import enqueue_down_gpu


@extensibility.register("qwen3vl_moe_down")
struct MoeDown:
    """Grouped down GEMM with the routing weight and the un-permute fused, then the
    deterministic sum over the top-k slots of each token.

    For every sorted row p owned by expert e, with slot s = perm[p] = t*top_k + k:
        ws[t, k, :] = rw[t, k] * (h[p] @ Wd_e)        ([H]; float32 accumulation)
    then  y[t, :] = sum_{k=0..top_k-1} ws[t, k, :]   (float32 sum in top-k order)
    which is transformers' default grouped_mm combine. In bfloat16 the GEMM result and
    its product with the weight are rounded to bf16 (as torch does), the sum is float32
    rounded once.

    Shapes: y [T, H], ws [T, top_k, H] (same dtype as h; a workspace output),
    h [T, top_k, I] from `qwen3vl_moe_gate_up`, w = down weights:
        hub_layout=True  -> [E, I, H]  (out = h @ w[e])
        hub_layout=False -> [E, H, I]  (out = w[e] @ h)
    perm [T, top_k] int32, offsets [E+1] int32, rw [T, top_k] routing weights (h's dtype).
    On CPU w may be bfloat16 under float32 h (float32 accumulation); on GPU it has h's dtype.
    GPU: bf16 on tensor cores (mma.sync m16n8k16), float32 with a tiled FMA kernel.
    """

    @staticmethod
    def execute[target: StaticString, hub_layout: Bool](
        y: OutputTensor[rank=2, ...],
        ws: OutputTensor[dtype=y.dtype, rank=3, ...],
        h: InputTensor[dtype=y.dtype, rank=3, ...],
        w: InputTensor[rank=3, ...],
        perm: InputTensor[dtype=DType.int32, rank=2, ...],
        offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        rw: InputTensor[dtype=y.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = y.dtype
        comptime OP = "qwen3vl_moe_down"
        var T = y.dim_size(0)
        var H = y.dim_size(1)
        var top_k = h.dim_size(1)
        var I = h.dim_size(2)
        var E = w.dim_size(0)
        var w_k = w.dim_size(1) if hub_layout else w.dim_size(2)
        var w_n = w.dim_size(2) if hub_layout else w.dim_size(1)
        if w_k != I or w_n != H:
            raise Error("qwen3vl_moe_down: down weights do not match h [T, top_k, I] and y [T, H]")
        if h.dim_size(0) != T or perm.dim_size(0) != T or perm.dim_size(1) != top_k:
            raise Error("qwen3vl_moe_down: h and perm must be [T, top_k, ...]")
        if rw.dim_size(0) != T or rw.dim_size(1) != top_k:
            raise Error("qwen3vl_moe_down: routing weights must be [T, top_k]")
        if ws.dim_size(0) != T or ws.dim_size(1) != top_k or ws.dim_size(2) != H:
            raise Error("qwen3vl_moe_down: workspace must be [T, top_k, H]")
        if offsets.dim_size(0) != E + 1:
            raise Error("qwen3vl_moe_down: offsets must have num_experts + 1 entries")
        require_contiguous(OP, "y", y.shape(), y.strides())
        require_contiguous(OP, "the workspace", ws.shape(), ws.strides())
        require_contiguous(OP, "h", h.shape(), h.strides())
        require_contiguous(OP, "down weights", w.shape(), w.strides())
        require_contiguous(OP, "perm", perm.shape(), perm.strides())
        require_contiguous(OP, "offsets", offsets.shape(), offsets.strides())
        require_contiguous(OP, "routing weights", rw.shape(), rw.strides())
        if T == 0 or H == 0:
            return

        comptime if target == "cpu":
            if I == 0:
                for i in range(T * H):
                    y.unsafe_ptr()[unsafe_offset=i] = 0
                return
            down_cpu[dtype, w.dtype, hub_layout](
                ws.unsafe_ptr(), h.unsafe_ptr(), w.unsafe_ptr(), perm.unsafe_ptr(),
                offsets.unsafe_ptr(), rw.unsafe_ptr(), E, H, I,
            )
            combine_cpu[dtype](y.unsafe_ptr(), ws.unsafe_ptr(), T, top_k, H)
        else:
            comptime if w.dtype != dtype:
                raise Error("qwen3vl_moe_down: on GPU the expert weights must have h's dtype")
            else:
                enqueue_down_gpu[dtype, hub_layout](
                    ctx, y.unsafe_ptr(), ws.unsafe_ptr(), h.unsafe_ptr(),
                    rebind[Pointer[Scalar[dtype], MutAnyOrigin]](w.unsafe_ptr()),
                    perm.unsafe_ptr(), offsets.unsafe_ptr(), rw.unsafe_ptr(), T, top_k, E, H, I,
                )


@extensibility.register("qwen3vl_moe_down_panels")
struct MoeDownPanels:
    """The qwen3vl_moe_down op over down weights packed at load into column panels (CPU only).

    w: float32 [E, ceil(H/64), I, 64] or bfloat16 [E, ceil(H/64), ceil(I/2), 128]: panel j
    holds columns 64j ..< 64j+64 row by row (bfloat16: rows in k-pairs); see cpu_moe.mojo.
    Same results as the hub layout. At decode (up to 64 routed rows) one fork/join does
    the GEMM and the combine.
    """

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[rank=2, ...],
        ws: OutputTensor[dtype=y.dtype, rank=3, ...],
        h: InputTensor[dtype=y.dtype, rank=3, ...],
        w: InputTensor[rank=4, ...],
        perm: InputTensor[dtype=DType.int32, rank=2, ...],
        offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        rw: InputTensor[dtype=y.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime OP = "qwen3vl_moe_down_panels"
        comptime if target != "cpu" or (w.dtype != DType.float32 and w.dtype != DType.bfloat16):
            raise Error(OP + ": float32 or bfloat16 panel weights on CPU only")
        else:
            var T = y.dim_size(0)
            var H = y.dim_size(1)
            var top_k = h.dim_size(1)
            var I = h.dim_size(2)
            var E = w.dim_size(0)
            comptime PAIRS = 2 if w.dtype == DType.bfloat16 else 1
            if w.dim_size(1) != ceildiv(H, DN_PW) or w.dim_size(2) != ceildiv(I, PAIRS) or w.dim_size(3) != DN_PW * PAIRS:
                raise Error(OP + ": down panels do not match h [T, top_k, I] and y [T, H]")
            if h.dim_size(0) != T or perm.dim_size(0) != T or perm.dim_size(1) != top_k:
                raise Error(OP + ": h and perm must be [T, top_k, ...]")
            if rw.dim_size(0) != T or rw.dim_size(1) != top_k:
                raise Error(OP + ": routing weights must be [T, top_k]")
            if ws.dim_size(0) != T or ws.dim_size(1) != top_k or ws.dim_size(2) != H:
                raise Error(OP + ": workspace must be [T, top_k, H]")
            if offsets.dim_size(0) != E + 1:
                raise Error(OP + ": offsets must have num_experts + 1 entries")
            require_contiguous(OP, "y", y.shape(), y.strides())
            require_contiguous(OP, "the workspace", ws.shape(), ws.strides())
            require_contiguous(OP, "h", h.shape(), h.strides())
            require_contiguous(OP, "down panels", w.shape(), w.strides())
            require_contiguous(OP, "perm", perm.shape(), perm.strides())
            require_contiguous(OP, "offsets", offsets.shape(), offsets.strides())
            require_contiguous(OP, "routing weights", rw.shape(), rw.strides())
            if T == 0 or H == 0:
                return
            if I == 0:
                for i in range(T * H):
                    y.unsafe_ptr()[unsafe_offset=i] = 0
                return
            down_panels_cpu[y.dtype, w.dtype](
                y.unsafe_ptr(), ws.unsafe_ptr(), h.unsafe_ptr(), w.unsafe_ptr(), perm.unsafe_ptr(),
                offsets.unsafe_ptr(), rw.unsafe_ptr(), E, T, top_k, H, I,
            )
