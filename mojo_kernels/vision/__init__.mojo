# Vision-encoder custom ops for Qwen3-VL (MAX graph custom ops, CPU + GPU paths):
#   varlen_attention.mojo    "varlen_attention"    segment-local bidirectional attention (flash style)
#   bilinear_pos_embed.mojo  "bilinear_pos_embed"  bilinearly interpolated learned position embedding
# Python wrappers: qwen3vl_moe.kernels.vision. GPU checks: bench/gpu/check_vision_attention.mojo,
# bench/gpu/check_pos_embed.mojo.
