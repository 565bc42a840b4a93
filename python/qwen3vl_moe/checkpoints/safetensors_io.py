"""safetensors files read and written with numpy alone.

numpy has no bfloat16 or float8 dtype, so tensors are carried as
:class:`RawTensor`: the safetensors dtype tag plus the data in a numpy storage
dtype (bfloat16 as uint16 bit patterns, float8 as uint8). The tiny writer and
the dtype converters both write through :func:`write_safetensors`, so every
checkpoint this package writes has one file format: 8-byte header length, a
JSON header sorted by tensor name, 8-byte aligned data.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "RawTensor",
    "bf16_bits_to_float32",
    "float32_to_bf16_bits",
    "read_safetensors",
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
            f.write(np.ascontiguousarray(tensors[name].data).data)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Rounds float32 to bfloat16 (nearest, ties to even, as torch's cast), as uint16 bits.

    Works through ``x`` in blocks, so rounding a multi-GiB expert tensor needs
    no uint32 temporaries of its size.
    """
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype=np.uint16)
    for begin in range(0, flat.size, _ROUND_BLOCK):
        part = flat[begin:begin + _ROUND_BLOCK]
        bits = part.view(np.uint32)
        rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
        block = (rounded >> np.uint32(16)).astype(np.uint16)
        nan = np.isnan(part)
        block[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)  # stays a (quiet) NaN
        out[begin:begin + _ROUND_BLOCK] = block
    return out.reshape(np.shape(x))


_ROUND_BLOCK = 1 << 22


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns to the float32 values they hold (exact)."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
