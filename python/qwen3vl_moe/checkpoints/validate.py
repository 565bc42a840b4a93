"""Check a checkpoint directory before anything is compiled or loaded.

A broken checkpoint otherwise fails late and badly: a truncated shard
segfaults inside MAX's weight loading after minutes of compiling, a missing
shard becomes dozens of "missing tensor" lines that never name the file, a
wrong expert count prints graph dims without the config field. This module
reads only ``config.json``, the tokenizer/template files, the index and the
safetensors headers (plus file sizes), compares them with the layout the
config implies (:mod:`.layout`), and raises one :class:`CheckpointError`
listing every problem, each naming the file, the tensor, both shapes or the
config field.

MAX loads every ``*.safetensors`` file of the directory (it does not read the
index); transformers loads what the index lists. Both must agree, so a shard
missing from either side is a problem.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..chat_template import MissingChatTemplateError, find_chat_template
from .layout import ExpertStorage, TensorSpec, checkpoint_layout, expert_storage_of

__all__ = ["CheckpointError", "checkpoint_problems", "validate_checkpoint", "validate_serve_args"]

INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = ("Qwen3VLMoeForConditionalGeneration", "Qwen3VLForConditionalGeneration")

# Bytes per element of each safetensors dtype.
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_LISTED = 12  # problems of one kind listed one per line before the rest are counted


class CheckpointError(ValueError):
    """The checkpoint directory is not a loadable Qwen3-VL checkpoint; the message lists why."""


def _listed(lines: list[str], what: str) -> list[str]:
    if len(lines) <= _LISTED:
        return lines
    return [*lines[:_LISTED], f"... and {len(lines) - _LISTED} more {what}"]


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{path}: cannot be read ({e})")
    except json.JSONDecodeError as e:
        problems.append(f"{path}: invalid JSON ({e})")
    return None


def _safetensors_header(path: Path, problems: list[str]) -> dict[str, dict[str, Any]] | None:
    """The tensors a shard's header declares, after checking the header against the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            problems.append(f"{path}: {size} bytes, too short for a safetensors header (corrupt or truncated)")
            return None
        (length,) = struct.unpack("<Q", prefix)
        if length > _HEADER_LIMIT:
            problems.append(
                f"{path}: corrupt safetensors header (says it is {length} bytes long; the file has {size})"
            )
            return None
        if length > size - 8:
            problems.append(
                f"{path}: file is {size} bytes but its header alone needs {8 + length} (truncated; "
                "re-download it)"
            )
            return None
        raw = f.read(length)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError("not a JSON object")
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        problems.append(f"{path}: corrupt safetensors header ({e})")
        return None
    tensors: dict[str, dict[str, Any]] = {}
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"{path}: corrupt safetensors header entry for {name} ({entry!r}: {e!r})")
            continue
        if stop - begin != nbytes or begin < 0:
            problems.append(
                f"{path}: tensor {name} {dtype} {shape} needs {nbytes} bytes but its data_offsets "
                f"[{begin}, {stop}] span {stop - begin}"
            )
        end = max(end, stop)
        tensors[name] = {"dtype": dtype, "shape": tuple(shape)}
    needed = 8 + length + end
    if size < needed:
        problems.append(
            f"{path}: file is {size} bytes but its header needs {needed} (truncated: "
            f"{needed - size} bytes missing; re-download it)"
        )
    return tensors


def _describe_mismatch(name: str, actual: tuple[int, ...], spec: TensorSpec, config_name: str) -> str:
    fields = [
        f"dim {axis} = {spec.source_of(axis)} = {want}"
        for axis, (have, want) in enumerate(zip(actual, spec.shape))
        if have != want
    ]
    if len(actual) != len(spec.shape):
        fields = [f"rank {len(actual)}, expected {len(spec.shape)}"]
    return (
        f"tensor {name} has shape {list(actual)} but {config_name} implies {list(spec.shape)} "
        f"({'; '.join(fields)})"
    )


