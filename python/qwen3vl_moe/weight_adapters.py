"""Hugging Face checkpoint -> graph weight names, with strict shape checks.

Checkpoint names are kept, minus the HF wrapper prefixes:
``model.language_model.*`` -> ``language_model.*``, ``lm_head.*`` ->
``language_model.lm_head.*``, ``model.visual.*`` -> ``vision_encoder.*``.

Fused expert tensors exist in two layouts: the original release on disk
(``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) and transformers'
in-memory layout that ``save_pretrained`` writes (``[E, 2I, H]``,
``[E, H, I]``). The layout is read off the shapes against the config's dims;
when the dims make the two layouts identical (H == 2I or H == I) the
checkpoint is rejected instead of guessed.

Experts stored per expert (``experts.{e}.gate_proj/up_proj/down_proj.weight``,
as Qwen's FP8 releases store them) are merged one layer at a time, as
transformers merges them for Qwen3-MoE: gate then up (``[E, 2I, H]``), down
stacked (``[E, H, I]``). Float8 experts stay float8 on a GPU (bits and block
scales merged, in that layout, which MAX's grouped FP8 matmul reads) where I
and H are whole 128-blocks; elsewhere each expert is dequantized, merged and
stored in the hub layout, so the graph is the fused release's own.

On CPU (``cpu_expert_panels``) float32 and bfloat16 fused experts are then packed,
one layer at a time, into the column panels the CPU MoE kernels read
(``kernels.moe.pack_expert_panels``); the graph's layout is then ``"cpu_panels"``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from max.driver import Buffer
from max.dtype import DType
from max.graph import Shape
from max.graph.weights import WeightData, Weights

from .checkpoints.layout import (
    PER_EXPERT_PROJS,
    ExpertLayout,
    as_config_dict,
    checkpoint_layout,
    expert_storage_of,
    is_moe_layer,
    text_dims,
)
from .checkpoints.validate import CheckpointError
from .kernels.moe import pack_expert_panels

if TYPE_CHECKING:
    from .nn.mlp import ExpertsLayout

# A child of MAX's pipeline logger, so `max serve` prints it with its own lines.
logger = logging.getLogger("max.pipelines.qwen3vl_moe")

_PREFIXES = (
    ("model.language_model.", "language_model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.visual.", "vision_encoder."),
)


def graph_name(checkpoint_name: str) -> str:
    """The graph's name for a checkpoint tensor name."""
    for before, after in _PREFIXES:
        if checkpoint_name.startswith(before):
            return after + checkpoint_name[len(before):]
    raise CheckpointError(
        f"unexpected tensor {checkpoint_name!r}: not under model.language_model., "
        "model.visual. or lm_head. (is this a Qwen3-VL checkpoint?)"
    )


_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def _expected_shapes(huggingface_config: Any) -> dict[str, tuple[int, ...]]:
    """Graph name -> shape of every tensor the config implies, experts aside (their layout is read off)."""
    return {
        graph_name(name): spec.shape
        for name, spec in checkpoint_layout(huggingface_config).items()
        if not name.endswith(_EXPERTS)
    }


def _sparse_layers(huggingface_config: Any) -> list[int]:
    config = as_config_dict(huggingface_config)
    return [i for i in range(text_dims(config)["layers"].size) if is_moe_layer(config, i)]


def _expert_shapes(huggingface_config: Any) -> dict[ExpertLayout, tuple[tuple[int, ...], tuple[int, ...]]]:
    """(gate_up, down) shapes of one layer's fused experts in each layout (the same for every sparse layer)."""
    layer = _sparse_layers(huggingface_config)[0]
    return {
        layout: tuple(  # type: ignore[misc]
            checkpoint_layout(huggingface_config, expert_layout=layout)[
                f"model.language_model.layers.{layer}.{part}"
            ].shape
            for part in _EXPERTS
        )
        for layout in ("hub", "transformers")
    }


