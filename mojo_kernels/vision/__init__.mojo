# Vision-encoder custom op for Qwen3-VL (MAX graph custom op, CPU + GPU paths):
#   bilinear_pos_embed.mojo  "qwen3vl_bilinear_pos_embed"  bilinearly interpolated learned position embedding
# The encoder's attention is "qwen3vl_varlen_attention" in mojo_kernels/attention.
# Python wrapper: qwen3vl_moe.kernels.vision. GPU check: bench/gpu/check_pos_embed.mojo.
