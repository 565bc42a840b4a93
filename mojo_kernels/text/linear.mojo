import extensibility
from extensibility import InputTensor, OutputTensor
from max.gpu.host import DeviceContext
from linalg.matmul import matmul

from .contiguity import require_contiguous
from .cpu_linear import linear_rows_cpu

# Up to this many rows a linear layer is a weight stream (decode); above it,
# MAX's packed GEMM (prefill), whose per-call packing of W is then amortised.
comptime GEMV_MAX_ROWS = 16


@extensibility.register("qwen3vl_linear")
struct Linear:
    """Computes y = x @ W^T with W in the checkpoint's [N, K] layout (no bias).

    MAX's CPU matmul packs (and, for W^T, transposes) the weight on every call;
    with few rows that copy costs as much as the product itself. Up to
    GEMV_MAX_ROWS rows this op streams W once, row by row, with float32
    accumulation; above, it calls MAX's matmul with transpose_b. CPU only: GPU
    graphs use MAX's matmul, which reads W^T in place.

    Shapes: y [M, N], x [M, K], w [N, K]; float32 or bfloat16 (all alike).
    """

    @staticmethod
    def execute[target: StaticString](
        y: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=y.dtype, rank=2, ...],
        w: InputTensor[dtype=y.dtype, rank=2, ...],
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
            linear_rows_cpu[y.dtype](y.unsafe_ptr(), x.unsafe_ptr(), w.unsafe_ptr(), M, N, K)
        else:
            matmul[transpose_b=True, target="cpu"](y.to_tile_tensor(), x.to_tile_tensor(), w.to_tile_tensor(), ctx)