def _expert_layout(
    name: str, gate_up: tuple[int, ...], down: tuple[int, ...], huggingface_config: Any,
    shapes: dict[ExpertLayout, tuple[tuple[int, ...], tuple[int, ...]]],
) -> ExpertLayout:
    """Which fused-expert layout the shapes of one layer's experts are in."""
    matches = [layout for layout, expected in shapes.items() if expected == (gate_up, down)]
    if len(matches) == 1:
        return matches[0]  # type: ignore[return-value]
    dims = text_dims(as_config_dict(huggingface_config))
    if len(matches) == 2:
        raise CheckpointError(
            f"{name}: hidden_size={dims['hidden'].size} and moe_intermediate_size="
            f"{dims['moe_intermediate'].size} make the hub and transformers expert "
            "layouts the same shape, so the layout cannot be told apart"
        )
    hub, mem = shapes["hub"], shapes["transformers"]
    raise CheckpointError(
        f"{name}: experts gate_up_proj {list(gate_up)} / down_proj {list(down)} "
        f"match neither the hub layout {list(hub[0])} / {list(hub[1])} nor the "
        f"transformers layout {list(mem[0])} / {list(mem[1])}"
    )


class _Fp8Weights:
    """A fine-grained FP8 checkpoint's scales, and the dequantization of its float8 weights.

    The ``quantization_config`` decides everything (``quant_method: fp8``,
    ``weight_block_size``, ``modules_to_not_convert``); a float8 weight
    without its ``<name>_scale_inv``, a scale without its float8 weight, or a
    float8 weight in a module the config leaves unquantized is a problem
    reported with the others.
    """

    def __init__(self, scales: dict[str, Weights], config: Mapping[str, Any] | None, problems: list[str]) -> None:
        self.scales = scales  # scale tensor name -> its weights entry
        self.config = config or {}
        self.problems = problems
        self.block = tuple(self.config.get("weight_block_size") or (128, 128))
        self.dequantized = 0
        self.kept = 0

    @classmethod
    def of(cls, state_dict: Mapping[str, Weights], huggingface_config: Any) -> _Fp8Weights:
        config = getattr(huggingface_config, "quantization_config", None)
        if config is not None and not isinstance(config, Mapping):
            config = config.to_dict()
        scales = {n: w for n, w in state_dict.items() if n.endswith("_scale_inv")}
        problems: list[str] = []
        for scale in sorted(scales):
            if scale[: -len("_scale_inv")] not in state_dict:
                problems.append(f"unexpected tensor {scale}: no {scale[: -len('_scale_inv')]} to scale")
        if scales or (config and config.get("quant_method") == "fp8"):
            if not config or config.get("quant_method") != "fp8":
                problems.append(
                    "the checkpoint has *_scale_inv tensors but config.json's quantization_config "
                    f"is {config!r}, not quant_method 'fp8'"
                )
            elif config.get("fmt", "e4m3") != "e4m3" or config.get("activation_scheme", "dynamic") != "dynamic":
                problems.append(
                    "config.json quantization_config: only fmt 'e4m3' with activation_scheme "
                    f"'dynamic' is supported, got fmt {config.get('fmt')!r}, activation_scheme "
                    f"{config.get('activation_scheme')!r}"
                )
            block = config.get("weight_block_size") if config else None
            if block is not None and (len(block) != 2 or min(block) <= 0):
                problems.append(f"config.json quantization_config.weight_block_size {block!r} is not two positive ints")
        return cls(scales, config, problems)

    def _scale(self, name: str, data: WeightData) -> np.ndarray | None:
        """The float32 ``weight_scale_inv`` of the float8 tensor ``name``, checked (None, and a problem, if wrong)."""
        from .checkpoints.fp8 import is_not_converted

        scale = self.scales.get(name + "_scale_inv")
        skip = self.config.get("modules_to_not_convert")
        if is_not_converted(name, skip):
            self.problems.append(
                f"tensor {name} is float8_e4m3fn but config.json's quantization_config."
                f"modules_to_not_convert {skip} leaves its module unquantized"
            )
        if scale is None:
            self.problems.append(f"tensor {name} is float8_e4m3fn but {name}_scale_inv is missing")
            return None
        scale_data = scale.data()
        if scale_data.dtype != DType.float32:
            scale_data = _cast(scale_data, DType.float32)
        values = _numpy(scale_data)
        shape = [int(d) for d in data.shape]
        want = [*shape[:-2], *(-(-n // b) for n, b in zip(shape[-2:], self.block))]
        if list(values.shape) != want:
            self.problems.append(
                f"tensor {name}_scale_inv: weight_scale_inv has shape {list(values.shape)}, expected {want} "
                f"for a {shape} weight in {list(self.block)} blocks"
            )
            return None
        return values

    def dequantize(self, name: str, data: WeightData) -> WeightData:
        """The float32 values of the float8 tensor ``name`` (a placeholder if it cannot be)."""
        from .checkpoints.fp8 import dequantize_blockwise

        shape = [int(d) for d in data.shape]
        scale = self._scale(name, data)
        if scale is None:
            return WeightData.from_numpy(np.zeros(shape, np.float32), name)
        self.dequantized += 1
        return WeightData.from_numpy(dequantize_blockwise(_bits(data), scale, self.block), name)

    def keep(self, name: str, data: WeightData, scale_name: str) -> WeightData | None:
        """On a GPU: the float32 scales of a float8 tensor kept as it is, or None (then dequantize).

        Kept: the text decoder's projections and fused experts (``_FP8_ON_GPU``)
        in 128x128 blocks whose dims are whole blocks: what MAX's blockwise FP8
        kernels take (``nn/fp8``). The rest (vision, router, embedding, lm_head,
        other block sizes, ragged dims) is dequantized and runs in bfloat16.
        """
        from .nn.fp8 import BLOCK, fp8_block_shape_fits

        shape = [int(d) for d in data.shape]
        if (not name.endswith(_FP8_ON_GPU) or not name.startswith("model.language_model.layers.")
                or self.block != (BLOCK, BLOCK) or not fp8_block_shape_fits(*shape[-2:])):
            return None
        scale = self._scale(name, data)
        if scale is None:
            return None
        self.kept += 1
        return WeightData.from_numpy(np.ascontiguousarray(scale), scale_name)


# What the GPU runs in FP8 (nn/fp8): attention and dense-MLP projections, fused experts.
_FP8_ON_GPU = (
    *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    *_EXPERTS,
)


def convert_qwen3vl_model_state_dict(
    state_dict: Mapping[str, Weights],
    huggingface_config: Any,
    dtype: DType | None = None,
    keep_bfloat16_matrices: bool = False,
    cpu_expert_panels: bool = False,
    **unused_kwargs: Any,
) -> dict[str, WeightData]:
    """Renames, checks and (optionally) casts a Qwen3-VL checkpoint.

    Every tensor the config implies must be present with its exact shape, and
    nothing else may be; errors name the tensor, the expected and the actual
    shape. Floating-point tensors are cast to ``dtype`` when given, except,
    with ``keep_bfloat16_matrices`` (CPU float32 models), the text decoder's
    matrices when all of them are bfloat16: the CPU kernels read those as they
    are and compute in float32, so a decode step reads half the bytes and the
    results equal the upcast model's up to float32 summation order.
    ``cpu_expert_panels`` (CPU models): fused float32/bfloat16 experts packed into
    the CPU kernels' column panels (see the module docstring).

    Returns:
        Graph-named weights (``language_model.*`` and ``vision_encoder.*``).
    """
    del unused_kwargs
    tied = bool(getattr(huggingface_config, "tie_word_embeddings", False))
    expected = _expected_shapes(huggingface_config)
    # The float8_e4m3fn encoding (MAX allows it on GPUs only): compute in bfloat16, keep
    # the float8 matrices MAX's blockwise FP8 kernels take (nn/fp8) with their scales.
    fp8_gpu = dtype == DType.float8_e4m3fn
    if fp8_gpu:
        dtype = DType.bfloat16

    fp8 = _Fp8Weights.of(state_dict, huggingface_config)
    weights: dict[str, WeightData] = {}
    float8: set[str] = set()  # graph names of the float8 tensors kept, and of their scales
    casts: Counter[str] = Counter()
    per_expert, mixed = _per_expert_layers(state_dict, fp8)
    merged = {name for tensors in per_expert.values() for name in tensors}
    for checkpoint_name, weight in state_dict.items():
        if checkpoint_name in fp8.scales or checkpoint_name in merged:
            continue  # folded into its weight below; per-expert tensors are merged by layer
        name = graph_name(checkpoint_name)
        if tied and name == "language_model.lm_head.weight":
            continue  # tied checkpoints may still carry a copy; the embedding wins
        data = weight.data()
        if data.dtype == DType.float8_e4m3fn:
            scale = fp8.keep(checkpoint_name, data, name + "_scale_inv") if fp8_gpu else None
            if scale is None:
                data = fp8.dequantize(checkpoint_name, data)
            else:
                weights[name + "_scale_inv"] = scale
                expected[name + "_scale_inv"] = tuple(int(d) for d in scale.shape)
                float8 |= {name, name + "_scale_inv"}
        weights[name] = data
    for layer, tensors in per_expert.items():
        if layer not in mixed:
            _merge_per_expert_layer(layer, tensors, huggingface_config, fp8, fp8_gpu, weights, float8, expected)
    kept = _bfloat16_text_matrices(weights) if keep_bfloat16_matrices and dtype == DType.float32 else set()
    for name, data in weights.items():
        if (dtype is not None and data.dtype.is_float() and data.dtype != dtype and name not in kept
                and name not in float8):
            casts[data.dtype.name] += 1
            weights[name] = _cast(data, dtype)
    if fp8.kept:
        logger.info(
            "Qwen3-VL weights: %d float8_e4m3fn text-decoder tensors kept in float8 with their %s-block "
            "weight_scale_inv for MAX's blockwise FP8 matmuls (activations quantized per token per 128 "
            "columns at run time)", fp8.kept, "x".join(map(str, fp8.block)),
        )
    if fp8.dequantized:
        logger.info(
            "Qwen3-VL weights: %d float8_e4m3fn tensors dequantized at load with their %s-block "
            "weight_scale_inv (%s)",
            fp8.dequantized, "x".join(map(str, fp8.block)),
            "vision, router, embedding or lm_head, or dims that are not whole 128x128 blocks: "
            "MAX's FP8 kernels are not used for them" if fp8_gpu else "this device runs no FP8 matmul here",
        )
    if casts:
        kept_note = (
            f"; the {len(kept)} text-decoder matrices stay bfloat16 (the CPU kernels read them as they "
            "are and compute in float32: half the bytes per decode step)" if kept else ""
        )
        logger.info(
            "Qwen3-VL weights: %s cast to %s at load, the dtype the model computes in "
            "(float32 on CPU unless --quantization-encoding says otherwise)%s",
            ", ".join(f"{n} {d} tensors" for d, n in sorted(casts.items())), dtype.name, kept_note,
        )

    problems: list[str] = list(fp8.problems)
    layouts: set[ExpertLayout] = set()
    sparse_layers = _sparse_layers(huggingface_config)
    shapes = _expert_shapes(huggingface_config) if sparse_layers else {}
    for i in sparse_layers:
        p = f"language_model.layers.{i}.mlp.experts."
        gu, dn = weights.get(p + "gate_up_proj"), weights.get(p + "down_proj")
        if gu is None or dn is None:
            problems.append(f"missing tensor {p}gate_up_proj / {p}down_proj (layer {i} is MoE)")
            continue
        layouts.add(_expert_layout(p[:-1], tuple(gu.shape), tuple(dn.shape), huggingface_config, shapes))
        expected[p + "gate_up_proj"] = tuple(gu.shape)
        expected[p + "down_proj"] = tuple(dn.shape)
    if len(layouts) > 1:
        problems.append("experts of different layers use different layouts")

    for name, shape in expected.items():
        if name not in weights:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif tuple(int(d) for d in weights[name].shape) != shape:
            problems.append(
                f"tensor {name} has shape {[int(d) for d in weights[name].shape]}, "
                f"expected {list(shape)}"
            )
    for name in sorted(set(weights) - set(expected)):
        problems.append(f"unexpected tensor {name} (shape {[int(d) for d in weights[name].shape]})")
    if problems:
        raise CheckpointError(
            "checkpoint does not match its config:\n  " + "\n  ".join(problems)
        )
    _fp8_experts_as_kernels_take_them(weights, float8, sparse_layers, layouts)
    if cpu_expert_panels:
        _experts_as_cpu_panels(weights, sparse_layers, layouts)
    patch = "vision_encoder.patch_embed.proj.weight"
    weights[patch] = _conv_as_linear(weights[patch])
    return weights


def _per_expert_layers(
    state_dict: Mapping[str, Weights], fp8: _Fp8Weights,
) -> tuple[dict[int, dict[str, Weights]], set[int]]:
    """The per-expert tensors (scales aside) of each layer that has them, and the layers that mix storages.

    A layer that also holds fused experts is a problem; its per-expert tensors
    are then neither merged nor reported again.
    """
    layers: dict[int, dict[str, Weights]] = {}
    fused: dict[int, str] = {}
    for name, weight in state_dict.items():
        storage = expert_storage_of(name)
        if storage is None or name in fp8.scales:
            continue
        if storage[1] == "per_expert":
            layers.setdefault(storage[0], {})[name] = weight
        else:
            fused[storage[0]] = min(name, fused.get(storage[0], name))
    for layer in sorted(set(layers) & set(fused)):
        fp8.problems.append(
            f"layer {layer} stores its experts both fused ({fused[layer]}) and per expert "
            f"({min(layers[layer])}): a checkpoint holds each layer's experts one way or the other"
        )
    return layers, set(layers) & set(fused)


def _merge_per_expert_layer(
    layer: int, tensors: Mapping[str, Weights], huggingface_config: Any, fp8: _Fp8Weights, fp8_gpu: bool,
    weights: dict[str, WeightData], float8: set[str], expected: dict[str, tuple[int, ...]],
) -> None:
    """One layer's per-expert weights as fused ``gate_up_proj`` and ``down_proj``.

    Missing, misshapen or extra experts are problems (nothing is merged then).
    Float8 experts stay float8 with merged block scales where the GPU runs them
    (``fp8_gpu``, 128x128 blocks, I and H whole blocks), in transformers' layout
    [E, 2I, H] / [E, H, I], which MAX's grouped FP8 matmul reads. Otherwise they
    are dequantized first and merged into the hub layout [E, H, 2I] / [E, I, H]
    that the releases store fused, so the graph is the fused release's own (one
    compile for both storages) and computes exactly the same.
    """
    from .nn.fp8 import BLOCK, fp8_block_shape_fits

    p = f"model.language_model.layers.{layer}."
    specs = {
        name: spec for name, spec in checkpoint_layout(huggingface_config, expert_storage={layer: "per_expert"}).items()
        if name.startswith(p + "mlp.experts.")
    }
    data = {name: weight.data() for name, weight in tensors.items()}
    problems = [f"unexpected tensor {n} (shape {[int(d) for d in data[n].shape]})" for n in sorted(set(data) - set(specs))]
    problems += [f"missing tensor {n} (expected shape {list(spec.shape)})" for n, spec in specs.items() if n not in data]
    problems += [
        f"tensor {n} has shape {[int(d) for d in data[n].shape]}, expected {list(spec.shape)}"
        for n, spec in specs.items() if n in data and tuple(int(d) for d in data[n].shape) != spec.shape
    ]
    if not is_moe_layer(as_config_dict(huggingface_config), layer):
        problems = [f"layer {layer} stores experts ({min(data)}) but the config makes it a dense layer"]
    if problems:
        fp8.problems.extend(problems)
        return
    E = text_dims(as_config_dict(huggingface_config))["experts"].size
    names = [[f"{p}mlp.experts.{e}.{proj}.weight" for proj in PER_EXPERT_PROJS] for e in range(E)]
    I, H = specs[names[0][0]].shape
    out = f"language_model.layers.{layer}.mlp.experts."
    if (fp8_gpu and fp8.block == (BLOCK, BLOCK) and fp8_block_shape_fits(I, H)
            and all(d.dtype == DType.float8_e4m3fn for d in data.values())):
        scales = {n: fp8._scale(n, d) for n, d in data.items()}
        if any(s is None for s in scales.values()):
            return  # each is a problem already
        fp8.kept += len(data)
        for part, merged, merged_scale in (
            ("gate_up_proj", _merge_gate_up([_bits(data[g]) for g, _, _ in names], [_bits(data[u]) for _, u, _ in names]),
             _merge_gate_up([scales[g] for g, _, _ in names], [scales[u] for _, u, _ in names])),
            ("down_proj", np.stack([_bits(data[d]) for _, _, d in names]), np.stack([scales[d] for _, _, d in names])),
        ):
            weights[out + part] = _from_bits(merged, DType.float8_e4m3fn, out + part)
            weights[out + part + "_scale_inv"] = WeightData.from_numpy(merged_scale, out + part + "_scale_inv")
            expected[out + part + "_scale_inv"] = merged_scale.shape
            float8 |= {out + part, out + part + "_scale_inv"}
        return
    for n, d in data.items():
        if d.dtype == DType.float8_e4m3fn:
            data[n] = fp8.dequantize(n, d)
    if len({d.dtype for d in data.values()}) > 1:
        data = {n: _cast(d, DType.float32) for n, d in data.items()}
    dtype = data[names[0][0]].dtype
    gate_up = _merge_gate_up([_bits(data[g]) for g, _, _ in names], [_bits(data[u]) for _, u, _ in names])
    down = np.stack([_bits(data[d]) for _, _, d in names])
    for part, merged in (("gate_up_proj", gate_up), ("down_proj", down)):
        hub = np.ascontiguousarray(np.swapaxes(merged, 1, 2))  # [E, H, 2I] / [E, I, H]
        weights[out + part] = _from_bits(hub, dtype, out + part)


def _merge_gate_up(gates: list[np.ndarray], ups: list[np.ndarray]) -> np.ndarray:
    """[E, 2I, H] from E gate and E up [I, H] matrices (or their block scales): gate rows first, as transformers."""
    merged = np.empty((len(gates), gates[0].shape[0] + ups[0].shape[0], gates[0].shape[1]), gates[0].dtype)
    for e, (gate, up) in enumerate(zip(gates, ups, strict=True)):
        merged[e, : gate.shape[0]] = gate
        merged[e, gate.shape[0]:] = up
    return merged


def _fp8_experts_as_kernels_take_them(
    weights: dict[str, WeightData], float8: set[str], sparse_layers: list[int], layouts: set[ExpertLayout],
) -> None:
    """Float8 experts in the layout MAX's grouped FP8 matmul reads: [E, N, K] with [E, N/128, K/128] scales.

    That is transformers' layout, used as it is. Hub-layout experts ([E, K, N])
    are transposed here, once, on the host (weights and their block scales); a
    layer whose gate_up and down are not both float8 gets both dequantized.
    """
    from .checkpoints.fp8 import dequantize_blockwise

    for i in sparse_layers:
        p = f"language_model.layers.{i}.mlp.experts."
        pair = (p + "gate_up_proj", p + "down_proj")
        if all(n in float8 for n in pair):
            if layouts == {"hub"}:
                for n in pair:
                    bits = np.ascontiguousarray(np.swapaxes(_bits(weights[n]), -1, -2))
                    scale = np.ascontiguousarray(np.swapaxes(_numpy(weights[n + "_scale_inv"]), -1, -2))
                    weights[n] = _from_bits(bits, DType.float8_e4m3fn, n)
                    weights[n + "_scale_inv"] = WeightData.from_numpy(scale, n + "_scale_inv")
            continue
        for n in pair:
            if n in float8:
                scale = _numpy(weights.pop(n + "_scale_inv"))
                weights[n] = WeightData.from_numpy(dequantize_blockwise(_bits(weights[n]), scale), n).astype(
                    DType.bfloat16)
                float8 -= {n, n + "_scale_inv"}


def _experts_as_cpu_panels(
    weights: dict[str, WeightData], sparse_layers: list[int], layouts: set[ExpertLayout],
) -> None:
    """Float32 or bfloat16 fused experts as the CPU kernels' column panels, layer by layer.

    A kernel task then streams one contiguous panel instead of copying a strided one
    to scratch first (a quarter of the MoE prefill time). Each layer's tensors are
    replaced as they are packed, so at most one layer's extra copy is alive at a time.
    """
    names = [f"language_model.layers.{i}.mlp.experts.{part}" for i in sparse_layers
             for part in ("gate_up_proj", "down_proj")]
    if not names or any(weights[n].dtype not in (DType.float32, DType.bfloat16) for n in names):
        return
    for name in names:
        data = weights[name]
        w = _bits(data)
        if layouts == {"transformers"}:
            w = np.swapaxes(w, 1, 2)  # as the hub layout (a view; the packing copies once)
        groups = 2 if name.endswith("gate_up_proj") else 1
        weights[name] = _from_bits(pack_expert_panels(w, groups, pairs=data.dtype == DType.bfloat16), data.dtype, name)
        _page_out(w)
        del data, w


def _page_out(a: np.ndarray) -> None:
    """Asks the kernel to reclaim the pages of a tensor no longer needed (MADV_PAGEOUT).

    The checkpoint's experts are memory-mapped: once read for the packing, their
    pages would stay in this process's RSS beside the panels until the file is
    unmapped. Clean file pages are dropped (re-read if touched again), anonymous
    ones swapped at most: no data is lost whatever the memory is. Best effort.
    """
    import ctypes
    import mmap

    start = -(-a.ctypes.data // mmap.PAGESIZE) * mmap.PAGESIZE     # whole pages inside the tensor only
    end = (a.ctypes.data + a.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 21)  # MADV_PAGEOUT


def _cast(data: WeightData, dtype: DType) -> WeightData:
    """``data`` as ``dtype``: the exact widenings to float32 in numpy, the rest by MAX.

    MAX's ``WeightData.astype`` runs a cast graph in a session of its own, whose
    first load costs ~2 s of a cached model load; bfloat16 -> float32 is a 16-bit shift.
    """
    if dtype == DType.float32 and data.dtype == DType.bfloat16:
        wide = (_bits(data).astype(np.uint32) << 16).view(np.float32)
    elif dtype == DType.float32 and data.dtype == DType.float16:
        wide = _numpy(data).astype(np.float32)
    else:
        return data.astype(dtype)
    return _from_bits(wide, dtype, data.name)


def _numpy(data: WeightData) -> np.ndarray:
    return Buffer.from_dlpack(data.data).to_numpy()


# numpy has no bfloat16 or float8: such tensors are moved as their bit patterns.
_BITS = {DType.bfloat16: DType.uint16, DType.float8_e4m3fn: DType.uint8}


def _bits(data: WeightData) -> np.ndarray:
    """A tensor's elements in numpy (bfloat16 and float8 as their bit patterns)."""
    buffer = Buffer.from_dlpack(data.data)
    if buffer.dtype in _BITS:
        buffer = buffer.view(_BITS[buffer.dtype], buffer.shape)
    return buffer.to_numpy()


def _from_bits(bits: np.ndarray, dtype: DType, name: str) -> WeightData:
    """A ``dtype`` tensor from what :func:`_bits` gives."""
    buffer = Buffer.from_numpy(bits)
    if dtype in _BITS:
        buffer = buffer.view(dtype, buffer.shape)
    return WeightData(data=buffer, name=name, dtype=dtype, shape=Shape(buffer.shape))


def _bfloat16_text_matrices(weights: Mapping[str, WeightData]) -> set[str]:
    """The text decoder's matrices (rank >= 2: projections, experts, embedding,
    lm_head) if every one of them is bfloat16, else none (one storage dtype for all)."""
    matrices = {n for n, w in weights.items() if n.startswith("language_model.") and len(w.shape) >= 2}
    return matrices if matrices and all(weights[n].dtype == DType.bfloat16 for n in matrices) else set()


def text_matrix_dtype(weights: Mapping[str, WeightData], dtype: DType) -> DType:
    """The storage dtype of the text decoder's matrices in converted ``weights``
    (``dtype`` unless the adapter kept them in bfloat16)."""
    embedding = weights.get("language_model.embed_tokens.weight")
    return embedding.dtype if embedding is not None else dtype


def _conv_as_linear(conv: WeightData) -> WeightData:
    """Views the patch Conv3d weight [D, C, T, P, P] as the linear [D, C*T*P*P] it equals."""
    buffer = Buffer.from_dlpack(conv.data)
    out_dim = int(buffer.shape[0])
    buffer = buffer.view(dtype=buffer.dtype, shape=(out_dim, buffer.num_elements // out_dim))
    return WeightData(
        data=buffer,
        name=conv.name,
        dtype=conv.dtype,
        shape=conv.shape.__class__(buffer.shape),
        quantization_encoding=conv.quantization_encoding,
    )


def checkpoint_expert_layout(weights: Mapping[str, WeightData], huggingface_config: Any) -> ExpertsLayout | None:
    """The expert layout of converted weights (None for dense models)."""
    for i in _sparse_layers(huggingface_config):
        p = f"language_model.layers.{i}.mlp.experts."
        if len(weights[p + "gate_up_proj"].shape) == 4:
            return "cpu_panels"
        return _expert_layout(
            p[:-1],
            tuple(int(d) for d in weights[p + "gate_up_proj"].shape),
            tuple(int(d) for d in weights[p + "down_proj"].shape),
            huggingface_config,
            _expert_shapes(huggingface_config),
        )
    return None
