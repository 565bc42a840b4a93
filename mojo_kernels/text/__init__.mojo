# Text-decoder custom ops (MAX graph custom ops; the MoE ops run on CPU and GPU, linear on CPU):
#   route.mojo    "qwen3vl_moe_route"    router softmax, top-k, renormalisation, slots sorted by expert
#   gate_up.mojo  "qwen3vl_moe_gate_up"  grouped gate_up GEMM with the SwiGLU epilogue
#   down.mojo     "qwen3vl_moe_down"     grouped down GEMM, routing weight, un-permute, sum over top-k
#   gate_up.mojo / down.mojo  "..._gate_up_panels", "..._down_panels": the same over experts packed at load
#                 into the CPU kernels' column panels (CPU only)
#   linear.mojo   "qwen3vl_linear"       y = x @ W^T in the checkpoint's layout (weight stream for few rows)
#   qkv.mojo      "qwen3vl_attention_qkv" an attention layer's q/k/v, q/k RMSNorm and rope in one op (CPU)
#   paged_attention.mojo  "qwen3vl_paged_attention"  causal attention over MAX's paged KV cache (CPU)
# Implementation, one concern a file:
#   contiguity.mojo         the ops' input check: every tensor dense row-major
#   routing.mojo            routing, CPU and GPU
#   activation.mojo         SiLU / SwiGLU with torch's rounding, CPU and GPU
#   cpu_microkernels.mojo   register-tile SIMD micro-kernels (outer, dot, bf16 pair-dot, packing)
#   cpu_scheduler.mojo      run_dynamic, the one CPU task scheduler
#   cpu_weight_stream.mojo  StreamPlan: experts with few rows stream their weights (decode)
#   cpu_moe.mojo            CPU drivers of the grouped GEMMs and the combine
#   cpu_linear.mojo         CPU dense linear for few rows
#   gpu_moe.mojo            GPU kernels of the grouped GEMMs and the combine
# Python wrappers: qwen3vl_moe.kernels.moe, .linear, .qkv and .paged_attention. GPU check: bench/gpu/check_moe.mojo.
