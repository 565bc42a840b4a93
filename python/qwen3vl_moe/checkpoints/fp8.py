"""Fine-grained FP8 (the Qwen3-VL ``-FP8`` releases' format), in pure numpy.

Format: a quantized ``X.weight`` is float8_e4m3fn with a float32
``X.weight_scale_inv`` holding one value per ``weight_block_size`` block
(``[128, 128]``) of the last two dims, and ``weight = fp8 * weight_scale_inv``
blockwise. Edge blocks are ragged: the scale grid is
``ceil(rows / 128) x ceil(cols / 128)`` and a last block covers what is left.
``config.json`` carries ``quantization_config`` (``quant_method: fp8``,
``fmt: e4m3``, ``activation_scheme: dynamic``, ``weight_block_size``,
``modules_to_not_convert``).

Quantization follows transformers' ``Fp8Quantize``
(integrations/finegrained_fp8.py, 5.12.1): per block
``scale = 448 / amax`` (1 for an all-zero block; evaluated as torch does,
``448 * (1 / amax)``), ``fp8 = cast(clamp(w *
scale, -448, 448))``, ``weight_scale_inv = 1 / scale``, all in float32; the
cast rounds to nearest, ties to even, as torch's ``.to(float8_e4m3fn)``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .convert import cached_conversion, rewrite_checkpoint, to_bfloat16
from .layout import ExpertStorage
from .safetensors_io import RawTensor

__all__ = [
    "E4M3_MAX",
    "dequantize_blockwise",
    "e4m3fn_to_float32",
    "float32_to_e4m3fn",
    "fp8_blocks_checkpoint",
    "fp8_blocks_config",
    "fp8_checkpoint",
    "is_not_converted",
    "quantize_blockwise",
    "write_fp8_checkpoint",
]

E4M3_MAX = 448.0
BLOCK = (128, 128)


def _e4m3fn_table() -> np.ndarray:
    """The float32 value of each of the 256 float8_e4m3fn bit patterns (0x7F / 0xFF are NaN)."""
    codes = np.arange(256, dtype=np.uint32)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exponent = (codes >> 3) & 0xF
    mantissa = (codes & 0x7).astype(np.float64)
    normal = (1.0 + mantissa / 8.0) * np.exp2(exponent.astype(np.float64) - 7.0)
    subnormal = mantissa / 8.0 * 2.0**-6
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


_TABLE = _e4m3fn_table()
_POSITIVE = _TABLE[:0x7F]  # codes 0x00..0x7E, increasing


def e4m3fn_to_float32(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns (uint8) to float32 values (exact)."""
    return _TABLE[np.asarray(bits, dtype=np.uint8)]


def float32_to_e4m3fn(x: np.ndarray) -> np.ndarray:
    """Rounds float32 to float8_e4m3fn bit patterns: nearest, ties to even.

    Defined for |x| <= 448 (the quantizer clamps first) and NaN; anything
    larger raises, since torch's unsaturated cast turns it into NaN.
    """
    x = np.asarray(x, dtype=np.float32)
    magnitude = np.abs(x)
    if np.any(magnitude[~np.isnan(x)] > E4M3_MAX):
        raise ValueError("float32_to_e4m3fn: values beyond +-448 must be clamped first")
    safe = np.where(np.isnan(magnitude), 0.0, magnitude)
    upper = np.minimum(np.searchsorted(_POSITIVE, safe, side="left"), len(_POSITIVE) - 1)
    lower = np.maximum(upper - 1, 0)
    below, above = _POSITIVE[lower], _POSITIVE[upper]
    # float64 distances are exact for these operands.
    d_below = safe.astype(np.float64) - below
    d_above = above.astype(np.float64) - safe
    pick_upper = (d_above < d_below) | ((d_above == d_below) & (upper % 2 == 0))
    code = np.where(pick_upper, upper, lower).astype(np.uint8)
    code |= np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))
    code[np.isnan(x)] = 0x7F
    return code


