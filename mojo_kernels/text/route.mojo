import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext

from .contiguity import require_contiguous
from .routing import enqueue_route_gpu, route_cpu


@extensibility.register("qwen3vl_moe_route")
struct MoeRoute:
    """Router softmax + top-k + renormalisation, and the (token, k) slots sorted by expert.

        p[t, :]        = softmax(logits[t, :])                 (float32)
        v, ids[t, :]   = top_k(p[t, :])                        (descending; ties -> lower id)
        weights[t, k]  = (v[k] / sum_k v[k]).cast(dtype)        (float32 renormalisation, always)
        offsets[e]     = number of slots routed to experts < e  (offsets[0] = 0, offsets[E] = T*top_k)
        perm (flat)    = slots s = t*top_k + k sorted by expert, stable (slot order within an expert)

    Shapes: logits [T, E] float32/bfloat16 -> weights [T, top_k] (logits' dtype),
    ids [T, top_k] int32, perm [T, top_k] int32 (read flat: perm[p], p < T*top_k),
    offsets [E+1] int32, scratch [n] int32 (GPU: the per-chunk expert counts,
    n >= max(ceil(T*top_k / 256), 1) * E, allocated by the graph so that a call
    allocates nothing; CPU: unused, n may be 0). Compile-time parameter: top_k
    (1 <= top_k <= E). CPU: tokens in parallel, then a serial counting sort. GPU: one
    thread per token for the top-k, then per-chunk counts, a scan and a stable
    per-chunk scatter.
    """

    @staticmethod
    def execute[target: StaticString, top_k: Int](
        weights: OutputTensor[rank=2, ...],
        ids: OutputTensor[dtype=DType.int32, rank=2, ...],
        perm: OutputTensor[dtype=DType.int32, rank=2, ...],
        offsets: OutputTensor[dtype=DType.int32, rank=1, ...],
        scratch: OutputTensor[dtype=DType.int32, rank=1, ...],
        logits: InputTensor[dtype=weights.dtype, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        comptime dtype = weights.dtype
        comptime OP = "qwen3vl_moe_route"
        var T = logits.dim_size(0)
        var E = logits.dim_size(1)
        if top_k < 1 or top_k > E:
            raise Error("qwen3vl_moe_route: need 1 <= top_k <= num_experts")
        if offsets.dim_size(0) != E + 1:
            raise Error("qwen3vl_moe_route: offsets must have num_experts + 1 entries")
        if weights.dim_size(0) != T or weights.dim_size(1) != top_k or perm.dim_size(1) != top_k:
            raise Error("qwen3vl_moe_route: outputs must be [T, top_k]")
        require_contiguous(OP, "weights", weights.shape(), weights.strides())
        require_contiguous(OP, "ids", ids.shape(), ids.strides())
        require_contiguous(OP, "perm", perm.shape(), perm.strides())
        require_contiguous(OP, "offsets", offsets.shape(), offsets.strides())
        require_contiguous(OP, "logits", logits.shape(), logits.strides())
        comptime if target == "cpu":
            route_cpu[dtype, top_k](
                logits.unsafe_ptr(), weights.unsafe_ptr(), ids.unsafe_ptr(), perm.unsafe_ptr(),
                offsets.unsafe_ptr(), T, E,
            )
        else:
            require_contiguous(OP, "scratch", scratch.shape(), scratch.strides())
            enqueue_route_gpu[dtype, top_k](
                ctx, logits.unsafe_ptr(), weights.unsafe_ptr(), ids.unsafe_ptr(), perm.unsafe_ptr(),
                offsets.unsafe_ptr(), scratch.unsafe_ptr(), scratch.dim_size(0), T, E,
            )