def _matches_other_expert_layout(name: str, shape: tuple[int, ...], memory: Mapping[str, TensorSpec]) -> bool:
    """Experts stored as transformers holds them ([E, 2I, H] / [E, H, I]) are loadable too."""
    return name.endswith(("experts.gate_up_proj", "experts.down_proj")) and memory[name].shape == shape


def _is_fp8_scale(name: str, present: set[str], config: Mapping[str, Any]) -> bool:
    quant = config.get("quantization_config") or {}
    return (
        isinstance(quant, dict)
        and quant.get("quant_method") == "fp8"
        and name.endswith("_scale_inv")
        and name[: -len("_scale_inv")] in present
    )


def _expert_layer(name: str) -> int | None:
    found = expert_storage_of(name)
    return None if found is None else found[0]


def _expert_storages(found: Mapping[str, Any], problems: list[str]) -> dict[int, set[ExpertStorage]]:
    """How each layer stores its experts (fused or per expert); a layer holding both is a problem."""
    examples: dict[int, dict[ExpertStorage, str]] = defaultdict(dict)
    for tensor in sorted(found):
        storage = expert_storage_of(tensor)
        if storage is not None:
            examples[storage[0]].setdefault(storage[1], tensor)
    for layer, kinds in sorted(examples.items()):
        if len(kinds) > 1:
            problems.append(
                f"layer {layer} stores its experts both fused ({kinds['fused']}) and per expert "
                f"({kinds['per_expert']}): a checkpoint holds each layer's experts one way or the other"
            )
    return {layer: set(kinds) for layer, kinds in examples.items()}


def _weight_problems(
    directory: Path, config: dict[str, Any] | None, config_path: Path, problems: list[str]
) -> None:
    shards = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    index_path = directory / INDEX_FILE
    weight_map: dict[str, str] = {}
    if index_path.exists():
        index = _read_json(index_path, problems)
        if index is not None:
            raw_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(raw_map, dict) or not all(isinstance(v, str) for v in raw_map.values()):
                problems.append(f"{index_path}: no 'weight_map' object of tensor name -> shard file")
            else:
                weight_map = raw_map
    if not shards:
        problems.append(f"{directory}: no *.safetensors weight files")

    by_shard: dict[str, list[str]] = defaultdict(list)
    for tensor, shard in weight_map.items():
        by_shard[shard].append(tensor)
    names = {p.name for p in shards}
    lost: set[str] = set()  # tensors the index puts in shards that do not exist
    for shard, tensors in sorted(by_shard.items()):
        if shard not in names:
            lost.update(tensors)
            problems.append(
                f"{directory / shard}: listed in {INDEX_FILE} for {len(tensors)} tensors "
                f"(e.g. {min(tensors)}) but the file does not exist"
            )
    if weight_map:
        for shard in sorted(names - set(by_shard)):
            problems.append(f"{directory / shard}: not listed in {INDEX_FILE} (MAX would load it, transformers not)")

    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    readable: set[str] = set()
    for path in shards:
        header = _safetensors_header(path, problems)
        if header is None:
            continue
        readable.add(path.name)
        for tensor, entry in header.items():
            if tensor in where:
                problems.append(f"tensor {tensor} is in both {where[tensor]} and {path.name}")
            found[tensor] = entry["shape"]
            where[tensor] = path.name
    if weight_map:
        misplaced = [
            f"{index_path}: lists {tensor} in {shard} but that shard does not hold it"
            for tensor, shard in sorted(weight_map.items())
            if shard in readable and where.get(tensor) != shard
        ]
        problems.extend(_listed(misplaced, "tensors the index misplaces"))
        unlisted = [
            f"{directory / where[t]}: holds {t}, which {INDEX_FILE} does not list"
            for t in sorted(found) if t not in weight_map and where[t] in by_shard
        ]
        problems.extend(_listed(unlisted, "tensors missing from the index"))

    if config is None:
        return
    storages = _expert_storages(found, problems)
    mixed = {layer for layer, kinds in storages.items() if len(kinds) > 1}
    per_expert: dict[int, ExpertStorage] = {
        layer: "per_expert" for layer, kinds in storages.items() if kinds == {"per_expert"}
    }
    try:
        expected = checkpoint_layout(config, expert_storage=per_expert)
        memory = checkpoint_layout(
            config, expert_layout="transformers", expert_storage=per_expert, include_tied_lm_head=True
        )
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"{config_path}: cannot derive the tensor layout from it ({type(e).__name__}: {e})")
        return
    unreadable = names - readable
    missing, mismatched, unexpected = [], [], []
    for tensor, spec in expected.items():
        if _expert_layer(tensor) in mixed:
            continue  # reported once as mixed storage
        if tensor in found:
            shape = found[tensor]
            if shape != spec.shape and not _matches_other_expert_layout(tensor, shape, memory):
                mismatched.append(_describe_mismatch(tensor, shape, spec, config_path.name))
        elif tensor not in lost and weight_map.get(tensor) not in unreadable:
            missing.append(f"missing tensor {tensor} (shape {list(spec.shape)}): in no *.safetensors file")
    present = set(found)
    for tensor in sorted(present - set(expected)):
        if _expert_layer(tensor) in mixed:
            continue
        if tensor in memory and memory[tensor].shape == found[tensor]:
            continue  # a tied checkpoint's copy of the lm_head
        if _is_fp8_scale(tensor, present, config):
            continue
        unexpected.append(
            f"unexpected tensor {tensor} (shape {list(found[tensor])}) in {where[tensor]}: "
            f"{config_path.name} implies no such tensor"
        )
    problems.extend(_listed(mismatched, "shape mismatches"))
    problems.extend(_listed(missing, "missing tensors"))
    problems.extend(_listed(unexpected, "unexpected tensors"))


