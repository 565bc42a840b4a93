# Attention custom op shared by the vision encoder and the text decoder (CPU + GPU paths):
#   varlen_attention.mojo  "qwen3vl_varlen_attention"  attention inside cu_seqlens segments, optional
#                                                      causal mask and grouped-query heads (flash style)
# Python wrapper: qwen3vl_moe.kernels.attention. GPU check: bench/gpu/check_vision_attention.mojo.
