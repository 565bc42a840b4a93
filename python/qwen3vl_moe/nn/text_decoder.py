"""The Qwen3-VL text decoder over a paged KV cache (single device).

Its graph inputs are those of MAX's built-in Qwen3-VL language graph, in the
same order, so the built-in batch processor and tokenizer drive it unchanged:
tokens, return_n_logits, row offsets, image embeddings, deepstack embeddings,
image token indices, 3-D position ids, signal buffers, KV cache.
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
from max.nn import Embedding
from max.nn.kv_cache import KVCacheInputsPerDevice, KVCacheParamInterface, PagedCacheValues
from max.nn.layer import LayerList, Module
from max.nn.norm import RMSNorm
from max.nn.transformer import ReturnLogits
from max.nn.transformer.distributed_transformer import distributed_logits_postprocess
from max.pipelines.lib.interfaces.batch_processor import ragged_batch_inputs
from max.pipelines.lib.vlm_utils import merge_multimodal_embeddings

from ..model_config import ModelArgs, Qwen3VLConfig
from .attention import TextAttention
from .linear import StreamingLinear
from .mlp import DenseMLP, SparseMoE
from .rotary import InterleavedMRope


class TextDecoderLayer(Module):
    """Pre-norm attention and feed-forward (dense or MoE) with residuals."""

    def __init__(self, attention: TextAttention, mlp: Module, hidden_size: int, eps: float, dtype: DType) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, dtype, eps, multiply_before_cast=False)
        self.post_attention_layernorm = RMSNorm(hidden_size, dtype, eps, multiply_before_cast=False)

    def __call__(
        self, layer_idx, x, kv_collection, cos, sin, input_row_offsets, fresh_prefill, rows=None
    ) -> TensorValue:
        """``rows``: compute only these output rows after attention (see Qwen3VLTextDecoder)."""
        attn = self.self_attn(
            layer_idx, self.input_layernorm(x), kv_collection, cos, sin, input_row_offsets, fresh_prefill, rows
        )
        h = (x if rows is None else ops.gather(x, rows, axis=0)) + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3VLTextDecoder(Module):
    """Embedding, vision merge, decoder layers with deepstack adds, norm, lm_head."""

    def __init__(self, config: Qwen3VLConfig, args: ModelArgs, return_logits: ReturnLogits) -> None:
        super().__init__()
        if len(config.devices) != 1:
            raise ValueError(
                f"this Qwen3-VL implementation runs on one device; got {len(config.devices)}"
            )
        t = args.text
        device, dtype = config.devices[0], config.dtype
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
                mlp(i, sparse), t.hidden_size, t.rms_norm_eps, dtype,
            )
            for i, sparse in enumerate(t.sparse_layers)
        ])
        self.embed_tokens = Embedding(t.vocab_size, t.hidden_size, weight_dtype, device)
        self.norm = RMSNorm(t.hidden_size, dtype, t.rms_norm_eps, multiply_before_cast=False)
        self.lm_head = StreamingLinear(t.hidden_size, t.vocab_size, weight_dtype, device)
        if t.tie_word_embeddings:
            self.lm_head.set_shared_weight("weight", self.embed_tokens.weight)

    def input_tree(self, kv_params: KVCacheParamInterface) -> OrderedDict[str, object]:
        """The graph inputs by name; the leaves, in order, are the graph inputs."""
        device = self.devices[0]
        embeddings = TensorType(self.dtype, ["vision_merged_seq_len", self.hidden_size], device)
        return OrderedDict(
            batch=ragged_batch_inputs(device, ("tokens", "return_n_logits")),
            row_offsets=(TensorType(DType.uint32, ["input_row_offsets_len"], device),),
            image_embeddings=(embeddings,),
            deepstack_embeddings=tuple((embeddings,) for _ in range(self.num_deepstack_layers)),
            image_token_indices=(TensorType(DType.int32, ["total_image_tokens"], device),),
            position_ids=TensorType(DType.int64, [3, "total_seq_len"], DeviceRef.CPU()),
            signals=OrderedDict(signal=()),  # one device: no allreduce signals
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
            (kv_collection,) = tree.leaves(
                self.kv_params.unflatten_kv_inputs(remaining), leaf=KVCacheInputsPerDevice
            )
            return self(
                tokens=named["batch"]["tokens"].tensor,
                return_n_logits=named["batch"]["return_n_logits"].tensor,
                input_row_offsets=named["row_offsets"][0].tensor,
                image_embeddings=named["image_embeddings"][0].tensor,
                deepstack_embeddings=[layer[0].tensor for layer in named["deepstack_embeddings"]],
                image_token_indices=named["image_token_indices"][0].tensor,
                position_ids=named["position_ids"].tensor,
                signal_buffers=[v.buffer for v in named["signals"]["signal"]],
                kv_collection=kv_collection,
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
        input_row_offsets: TensorValue,
        image_embeddings: TensorValue,
        deepstack_embeddings: list[TensorValue],
        image_token_indices: TensorValue,
        position_ids: TensorValue,
        signal_buffers: list[BufferValue],
        kv_collection: PagedCacheValues,
    ) -> tuple[TensorValue, ...]:
        embedded = self.embed_tokens(tokens)
        if embedded.dtype != self.dtype:  # a bfloat16 table under float32 compute (exact)
            embedded = ops.cast(embedded, self.dtype)
        h = merge_multimodal_embeddings(embedded, image_embeddings, image_token_indices)
        cos, sin = self.rope.cos_sin(position_ids, self.devices[0])
        fresh_prefill = self._fresh_prefill(kv_collection)
        # Only each sequence's last token has its logits returned (serving): the last
        # layer computes those rows alone after attention, as llama.cpp does (a
        # prefill then skips 1/num_layers of the projection and MLP work).
        last_rows = input_row_offsets[1:] - 1 if self.return_logits == ReturnLogits.LAST_TOKEN else None
        for i, layer in enumerate(self.layers):
            layer_idx = ops.constant(i, DType.uint32, device=DeviceRef.CPU())
            rows = last_rows if i == len(self.layers) - 1 else None
            all_rows = h.shape
            h = layer(layer_idx, h, kv_collection, cos, sin, input_row_offsets, fresh_prefill, rows)
            if i < len(deepstack_embeddings):
                # Deepstack: vision features of level i join the residual
                # stream at the visual tokens after text layer i.
                zeros = ops.broadcast_to(ops.constant(0, h.dtype, h.device), all_rows)
                visual = merge_multimodal_embeddings(zeros, deepstack_embeddings[i], image_token_indices)
                h = h + (visual if rows is None else ops.gather(visual, rows, axis=0))
        if last_rows is not None:  # h holds the last rows already
            return (ops.cast(self.lm_head(self.norm(h)), DType.float32),)
        return distributed_logits_postprocess(
            [h],
            [input_row_offsets],
            return_n_logits,
            lm_head=lambda hs, _signals: [self.lm_head(x) for x in hs],
            signal_buffers=signal_buffers,
            return_logits=self.return_logits,
            device=self.devices[0],
            norm_shards=[self.norm],
        )
