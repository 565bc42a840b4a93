# The float32 FMA peak of one CPU core: independent SIMD FMA chains, no memory.
#
#     mojo run bench/cpu_fma_peak.mojo     (with the venv's bin on PATH)
#
# Puts the GEMM rates of bench/e2e.py in proportion: AMD Zen 4 runs AVX-512 on
# 256-bit units (as fast per cycle as AVX2), Zen 5 has full 512-bit units
# (twice AVX2), so AVX-512 kernels (MAX's) gain over 256-bit ones only on the
# latter (torch's float32 matmul, oneMKL SGEMM, ran at about the 256-bit rate
# on the Zen 5 measured; see docs/STATUS.md).
from std.time import perf_counter_ns
from std.sys import simd_width_of

comptime W = simd_width_of[DType.float32]()


def rate[CHAINS: Int](iters: Int) -> Float64:
    """GFLOP/s of CHAINS independent FMA chains of W-wide vectors."""
    var acc = Array[SIMD[DType.float32, W], CHAINS](fill=SIMD[DType.float32, W](0.0))
    var a = SIMD[DType.float32, W](1.0000001)
    var b = SIMD[DType.float32, W](0.9999999)
    var t0 = perf_counter_ns()
    for _ in range(iters):
        comptime for i in range(CHAINS):
            acc[i] = acc[i].fma(a, b)
    var t1 = perf_counter_ns()
    var keep: Float32 = 0
    comptime for i in range(CHAINS):
        keep += acc[i].reduce_add()
    if keep == 0:  # keeps the loop alive; never true
        print(keep)
    return Float64(iters * CHAINS * W * 2) / Float64(t1 - t0)


def main():
    var best: Float64 = 0
    for _ in range(3):
        best = max(best, rate[12](50_000_000), rate[24](25_000_000))
    print("float32 SIMD width", W, "- one core FMA peak:", Int(best), "GFLOP/s")
