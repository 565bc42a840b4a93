# The expert MLP's activation, shared by the CPU (cpu_moe.mojo) and GPU (gpu_moe.mojo)
# paths so both round exactly like torch. Generic in the SIMD width: scalars are width 1.
from std.math import exp

comptime F32 = DType.float32


@always_inline
def silu(g: SIMD[F32, _]) -> type_of(g):
    return g / (1 + exp(-g))


@always_inline
def round_to[dtype: DType](v: SIMD[F32, _]) -> type_of(v):
    """Round a float32 value to `dtype` and back (identity for float32)."""
    comptime if dtype == F32:
        return v
    else:
        return v.cast[dtype]().cast[F32]()


@always_inline
def swiglu[dtype: DType](g: SIMD[F32, _], u: type_of(g)) -> type_of(g):
    """SwiGLU: h = silu(gate) * up with the rounding steps of torch in `dtype`.

    In bfloat16 transformers rounds the gate_up GEMM output, silu(gate) and the
    product to bf16 (each op computes in float32 and rounds its result).
    """
    var gr = round_to[dtype](g)
    var ur = round_to[dtype](u)
    return round_to[dtype](silu(gr)) * ur