def _block_view(shape: Sequence[int], block: Sequence[int]) -> tuple[int, int, int, int]:
    rows, cols = shape[-2], shape[-1]
    return rows, cols, math.ceil(rows / block[0]), math.ceil(cols / block[1])


def _expand(scales: np.ndarray, rows: int, cols: int, block: Sequence[int]) -> np.ndarray:
    """Per-block values repeated over their (ragged at the edges) blocks."""
    return np.repeat(np.repeat(scales, block[0], axis=-2)[..., :rows, :], block[1], axis=-1)[..., :cols]


def quantize_blockwise(w: np.ndarray, block: Sequence[int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """(float8_e4m3fn bits, float32 ``weight_scale_inv``) of a float32 ``[..., rows, cols]`` weight."""
    w = np.asarray(w, dtype=np.float32)
    rows, cols, nr, nc = _block_view(w.shape, block)
    padded = np.zeros((*w.shape[:-2], nr * block[0], nc * block[1]), dtype=np.float32)
    padded[..., :rows, :cols] = w
    tiles = padded.reshape(*w.shape[:-2], nr, block[0], nc, block[1])
    amax = np.abs(tiles).max(axis=(-3, -1))
    # torch evaluates transformers' ``448 / amax`` as ``448 * (1 / amax)``; so do we, to the bit.
    reciprocal = (np.float32(1) / np.where(amax > 0, amax, np.float32(1))).astype(np.float32)
    scale = np.where(amax > 0, np.float32(E4M3_MAX) * reciprocal, np.float32(1)).astype(np.float32)
    scaled = w * _expand(scale, rows, cols, block)
    bits = float32_to_e4m3fn(np.clip(scaled, -E4M3_MAX, E4M3_MAX))
    return bits, (np.float32(1) / scale).astype(np.float32)


def dequantize_blockwise(bits: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = BLOCK) -> np.ndarray:
    """float32 weights from float8_e4m3fn bits and their per-block ``weight_scale_inv``.

    Raises if the scale grid is not ``ceil(rows/bm) x ceil(cols/bn)`` over the same leading dims.
    """
    rows, cols, nr, nc = _block_view(bits.shape, block)
    want = (*bits.shape[:-2], nr, nc)
    if tuple(scale_inv.shape) != want:
        raise ValueError(
            f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} for a "
            f"{list(bits.shape)} weight in {list(block)} blocks"
        )
    return e4m3fn_to_float32(bits) * _expand(scale_inv.astype(np.float32), rows, cols, block)


# ---------------------------------------------------------------------------
# Which tensors are quantized


def is_not_converted(tensor_name: str, modules_to_not_convert: Iterable[str] | None) -> bool:
    """Whether a checkpoint tensor lies in a module the config leaves unquantized.

    transformers' rule (``quantizers_utils.should_convert_module``, 5.12.1):
    a pattern matches a module name it matches as a regex from the start, or
    that ends with it; the module is the tensor name minus its last part.
    """
    module = tensor_name.rsplit(".", 1)[0]
    return any(re.match(pattern, module) or module.endswith(pattern) for pattern in modules_to_not_convert or ())


# What the tiny FP8 copies leave unquantized (our choice for the tiny
# checkpoints, not a claim about any release): embeddings, lm_head, the MoE
# router and the vision encoder. The loader reads the list from the config.
TINY_MODULES_TO_NOT_CONVERT = ("lm_head", "model.language_model.embed_tokens", "mlp.gate", "model.visual")


def _quantizable(name: str, t: RawTensor, skip: Sequence[str]) -> bool:
    return t.dtype in ("F32", "BF16") and t.data.ndim >= 2 and (
        name.endswith(".weight") or name.endswith("_proj")
    ) and not is_not_converted(name, skip)


def _scale_name(name: str) -> str:
    return name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"


def write_fp8_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                         modules_to_not_convert: Sequence[str] = TINY_MODULES_TO_NOT_CONVERT,
                         block: Sequence[int] = BLOCK) -> Path:
    """An FP8 copy of ``src``: linear (and fused expert) weights blockwise float8, the rest bfloat16.

    Per-expert weights are 2-D linear weights like any other: each is quantized
    with its own ``weight_scale_inv``, as the per-expert releases store them.
    """
    skip = list(modules_to_not_convert)

    def rewrite(tensors: Mapping[str, RawTensor]) -> dict[str, RawTensor]:
        out: dict[str, RawTensor] = {}
        for name, t in tensors.items():
            if _quantizable(name, t, skip):
                bits, scale_inv = quantize_blockwise(t.float32(), block)
                out[name] = RawTensor("F8_E4M3", bits)
                out[_scale_name(name)] = RawTensor.of(scale_inv)
            else:
                out |= to_bfloat16({name: t})
        return out

    quantization_config: dict[str, Any] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "modules_to_not_convert": skip,
        "quant_method": "fp8",
        "weight_block_size": list(block),
    }
    return rewrite_checkpoint(src, dst, rewrite, dtype="bfloat16",
                              config_update={"quantization_config": quantization_config})


