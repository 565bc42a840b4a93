"""Qwen3-VL (MoE and dense) on the Modular MAX engine, runnable on CPU and GPU.

``ARCHITECTURES`` makes this package a MAX custom architecture module:
``max serve --custom-architectures qwen3vl_moe --model-path DIR``. The MAX
pieces are imported on first use, so ``qwen3vl_moe.checkpoints`` stays light.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# No outbound connections at run time unless the user opts back in.
TELEMETRY_OFF = {
    "MAX_SERVE_DISABLE_TELEMETRY": "1",  # MAX serve's remote metrics and logs
    "OTEL_SDK_DISABLED": "true",
    "MODULAR_TELEMETRY_ENABLED": "0",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
for _key, _value in TELEMETRY_OFF.items():
    os.environ.setdefault(_key, _value)

_EXPORTS = {
    "ARCHITECTURES": ".arch",
    "qwen3vl_arch": ".arch",
    "qwen3vl_moe_arch": ".arch",
    "Qwen3VLInputs": ".model",
    "Qwen3VLModel": ".model",
    "Qwen3VLConfig": ".model_config",
    "VisionConfig": ".model_config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'qwen3vl_moe' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
