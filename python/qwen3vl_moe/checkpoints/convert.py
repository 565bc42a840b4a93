"""Copies of a checkpoint with its weights stored as the releases store them.

The published Qwen3-VL weights are bfloat16 (and float8_e4m3fn in the -FP8
releases), while the tiny checkpoints are written in float32. This module
rewrites any checkpoint directory tensor by tensor, keeping its shard files,
index and every other file, so the copies exercise the same loading paths a
real release does.

numpy has no bfloat16 or float8 dtype, so the safetensors files are read and
written here directly (8-byte header length, JSON header, raw little-endian
bytes) with bfloat16 carried as uint16 bit patterns and float8 as uint8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .tiny import cached_directory

__all__ = [
    "RawTensor",
    "bf16_bits_to_float32",
    "bfloat16_checkpoint",
    "cached_conversion",
    "float32_to_bf16_bits",
    "read_safetensors",
    "rewrite_checkpoint",
    "write_bfloat16_checkpoint",
    "write_safetensors",
]

# safetensors dtype tag -> numpy storage dtype (bit patterns for the types numpy lacks).
_STORAGE = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F8_E4M3": np.dtype("u1"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NUMPY_TAG = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
              np.dtype("<i4"): "I32", np.dtype("?"): "BOOL"}


@dataclass(frozen=True)
class RawTensor:
    """A safetensors tensor: its dtype tag and its data in numpy storage form."""

    dtype: str
    data: np.ndarray

    @classmethod
    def of(cls, array: np.ndarray) -> RawTensor:
        """A tensor of a numpy-native dtype (float32, float16, ints, bool)."""
        array = np.ascontiguousarray(array)
        return cls(_NUMPY_TAG[array.dtype], array)

    def float32(self) -> np.ndarray:
        """The values as float32 (bfloat16 exactly; float8 is fp8.py's to decode)."""
        if self.dtype == "BF16":
            return bf16_bits_to_float32(self.data)
        if self.dtype in ("F32", "F16"):
            return self.data.astype(np.float32)
        raise TypeError(f"no float32 view of a {self.dtype} tensor here")


def read_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """All tensors of one safetensors file, and its ``__metadata__``."""
    blob = Path(path).read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + header_len])
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + header_len
    tensors = {}
    for name, info in header.items():
        storage = _STORAGE.get(info["dtype"])
        if storage is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not handle")
        begin, end = info["data_offsets"]
        data = np.frombuffer(blob, dtype=storage, count=(end - begin) // storage.itemsize, offset=base + begin)
        tensors[name] = RawTensor(info["dtype"], data.reshape(info["shape"]))
    return tensors, metadata


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, RawTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Writes ``tensors`` (sorted by name, as safetensors does) with an 8-byte aligned header."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.data.shape), "data_offsets": [offset, offset + t.data.nbytes]}
        offset += t.data.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name].data).tobytes())


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Rounds float32 to bfloat16 (nearest, ties to even, as torch's cast), as uint16 bits."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # stays a (quiet) NaN
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns to the float32 values they hold (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ---------------------------------------------------------------------------
# Rewriting a checkpoint directory

TensorRewrite = Callable[[Mapping[str, RawTensor]], dict[str, RawTensor]]


def _shards(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in src.glob("*.safetensors"))


def _set_dtype(config: dict[str, Any], dtype: str) -> None:
    """Sets the config's declared dtype, as the releases declare it, at every level that has one."""
    config["torch_dtype"] = dtype
    for key in ("dtype",):
        if key in config:
            config[key] = dtype
    for sub in ("text_config", "vision_config"):
        if isinstance(config.get(sub), dict):
            for key in ("dtype", "torch_dtype"):
                if key in config[sub]:
                    config[sub][key] = dtype


def rewrite_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str], rewrite: TensorRewrite,
                       *, dtype: str, config_update: Mapping[str, Any] | None = None) -> Path:
    """Copies ``src`` to ``dst`` with each shard's tensors passed through ``rewrite``.

    Shard file names are kept; the index (if any) is rebuilt from what the
    shards now hold. ``config.json`` gets ``dtype`` as its declared dtype and
    ``config_update``'s top-level keys.
    """
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shards = _shards(src)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        tensors, metadata = read_safetensors(src / shard)
        out = rewrite(tensors)
        write_safetensors(dst / shard, out, metadata)
        for name, t in out.items():
            weight_map[name] = shard
            total += t.data.nbytes
    for item in src.iterdir():
        if item.name in shards or item.name in ("config.json", "model.safetensors.index.json"):
            continue
        if item.is_file():
            shutil.copyfile(item, dst / item.name)
    config = json.loads((src / "config.json").read_text())
    _set_dtype(config, dtype)
    config.update(config_update or {})
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (src / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return dst


def to_bfloat16(tensors: Mapping[str, RawTensor]) -> dict[str, RawTensor]:
    """Every float32 tensor rounded to bfloat16 (the releases store all weights so)."""
    return {
        name: RawTensor("BF16", float32_to_bf16_bits(t.data)) if t.dtype == "F32" else t
        for name, t in tensors.items()
    }


def write_bfloat16_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """A bfloat16 copy of ``src`` in ``dst``."""
    return rewrite_checkpoint(src, dst, to_bfloat16, dtype="bfloat16")


def cached_conversion(src: str | os.PathLike[str], suffix: str,
                      write: Callable[[Path, Path], Path]) -> Path:
    """``<src>-<suffix>`` beside ``src``, written once by ``write(src, tmp)``."""
    src = Path(src)
    return cached_directory(src.parent / f"{src.name}-{suffix}", lambda tmp: write(src, tmp))


def bfloat16_checkpoint(preset: str = "moe", seed: int = 0) -> Path:
    """The cached bfloat16 copy of the tiny checkpoint ``preset``."""
    from .tiny import tiny_checkpoint

    return cached_conversion(tiny_checkpoint(preset, seed), "bf16", write_bfloat16_checkpoint)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qwen3vl_moe.checkpoints.convert",
        description="Write a bfloat16 copy of a checkpoint directory (or of a cached tiny preset).",
    )
    parser.add_argument("src", nargs="?", help="checkpoint directory (default: the tiny --preset)")
    parser.add_argument("--preset", default="moe")
    parser.add_argument("--out", help="output directory (default: <src>-bf16 beside the source)")
    args = parser.parse_args(argv)
    if args.src is None:
        print(bfloat16_checkpoint(args.preset))
    elif args.out:
        print(write_bfloat16_checkpoint(args.src, args.out))
    else:
        print(cached_conversion(Path(args.src), "bf16", write_bfloat16_checkpoint))


if __name__ == "__main__":
    main()