def fp8_checkpoint(preset: str = "moe", seed: int = 0, expert_storage: ExpertStorage = "fused") -> Path:
    """The cached FP8 copy of the tiny checkpoint ``preset`` (per-expert experts each get their own scales)."""
    from .tiny import tiny_checkpoint

    return cached_conversion(tiny_checkpoint(preset, seed, expert_storage=expert_storage), "fp8", write_fp8_checkpoint)


# ---------------------------------------------------------------------------
# A small checkpoint whose text matrices are whole 128x128 blocks


def fp8_blocks_config() -> dict[str, Any]:
    """The tiny MoE model resized so every text projection and expert is whole 128x128 blocks.

    The tiny presets (H=64, I=48) have no whole block, so on a GPU every float8
    tensor would be dequantized and MAX's FP8 kernels never used: MAX's
    blockwise FP8 matmuls need K a multiple of 128 (the activation quantizer's
    128-column groups) and the adapter keeps only whole-block weights. Here
    H=384 (3 heads x head_dim 128, 1 KV head), dense intermediate 768, experts
    I=128 (4 experts, top-2; neither H == 2I nor H == I, so the expert layout is
    unambiguous), 3 text layers with layer 1 dense; the vision encoder is the
    tiny one with its output at H.
    """
    from .tiny import preset_config

    config = preset_config("moe")
    config["text_config"].update(
        hidden_size=384, num_attention_heads=3, num_key_value_heads=1, head_dim=128,
        intermediate_size=768, moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=3, mlp_only_layers=[1],
    )
    config["vision_config"]["out_hidden_size"] = 384
    return config


# Quantized in the blocks checkpoint: the vision encoder too, so that the GPU
# loader's dequantization of what MAX runs no FP8 kernel for is exercised.
BLOCKS_MODULES_TO_NOT_CONVERT = ("lm_head", "model.language_model.embed_tokens", "mlp.gate")


def fp8_blocks_checkpoint(seed: int = 0, expert_storage: ExpertStorage = "fused") -> Path:
    """The cached FP8 checkpoint of :func:`fp8_blocks_config` (text matrices float8 in whole blocks)."""
    from .tiny import FORMAT_VERSION, cached_directory, default_cache_dir, write_checkpoint_from_config

    suffix = "-per-expert" if expert_storage == "per_expert" else ""
    source = cached_directory(
        default_cache_dir() / f"fp8-blocks-s{seed}-v{FORMAT_VERSION}{suffix}",
        lambda tmp: write_checkpoint_from_config(tmp, fp8_blocks_config(), seed, expert_storage=expert_storage),
    )
    return cached_conversion(
        source, "fp8",
        lambda src, dst: write_fp8_checkpoint(src, dst, modules_to_not_convert=BLOCKS_MODULES_TO_NOT_CONVERT),
    )
