"""Text self-attention: q/k RMSNorm per head, MRoPE, GQA over MAX's paged KV cache.

Every step writes k/v to the paged cache. On CPU, a step whose sequences all
start from an empty cache (a fresh prefill) attends with this package's causal
varlen kernel over the step's own k/v (no cache reads, 2x+ MAX's CPU
flash_attention_ragged at 512 tokens); any other step (decode, or a prefill
after a cached prefix) attends over the cache with this package's paged
kernel (``kernels.paged_attention``). On GPU, MAX's
flash_attention_ragged over the cache always.

On CPU with float32 activations, q/k/v, their RMSNorm and rope are one op
(``kernels.qkv``: one fork/join of the workers instead of seven kernels);
GPU, FP8 and the tensor-parallel shards keep the separate ops.

Tensor parallel (:meth:`TextAttention.shard`, as MAX's built-in Qwen3-VL):
each device holds whole heads, ``num_heads / N`` query heads and
``num_kv_heads / N`` KV heads (q/k/v split by rows, o_proj by the matching
columns), so its o_proj output is a partial sum the decoder all-reduces.
"""

from __future__ import annotations

from collections.abc import Sequence

from max.dtype import DType
from max.graph import DeviceRef, ShardingStrategy, TensorType, TensorValue, ops
from max.nn.attention import MHAMaskVariant
from max.nn.kernels import flash_attention_ragged, store_k_cache_ragged, store_v_cache_ragged
from max.nn.kv_cache import KVCacheParams, PagedCacheValues
from max.nn.layer import Module
from max.nn.norm import RMSNorm

from ..kernels.attention import varlen_attention
from ..kernels.paged_attention import paged_attention
from ..kernels.qkv import attention_qkv
from .linear import StreamingLinear, shard_linear
from .mlp import text_linear
from .rotary import apply_rotary


