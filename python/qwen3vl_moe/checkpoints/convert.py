"""Copies of a checkpoint with its weights stored as the releases store them.

The published Qwen3-VL weights are bfloat16 (and float8_e4m3fn in the -FP8
releases), while the tiny checkpoints are written in float32. This module
rewrites any checkpoint directory tensor by tensor, keeping its shard files,
index and every other file, so the copies exercise the same loading paths a
real release does. Files are read and written by :mod:`.safetensors_io`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .safetensors_io import RawTensor, float32_to_bf16_bits, read_safetensors, write_safetensors
from .tiny import cached_directory

__all__ = [
    "bfloat16_checkpoint",
    "cached_conversion",
    "rewrite_checkpoint",
    "set_declared_dtype",
    "to_bfloat16",
    "write_bfloat16_checkpoint",
]

# ---------------------------------------------------------------------------
# Rewriting a checkpoint directory

TensorRewrite = Callable[[Mapping[str, RawTensor]], dict[str, RawTensor]]


def _shards(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in src.glob("*.safetensors"))


def set_declared_dtype(config: dict[str, Any], dtype: str) -> None:
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
    set_declared_dtype(config, dtype)
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
