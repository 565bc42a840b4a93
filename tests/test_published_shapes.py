"""The published Qwen3-VL models' dimensions (2 text + 2 vision layers) against transformers, CPU float32.

For each release in ``qwen3vl_moe.checkpoints.published``: prefill logits of a
text prompt (and, for 2B and 30B-A3B, of a one-image prompt) within the
float32 tolerance of tests/test_text_model.py. transformers runs first and is
freed before this package loads, so one model is in memory at a time; a
release whose weights cannot fit in the memory available is skipped, saying
how much it needs. Load time and peak RSS of both are printed (``pytest -s``).

The 235B-A22B cut is stored in bfloat16 (its float32 experts alone are
18 GiB): this package computes in float32 from those weights, and transformers
loads them in bfloat16 and computes in float32 one decoder layer at a time, the
other offloaded to disk (``compute_in_float32_layer_by_layer``: exactly its
float32 model), so the float32 tolerance applies unchanged.
"""

from __future__ import annotations

import gc
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from reference import assert_close_to_reference, compute_in_float32_layer_by_layer
from qwen3vl_moe.checkpoints.published import (
    PUBLISHED,
    published_checkpoint,
    published_config,
    stored_bytes,
)
from qwen3vl_moe.checkpoints.tiny import default_cache_dir

pytestmark = pytest.mark.slow

TEXT = [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. What did the fox do?"}]
WITH_IMAGE = {"2b", "30b-a3b"}
# Peak RSS while one model loads, per byte of its float32 weights, and what the
# process holds besides: measured 1.0-1.1x above a 0.8-1.3 GiB baseline for the
# 2B, 4B and 8B cuts (both engines), so 1.3x and 3 GiB leave a margin.
LOAD_FACTOR, BASELINE_BYTES = 1.3, 3 * 2**30


def memory_needed(config: dict) -> int:
    """Bytes the larger of the two engines holds at its peak, with the process baseline.

    Weights as stored x LOAD_FACTOR: the bfloat16 235B-A22B cut (9.6 GiB)
    measured 9.4 GiB of anonymous memory while transformers loads it, 10.3
    GiB while its float32 layer computes, and 11.9 GiB peak RSS (mapped
    files included) for this package.
    """
    return int(LOAD_FACTOR * stored_bytes(config)) + BASELINE_BYTES


def image_conversation() -> list[dict]:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (18, 26, 3), dtype=np.uint8)
    picture = Image.fromarray(small, "RGB").resize((96, 64), Image.Resampling.BILINEAR)
    return [{"role": "user", "content": [{"type": "image", "image": picture},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise KeyError("MemAvailable")


class Measured:
    """Wall time and peak RSS (VmHWM, reset first) of a block."""

    def __enter__(self) -> Measured:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.rss_before = _status("VmRSS")
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.peak = _status("VmHWM")

    def __str__(self) -> str:
        return f"{self.seconds:.1f} s, peak RSS {self.peak / 2**30:.2f} GiB (from {self.rss_before / 2**30:.2f})"


def hf_inputs(processor, conv) -> dict:
    images = [p["image"] for m in conv for p in m["content"] if isinstance(p, dict) and p.get("type") == "image"]
    if not images:
        return dict(processor(text=[processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)],
                              return_tensors="pt"))
    chat = [{**m, "content": [{"type": p["type"]} if p["type"] == "image" else p for p in m["content"]]} for m in conv]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=images, return_tensors="pt"))


def disk_needed(config: dict) -> int:
    """Free disk the test writes: the checkpoint as stored and, for a bfloat16 cut, a copy
    of its decoder layers (transformers' reference offloads them), plus 2 GiB for the rest."""
    offload = stored_bytes(config) if config["text_config"]["dtype"] == "bfloat16" else 0
    return stored_bytes(config) + offload + 2 * 2**30


@pytest.fixture(scope="module", params=list(PUBLISHED))
def name(request, tmp_path_factory) -> str:
    config = published_config(request.param)
    need = memory_needed(config)
    have = _available_bytes()
    if have < need:
        pytest.skip(f"{request.param}: 2 text + 2 vision layers need about {need / 2**30:.0f} GiB to load "
                    f"(weights as stored x{LOAD_FACTOR:g} + {BASELINE_BYTES / 2**30:.0f} GiB), "
                    f"{have / 2**30:.0f} GiB available")
    disk = min(shutil.disk_usage(d).free for d in (default_cache_dir(), tmp_path_factory.getbasetemp()))
    if disk < disk_needed(config):
        pytest.skip(f"{request.param}: needs about {disk_needed(config) / 2**30:.0f} GiB of free disk "
                    f"(checkpoint and reference offload), {disk / 2**30:.0f} GiB free")
    return request.param


@pytest.fixture(scope="module")
def checkpoint(name):
    return published_checkpoint(name)


@pytest.fixture(scope="module")
def conversations(name):
    return {"text": TEXT, **({"image": image_conversation()} if name in WITH_IMAGE else {})}


@pytest.fixture(scope="module")
def reference(name, checkpoint, conversations, tmp_path_factory):
    """transformers' prompt ids and float32 logits per conversation; the model is freed afterwards."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    out = {}
    stored = published_config(name)["text_config"]["dtype"]
    # Timed with its forwards: transformers maps the weights lazily, so a load alone touches little.
    offload = tmp_path_factory.mktemp(f"{name}-offload")
    try:
        with Measured() as load, torch.no_grad():
            model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=getattr(torch, stored)).eval()
            if stored == "bfloat16":
                compute_in_float32_layer_by_layer(model, model.model.language_model.layers, offload)
            for key, conv in conversations.items():
                inputs = hf_inputs(processor, conv)
                out[key] = (inputs["input_ids"][0].tolist(), model(**inputs).logits[0].float().numpy())
    finally:
        shutil.rmtree(offload)  # the 235B-A22B cut offloads 9 GiB
    print(f"\n[{name}] transformers load + prefill: {load}")
    del model
    gc.collect()
    return out


@pytest.fixture(scope="module")
def engine(name, checkpoint, reference):
    from qwen3vl_moe.api import Qwen3VL

    with Measured() as load:
        engine = Qwen3VL(checkpoint, devices="cpu", max_length=512, max_batch_size=1, echo=True)
    print(f"\n[{name}] qwen3vl_moe load (graph compile included): {load}")
    yield engine
    del engine
    gc.collect()


@pytest.mark.parametrize("kind", ["text", "image"])
def test_prefill_logits_match_transformers(name, engine, reference, conversations, kind):
    if kind not in conversations:
        pytest.skip(f"{name}: the image prompt runs for {sorted(WITH_IMAGE)} only")
    ids, ref = reference[kind]
    [got] = engine.prefill_logits([conversations[kind]])
    prompt = engine.generate([conversations[kind]], max_new_tokens=1)[0].prompt_token_ids
    assert prompt == ids
    assert_close_to_reference(got, ref, f"{name} {kind}: prefill over {len(ids)} tokens")
