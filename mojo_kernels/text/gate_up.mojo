from std.math import ceildiv

import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext

from .contiguity import require_contiguous
from .cpu_moe import GU_PW, gate_up_cpu, gate_up_panels_cpu
from .gpu_moe import enqueue_gate_up_gpu


@extensibility.register("qwen3vl_moe_gate_up")
struct MoeGateUp:
    """Grouped gate_up GEMM of the routed rows with the SwiGLU epilogue fused.

    For every sorted row p (0 <= p < S = T*top_k) owned by expert e
    (offsets[e] <= p < offsets[e+1]) with token t = perm[p] // top_k:
        g = x[t] @ Wg_e,  u = x[t] @ Wu_e            (float32 accumulation)
        h[p, :] = silu(g) * u                        ([I], stored in x's dtype)
    Only [S, I] is written; the [S, 2I] gate_up product is never materialised.

    Shapes: h [T, top_k, I] (rows read flat, in sorted order), x [T, H],
    w = gate_up weights: hub_layout=True  -> [E, H, 2I]  (g_u = x @ w[e], gate = first I columns)
                         hub_layout=False -> [E, 2I, H]  (g_u = w[e] @ x, gate = first I rows)
    perm [T, top_k] int32 and offsets [E+1] int32 from `qwen3vl_moe_route`.
    dtype: float32 or bfloat16 (x and h alike); on CPU w may be bfloat16 under float32
    x (read as it is, float32 accumulation), on GPU it has x's dtype. In bfloat16, g, u, silu(g) and the
    product are rounded to bf16 like torch's ops. GPU: bf16 on tensor cores (mma.sync
    m16n8k16), float32 with a shared-memory tiled FMA kernel.
    """

    @staticmethod
    def execute[target: StaticString, hub_layout: Bool](
        h: OutputTensor[rank=3, ...],
        x: InputTensor[dtype=h.dtype, rank=2, ...],
        w: InputTensor[rank=3, ...],
        perm: InputTensor[dtype=DType.int32, rank=2, ...],
        offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = h.dtype
        comptime OP = "qwen3vl_moe_gate_up"
        var T = x.dim_size(0)
        var H = x.dim_size(1)
        var E = w.dim_size(0)
        var top_k = perm.dim_size(1)
        var I = h.dim_size(2)
        var w_k = w.dim_size(1) if hub_layout else w.dim_size(2)
        var w_n = w.dim_size(2) if hub_layout else w.dim_size(1)
        if w_k != H or w_n != 2 * I:
            raise Error("qwen3vl_moe_gate_up: gate_up weights do not match x [T, H] and h [T, top_k, I]")
        if perm.dim_size(0) != T or h.dim_size(0) != T or h.dim_size(1) != top_k:
            raise Error("qwen3vl_moe_gate_up: perm and h must be [T, top_k, ...]")
        if offsets.dim_size(0) != E + 1:
            raise Error("qwen3vl_moe_gate_up: offsets must have num_experts + 1 entries")
        require_contiguous(OP, "h", h.shape(), h.strides())
        require_contiguous(OP, "x", x.shape(), x.strides())
        require_contiguous(OP, "gate_up weights", w.shape(), w.strides())
        require_contiguous(OP, "perm", perm.shape(), perm.strides())
        require_contiguous(OP, "offsets", offsets.shape(), offsets.strides())
        var S = T * top_k
        if S == 0 or I == 0:
            return

        comptime if target == "cpu":
            gate_up_cpu[dtype, w.dtype, hub_layout](
                h.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), perm.unsafe_ptr(),
                offsets.unsafe_ptr(), E, top_k, H, I,
            )
        else:
            comptime if w.dtype != dtype:
                raise Error("qwen3vl_moe_gate_up: on GPU the expert weights must have x's dtype")
            else:
                enqueue_gate_up_gpu[dtype, hub_layout](
                    ctx, h.unsafe_ptr(), x.unsafe_ptr(), rebind[Pointer[Scalar[dtype], MutAnyOrigin]](w.unsafe_ptr()),
                    perm.unsafe_ptr(), offsets.unsafe_ptr(), T, top_k, E, H, I,
                )


@extensibility.register("qwen3vl_moe_gate_up_panels")
struct MoeGateUpPanels:
    """The qwen3vl_moe_gate_up op over gate_up weights packed at load into column panels (CPU only).

    w: float32 [E, ceil(I/32), H, 64] or bfloat16 [E, ceil(I/32), ceil(H/2), 128]: panel j
    holds gate columns 32j ..< 32j+32 and the same up columns, row by row (bfloat16: rows
    in k-pairs); see cpu_moe.mojo. Same results as the hub layout, without the per-task
    copy of each panel to scratch (a quarter of the MoE prefill time).
    """

    @staticmethod
    def execute[target: StaticString](
        h: OutputTensor[rank=3, ...],
        x: InputTensor[dtype=h.dtype, rank=2, ...],
        w: InputTensor[rank=4, ...],
        perm: InputTensor[dtype=DType.int32, rank=2, ...],
        offsets: InputTensor[dtype=DType.int32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        comptime OP = "qwen3vl_moe_gate_up_panels"
        comptime if target != "cpu" or (w.dtype != DType.float32 and w.dtype != DType.bfloat16):
            raise Error(OP + ": float32 or bfloat16 panel weights on CPU only")
        else:
            var T = x.dim_size(0)
            var H = x.dim_size(1)
            var E = w.dim_size(0)
            var top_k = perm.dim_size(1)
            var I = h.dim_size(2)
            comptime PAIRS = 2 if w.dtype == DType.bfloat16 else 1
            if w.dim_size(1) != ceildiv(I, GU_PW) or w.dim_size(2) != ceildiv(H, PAIRS) or w.dim_size(3) != 2 * GU_PW * PAIRS:
                raise Error(OP + ": gate_up panels do not match x [T, H] and h [T, top_k, I]")
            if perm.dim_size(0) != T or h.dim_size(0) != T or h.dim_size(1) != top_k:
                raise Error(OP + ": perm and h must be [T, top_k, ...]")
            if offsets.dim_size(0) != E + 1:
                raise Error(OP + ": offsets must have num_experts + 1 entries")
            require_contiguous(OP, "h", h.shape(), h.strides())
            require_contiguous(OP, "x", x.shape(), x.strides())
            require_contiguous(OP, "gate_up panels", w.shape(), w.strides())
            require_contiguous(OP, "perm", perm.shape(), perm.strides())
            require_contiguous(OP, "offsets", offsets.shape(), offsets.strides())
            if T * top_k == 0 or I == 0:
                return
            gate_up_panels_cpu[h.dtype, w.dtype](
                h.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), perm.unsafe_ptr(), offsets.unsafe_ptr(), E, top_k, H, I,
            )
