"""The Qwen3-VL text decoder over a paged KV cache, on one device or tensor parallel over GPUs.

Its graph inputs are those of MAX's built-in Qwen3-VL language graph, in the
same order, so the built-in batch processor and tokenizer drive it unchanged:
tokens, return_n_logits, row offsets, image embeddings, deepstack embeddings,
image token indices, 3-D position ids, signal buffers, KV cache (the per-device
ones once per device). One difference: the position ids are on the first
device and relative to each sequence's KV cache length, which the graph adds
(``rotary.absolute_positions``); this package's batch processor
(``max_compat.Qwen3VLBatchProcessor``) builds them so.

Over N > 1 GPUs the layers are sharded as MAX's built-in Qwen3-VL shards them
(attention heads, the dense MLP's and every expert's intermediate dimension;
norms and the router replicated) with an allreduce through MAX's signal
buffers after o_proj and after the MLP/MoE; the embedding is MAX's
``VocabParallelEmbedding`` and lm_head its ``ColumnParallelLinear``. One
device (CPU or GPU) builds exactly the single-device graph: no signal buffers,
no collectives.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from max import tree
from max.dtype import DType
from max.graph import BufferValue, DeviceRef, Graph, TensorType, TensorValue, Type, Value, ops
from max.graph import Module as GraphModule
from max.graph import ShardingStrategy
from max.nn import Embedding
from max.nn.comm.allreduce import Allreduce
from max.nn.embedding import VocabParallelEmbedding
from max.nn.kv_cache import KVCacheInputsPerDevice, KVCacheParamInterface, PagedCacheValues
from max.nn.layer import LayerList, Module
from max.nn.norm import RMSNorm
from max.nn.transformer import ReturnLogits
from max.nn.linear import ColumnParallelLinear
from max.nn.transformer.distributed_transformer import distributed_logits_postprocess, forward_sharded_layers
from max.pipelines.lib.interfaces.batch_processor import ragged_batch_inputs, signal_inputs
from max.pipelines.lib.vlm_utils import merge_multimodal_embeddings

from ..model_config import ModelArgs, Qwen3VLConfig
from .attention import TextAttention
from .linear import StreamingLinear
from .mlp import DenseMLP, SparseMoE
from .rotary import InterleavedMRope, absolute_positions


class TextDecoderLayer(Module):
    """Pre-norm attention and feed-forward (dense or MoE) with residuals, per device.

    On one device the sublayers run as they are; over several GPUs each runs
    as its shards (``Module.shard``) and the partial sums of attention and MLP
    are all-reduced.
    """

    def __init__(
        self, attention: TextAttention, mlp: Module, hidden_size: int, eps: float, dtype: DType,
        devices: list[DeviceRef],
    ) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, dtype, eps, multiply_before_cast=False)
        self.post_attention_layernorm = RMSNorm(hidden_size, dtype, eps, multiply_before_cast=False)
        n = len(devices)
        # Plain lists: the weights load once, under the unsharded modules' names.
        self.attn_shards: list[Any] = [attention]
        self.mlp_shards: list[Any] = [mlp]
        self.input_norm_shards: list[Any] = [self.input_layernorm]
        self.post_norm_shards: list[Any] = [self.post_attention_layernorm]
        self.allreduce: Allreduce | None = None
        if n > 1:
            self.attn_shards = attention.shard(devices)
            self.mlp_shards = mlp.shard(devices)  # type: ignore[attr-defined]
            for norm in (self.input_layernorm, self.post_attention_layernorm):
                norm.sharding_strategy = ShardingStrategy.replicate(n)
            self.input_norm_shards = list(self.input_layernorm.shard(devices))
            self.post_norm_shards = list(self.post_attention_layernorm.shard(devices))
            self.allreduce = Allreduce(num_accelerators=n)

    def _reduce(self, partials: list[TensorValue], signal_buffers: list[BufferValue]) -> list[TensorValue]:
        return partials if self.allreduce is None else self.allreduce(partials, signal_buffers)

    def __call__(
        self, layer_idx, xs, kv_collections, cos, sin, input_row_offsets, fresh_prefill, signal_buffers, rows=None
    ) -> list[TensorValue]:
        """Per-device lists in and out. ``rows``: per device, compute only these output
        rows after attention (see Qwen3VLTextDecoder)."""
        normed = forward_sharded_layers(self.input_norm_shards, xs)
        attn = self._reduce([
            shard(layer_idx, normed[i], kv_collections[i], cos[i], sin[i], input_row_offsets[i], fresh_prefill,
                  None if rows is None else rows[i])
            for i, shard in enumerate(self.attn_shards)
        ], signal_buffers)
        hs = [
            (x if rows is None else ops.gather(x, rows[i], axis=0)) + a
            for i, (x, a) in enumerate(zip(xs, attn, strict=True))
        ]
        mlp = self._reduce(
            forward_sharded_layers(self.mlp_shards, forward_sharded_layers(self.post_norm_shards, hs)), signal_buffers
        )
        return [h + m for h, m in zip(hs, mlp, strict=True)]


class Qwen3VLTextDecoder(Module):
    """Embedding, vision merge, decoder layers with deepstack adds, norm, lm_head."""

    def __init__(self, config: Qwen3VLConfig, args: ModelArgs, return_logits: ReturnLogits) -> None:
        super().__init__()
        devices = list(config.devices)
        if len(devices) > 1 and any(d.is_cpu() for d in devices):
            raise ValueError(f"tensor parallelism runs over GPUs only; got devices {devices}")
        t = args.text
        device, dtype = devices[0], config.dtype
        # The matrices' storage dtype: bfloat16 under float32 compute on CPU (see ModelArgs).
        weight_dtype = args.text_weight_dtype or dtype
        self.devices = config.devices
        self.dtype = dtype
        self.hidden_size = t.hidden_size
        self.kv_params = config.llm_config.kv_params
        self.return_logits = return_logits
        self.num_deepstack_layers = len(args.vision.deepstack_visual_indexes)
        self.rope = InterleavedMRope(t.head_dim, t.rope_theta, list(t.mrope_section))

        # Text-decoder weights the adapter kept float8 (an FP8 checkpoint on a GPU; see nn/fp8).
        fp8_weights: frozenset[str] = getattr(config, "fp8_weights", frozenset())
        if fp8_weights and len(devices) > 1:
            raise ValueError(
                "FP8 checkpoints run on one GPU: tensor parallelism over float8 weights is not implemented"
            )

        def fp8(prefix: str, *names: str) -> frozenset[str]:
            return frozenset(n for n in names if f"{prefix}{n}.weight" in fp8_weights)

        def mlp(i: int, sparse: bool) -> Module:
            p = f"language_model.layers.{i}.mlp."
            if sparse:
                assert args.expert_layout is not None
                return SparseMoE(
                    hidden_size=t.hidden_size, num_experts=t.num_experts,
                    top_k=t.num_experts_per_tok, intermediate_size=t.moe_intermediate_size,
                    layout=args.expert_layout, weight_dtype=weight_dtype, device=device,
                    fp8_experts=f"{p}experts.gate_up_proj" in fp8_weights,
                )
            return DenseMLP(t.hidden_size, t.intermediate_size, weight_dtype, device,
                            fp8=fp8(p, "gate_proj", "up_proj", "down_proj"))

        self.layers = LayerList([
            TextDecoderLayer(
                TextAttention(
                    hidden_size=t.hidden_size, num_heads=t.num_heads,
                    num_kv_heads=t.num_kv_heads, head_dim=t.head_dim,
                    rms_norm_eps=t.rms_norm_eps, kv_params=self.kv_params,
                    dtype=dtype, weight_dtype=weight_dtype, device=device,
                    fp8=fp8(f"language_model.layers.{i}.self_attn.", "q_proj", "k_proj", "v_proj", "o_proj"),
                ),
                mlp(i, sparse), t.hidden_size, t.rms_norm_eps, dtype, devices,
            )
            for i, sparse in enumerate(t.sparse_layers)
        ])
        self.norm = RMSNorm(t.hidden_size, dtype, t.rms_norm_eps, multiply_before_cast=False)
        self.norm_shards: list[Any] = [self.norm]
        self.embed_tokens: Module
        self.lm_head: Module
        if len(devices) == 1:
            self.embed_tokens = Embedding(t.vocab_size, t.hidden_size, weight_dtype, device)
            self.lm_head = StreamingLinear(t.hidden_size, t.vocab_size, weight_dtype, device)
            if t.tie_word_embeddings:
                self.lm_head.set_shared_weight("weight", self.embed_tokens.weight)
        else:  # the built-in's: vocabulary split, allreduce / allgather over the devices
            self.embed_tokens = VocabParallelEmbedding(t.vocab_size, t.hidden_size, weight_dtype, devices)
            self.lm_head = ColumnParallelLinear(
                t.hidden_size, t.vocab_size, weight_dtype, devices,
                tied_weight=self.embed_tokens.weight if t.tie_word_embeddings else None,
            )
            self.norm.sharding_strategy = ShardingStrategy.replicate(len(devices))
            self.norm_shards = list(self.norm.shard(devices))

    def input_tree(self, kv_params: KVCacheParamInterface) -> OrderedDict[str, object]:
        """The graph inputs by name; the leaves, in order, are the graph inputs.

        Per-device inputs come once per device, as the built-in's; the signal
        buffers only over several devices (one device never all-reduces).
        """

        def per_device(dtype: DType, shape: list[int | str]) -> tuple[TensorType, ...]:
            return tuple(TensorType(dtype, shape, device) for device in self.devices)

        embeddings: list[int | str] = ["vision_merged_seq_len", self.hidden_size]
        return OrderedDict(
            batch=ragged_batch_inputs(self.devices[0], ("tokens", "return_n_logits")),
            row_offsets=per_device(DType.uint32, ["input_row_offsets_len"]),
            image_embeddings=per_device(self.dtype, embeddings),
            deepstack_embeddings=tuple(per_device(self.dtype, embeddings) for _ in range(self.num_deepstack_layers)),
            image_token_indices=per_device(DType.int32, ["total_image_tokens"]),
            # relative to each sequence's cache length, on the device: see rotary.absolute_positions
            position_ids=TensorType(DType.int64, [3, "total_seq_len"], self.devices[0]),
            signals=signal_inputs(list(self.devices)) if len(self.devices) > 1 else OrderedDict(signal=()),
            kv=kv_params.get_symbolic_inputs(),
        )

    def trace(
        self,
        *input_types: Type[Any],
        name: str | None = None,
        module: GraphModule | None = None,
        custom_extensions: Iterable[Path] = (),
        is_device_graph: bool = False,
    ) -> Graph:
        """Traces the decoder graph from :meth:`input_tree`'s leaves."""
        head = OrderedDict((k, v) for k, v in self.input_tree(self.kv_params).items() if k != "kv")
        head_treedef = tree.flatten(head)[1]

        def forward(*inputs: Value[Any]) -> tuple[TensorValue, ...]:
            remaining = iter(inputs)
            named = tree.unflatten(head_treedef, remaining, exact=False)
            kv_collections = tree.leaves(self.kv_params.unflatten_kv_inputs(remaining), leaf=KVCacheInputsPerDevice)
            return self(
                tokens=named["batch"]["tokens"].tensor,
                return_n_logits=named["batch"]["return_n_logits"].tensor,
                input_row_offsets=[v.tensor for v in named["row_offsets"]],
                image_embeddings=[v.tensor for v in named["image_embeddings"]],
                deepstack_embeddings=[[v.tensor for v in layer] for layer in named["deepstack_embeddings"]],
                image_token_indices=[v.tensor for v in named["image_token_indices"]],
                position_ids=named["position_ids"].tensor,
                signal_buffers=[v.buffer for v in named["signals"]["signal"]],
                kv_collections=kv_collections,
            )

        return Graph(
            type(self).__qualname__ if name is None else name,
            forward,
            input_types=input_types,
            custom_extensions=list(custom_extensions),
            module=module,
            is_device_graph=is_device_graph,
        )

    def _fresh_prefill(self, kv_collection: PagedCacheValues) -> TensorValue | None:
        """CPU: a scalar bool, true when every sequence of the step has an empty cache.

        Such a step's attention needs only its own keys (see nn/attention). None
        on GPU, where MAX's flash attention over the cache is used throughout.
        """
        if not self.devices[0].is_cpu():
            return None
        longest_cached = ops.max(kv_collection.cache_lengths, axis=0)
        return ops.reshape(ops.equal(longest_cached, ops.constant(0, DType.uint32, DeviceRef.CPU())), [])

    def __call__(
        self,
        *,
        tokens: TensorValue,
        return_n_logits: TensorValue,
        input_row_offsets: list[TensorValue],
        image_embeddings: list[TensorValue],
        deepstack_embeddings: list[list[TensorValue]],
        image_token_indices: list[TensorValue],
        position_ids: TensorValue,
        signal_buffers: list[BufferValue],
        kv_collections: list[PagedCacheValues],
    ) -> tuple[TensorValue, ...]:
        """Per-device inputs are lists (one entry per device); deepstack: per level, per device.

        ``position_ids``: [3, T] on the first device, each token's position
        minus its sequence's KV cache length.
        """
        sharded = len(self.devices) > 1
        if sharded:
            embedded = self.embed_tokens(tokens, signal_buffers)
        else:
            embedded = [self.embed_tokens(tokens)]
        if embedded[0].dtype != self.dtype:  # a bfloat16 table under float32 compute (exact)
            embedded = [ops.cast(e, self.dtype) for e in embedded]
        h = [
            merge_multimodal_embeddings(e, emb, idx)
            for e, emb, idx in zip(embedded, image_embeddings, image_token_indices, strict=True)
        ]
        positions = absolute_positions(position_ids, kv_collections[0].cache_lengths, input_row_offsets[0])
        cos, sin = zip(*(self.rope.cos_sin(positions, device) for device in self.devices))
        fresh_prefill = self._fresh_prefill(kv_collections[0])
        # Only each sequence's last token has its logits returned (serving): the last
        # layer computes those rows alone after attention, as llama.cpp does (a
        # prefill then skips 1/num_layers of the projection and MLP work).
        last_rows = (
            [offsets[1:] - 1 for offsets in input_row_offsets]
            if self.return_logits == ReturnLogits.LAST_TOKEN else None
        )
        for i, layer in enumerate(self.layers):
            layer_idx = ops.constant(i, DType.uint32, device=DeviceRef.CPU())
            rows = last_rows if i == len(self.layers) - 1 else None
            all_rows = h[0].shape
            h = layer(layer_idx, h, kv_collections, cos, sin, input_row_offsets, fresh_prefill, signal_buffers, rows)
            if i < len(deepstack_embeddings):
                # Deepstack: vision features of level i join the residual
                # stream at the visual tokens after text layer i.
                for d, (visual_d, idx) in enumerate(zip(deepstack_embeddings[i], image_token_indices, strict=True)):
                    zeros = ops.broadcast_to(ops.constant(0, h[d].dtype, h[d].device), all_rows)
                    visual = merge_multimodal_embeddings(zeros, visual_d, idx)
                    h[d] = h[d] + (visual if rows is None else ops.gather(visual, rows[d], axis=0))

        def lm_head(hs: list[TensorValue], signals: list[BufferValue]) -> list[TensorValue]:
            if sharded:
                return self.lm_head(hs, signals)
            return [self.lm_head(x) for x in hs]

        if last_rows is not None:  # h holds the last rows already
            return (ops.cast(lm_head(forward_sharded_layers(self.norm_shards, h), signal_buffers)[0], DType.float32),)
        return distributed_logits_postprocess(
            h,
            input_row_offsets,
            return_n_logits,
            lm_head=lm_head,
            signal_buffers=signal_buffers,
            return_logits=self.return_logits,
            device=self.devices[0],
            norm_shards=self.norm_shards,
        )