def checkpoint_problems(model_path: str | os.PathLike[str]) -> list[str]:
    """Every problem found in the checkpoint directory ``model_path`` (empty when loadable)."""
    directory = Path(model_path)
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    problems: list[str] = []
    config_path = directory / "config.json"
    config = None
    if not config_path.is_file():
        problems.append(f"{config_path}: missing")
    else:
        config = _read_json(config_path, problems)
        if config is not None and not isinstance(config, dict):
            problems.append(f"{config_path}: not a JSON object")
            config = None
        if config is not None and not set(config.get("architectures") or ()) & set(ARCHITECTURES):
            problems.append(
                f"{config_path}: architectures {config.get('architectures')!r} names neither "
                + " nor ".join(ARCHITECTURES)
            )
            config = None
    tokenizer = directory / "tokenizer.json"
    if not tokenizer.is_file():
        problems.append(
            f"{tokenizer}: missing (this model needs its fast tokenizer file; copy tokenizer.json "
            "from the model's release)"
        )
    else:
        _read_json(tokenizer, problems)
    try:
        find_chat_template(directory)
    except MissingChatTemplateError as e:
        problems.append(str(e))
    _weight_problems(directory, config, config_path, problems)
    return problems


def validate_checkpoint(model_path: str | os.PathLike[str]) -> None:
    """Raise one :class:`CheckpointError` listing every problem of a local checkpoint.

    Paths that are not local directories (hub repo ids) are left to the loader:
    only files on disk can be checked before they are fetched.
    """
    if not Path(model_path).is_dir():
        return
    problems = checkpoint_problems(model_path)
    if problems:
        raise CheckpointError(
            f"{model_path} is not a loadable Qwen3-VL checkpoint ({len(problems)} problem"
            f"{'s' if len(problems) != 1 else ''}):\n  " + "\n  ".join(problems)
        )


def validate_serve_args(args: Sequence[str]) -> None:
    """:func:`validate_checkpoint` on the ``--model-path``/``--model`` of ``max serve`` arguments."""
    for i, arg in enumerate(args):
        for flag in ("--model-path", "--model"):
            if arg == flag and i + 1 < len(args):
                validate_checkpoint(args[i + 1])
            elif arg.startswith(flag + "="):
                validate_checkpoint(arg.split("=", 1)[1])
