"""Shared test setup: offline, no telemetry, tiny checkpoints made locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MODULAR_TELEMETRY_ENABLED", "0")