class TextAttention(Module):
    """Qwen3-VL text attention (no biases; q_norm/k_norm before rope)."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rms_norm_eps: float,
        kv_params: KVCacheParams,
        dtype: DType,
        weight_dtype: DType,
        device: DeviceRef,
        fp8: frozenset[str] = frozenset(),
    ) -> None:
        """``fp8``: the projections whose weights are float8 (GPU only; see nn/fp8)."""
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.hidden_size, self.rms_norm_eps, self.dtype = hidden_size, rms_norm_eps, dtype
        self.kv_params = kv_params
        self.q_proj = text_linear(hidden_size, num_heads * head_dim, weight_dtype, device, "q_proj" in fp8)
        self.k_proj = text_linear(hidden_size, num_kv_heads * head_dim, weight_dtype, device, "k_proj" in fp8)
        self.v_proj = text_linear(hidden_size, num_kv_heads * head_dim, weight_dtype, device, "v_proj" in fp8)
        self.o_proj = text_linear(num_heads * head_dim, hidden_size, weight_dtype, device, "o_proj" in fp8)
        # transformers normalises in float32, casts, then multiplies by the weight.
        self.q_norm = RMSNorm(head_dim, dtype, rms_norm_eps, multiply_before_cast=False)
        self.k_norm = RMSNorm(head_dim, dtype, rms_norm_eps, multiply_before_cast=False)

    def __call__(
        self,
        layer_idx: TensorValue,
        x: TensorValue,
        kv_collection: PagedCacheValues,
        cos: TensorValue,
        sin: TensorValue,
        input_row_offsets: TensorValue,
        fresh_prefill: TensorValue | None = None,
        rows: TensorValue | None = None,
    ) -> TensorValue:
        """``fresh_prefill``: scalar bool (CPU), true when no sequence has cached tokens.
        ``rows``: when given, only these rows' outputs are projected and returned (every
        row's k/v still enters the cache)."""
        q, k, v = self._qkv(x, cos, sin)
        cache_dtype = self.kv_params.dtype
        if x.device.is_cpu() and cache_dtype != k.dtype:
            # A cache narrower than the compute dtype (``kv_cache_format="bfloat16"``): k/v
            # are rounded into it, and a fresh prefill attends to the rounded values, as
            # every later step does through the cache.
            k_cached, v_cached = ops.cast(k, cache_dtype), ops.cast(v, cache_dtype)
            k, v = ops.cast(k_cached, k.dtype), ops.cast(v_cached, v.dtype)
        else:
            k_cached, v_cached = k, v
        store_k_cache_ragged(kv_collection, k_cached, input_row_offsets, layer_idx)
        store_v_cache_ragged(kv_collection, v_cached, input_row_offsets, layer_idx)
        scale = self.head_dim**-0.5

        def over_cache() -> TensorValue:
            if q.device.is_cpu():
                return paged_attention(
                    q, kv_collection.kv_blocks, kv_collection.lookup_table, kv_collection.cache_lengths,
                    input_row_offsets, layer_idx, scale=scale,
                )
            return flash_attention_ragged(
                self.kv_params,
                input=q,
                input_row_offsets=input_row_offsets,
                kv_collection=kv_collection,
                layer_idx=layer_idx,
                mask_variant=MHAMaskVariant.CAUSAL_MASK,
                scale=scale,
            )

        if fresh_prefill is None:
            out = over_cache()
        else:
            out = ops.cond(
                fresh_prefill,
                [TensorType(q.dtype, q.shape, q.device)],
                lambda: varlen_attention(q, k, v, input_row_offsets, scale=scale, causal=True),
                over_cache,
            )[0]
        out = ops.reshape(out, [-1, self.num_heads * self.head_dim])
        return self.o_proj(out if rows is None else ops.gather(out, rows, axis=0))

    def _qkv(self, x: TensorValue, cos: TensorValue, sin: TensorValue) -> tuple[TensorValue, ...]:
        """q and k normalised and rotated, and v, each [T, heads, head_dim]."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        per_head = ([-1, self.num_heads, self.head_dim], [-1, self.num_kv_heads, self.head_dim])
        if x.dtype == DType.float32 and all(
            isinstance(p, StreamingLinear) and p.runs_cpu_op(x) for p in projections
        ):
            q, k, v = attention_qkv(
                x, *(p.weight for p in projections), self.q_norm.weight.cast(x.dtype),
                self.k_norm.weight.cast(x.dtype), cos, sin, eps=self.rms_norm_eps,
            )
            return ops.reshape(q, per_head[0]), ops.reshape(k, per_head[1]), ops.reshape(v, per_head[1])
        q = self.q_norm(ops.reshape(self.q_proj(x), per_head[0]))
        k = self.k_norm(ops.reshape(self.k_proj(x), per_head[1]))
        v = ops.reshape(self.v_proj(x), per_head[1])
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def shard(self, devices: Sequence[DeviceRef]) -> list[TextAttention]:
        """One attention per device over its share of the heads (MAX's built-in split).

        The KV heads must divide by the device count (MAX's KV cache params
        refuse otherwise); the q/k norms are replicated.
        """
        n = len(devices)
        if self.num_heads % n or self.num_kv_heads % n:
            raise ValueError(
                f"tensor parallel over {n} devices needs the attention heads ({self.num_heads}) and "
                f"KV heads ({self.num_kv_heads}) to divide by {n}"
            )
        rows = ShardingStrategy.rowwise(n)
        q, k, v = (shard_linear(p, rows, devices) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = shard_linear(
            self.o_proj, ShardingStrategy.head_aware_columnwise(n, self.num_heads, self.head_dim), devices
        )
        norms = []
        for norm in (self.q_norm, self.k_norm):
            norm.sharding_strategy = ShardingStrategy.replicate(n)
            norms.append(norm.shard(devices))
        shards = []
        for i, device in enumerate(devices):
            shard = TextAttention(
                hidden_size=self.hidden_size, num_heads=self.num_heads // n,
                num_kv_heads=self.num_kv_heads // n, head_dim=self.head_dim,
                rms_norm_eps=self.rms_norm_eps, kv_params=self.kv_params,
                dtype=self.dtype, weight_dtype=self.q_proj.weight.dtype, device=device,
            )
            shard.q_proj, shard.k_proj, shard.v_proj, shard.o_proj = q[i], k[i], v[i], o[i]
            shard.q_norm, shard.k_norm = norms[0][i], norms[1][i]
            shards.append(shard)
        return shards
