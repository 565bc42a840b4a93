"""Broken checkpoints are refused before anything compiles, in one message naming what to fix."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from qwen3vl_moe.checkpoints import tiny
from qwen3vl_moe.checkpoints.validate import (
    CheckpointError,
    checkpoint_problems,
    validate_checkpoint,
)

SEED = 0
INDEX = tiny.INDEX_FILE


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return tiny.write_tiny_checkpoint(tmp_path_factory.mktemp("good") / "moe", "moe", SEED)


@pytest.fixture
def broken(good, tmp_path) -> Path:
    """A fresh copy of the good checkpoint to break."""
    return Path(shutil.copytree(good, tmp_path / "broken"))


def _index(path: Path) -> dict:
    return json.loads((path / INDEX).read_text())


def _shard_of(path: Path, tensor: str) -> Path:
    return path / _index(path)["weight_map"][tensor]


def _header(shard: Path) -> tuple[int, dict]:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _rewrite_header(shard: Path, edit) -> None:
    """Edits a shard's JSON header in place, keeping the data bytes."""
    data = shard.read_bytes()
    n, header = _header(shard)
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def _error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        validate_checkpoint(path)
    return str(info.value)


def test_written_presets_have_no_problems(good, tmp_path):
    assert checkpoint_problems(good) == []
    for preset in ("dense", "moe-sparse2"):
        assert checkpoint_problems(tiny.write_tiny_checkpoint(tmp_path / preset, preset, SEED)) == []
    validate_checkpoint(good)  # no exception


def test_invalid_config_json_is_named(broken):
    (broken / "config.json").write_text('{"architectures": ["Qwen3VLMoeForConditionalGeneration"],')
    message = _error(broken)
    assert f"{broken / 'config.json'}: invalid JSON" in message


def test_config_of_another_model_is_named(broken):
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    assert "architectures ['LlamaForCausalLM'] names neither Qwen3VLMoeForConditionalGeneration" in _error(broken)


def test_missing_tokenizer_json_is_named_not_sentencepiece(broken):
    (broken / "tokenizer.json").unlink()
    message = _error(broken)
    assert f"{broken / 'tokenizer.json'}: missing" in message
    assert "sentencepiece" not in message


def test_corrupt_safetensors_header_is_named(broken):
    shard = _shard_of(broken, "model.language_model.norm.weight")
    data = bytearray(shard.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header becomes garbage, its length stays plausible
    shard.write_bytes(bytes(data))
    message = _error(broken)
    assert f"{shard}: corrupt safetensors header" in message
    # Its tensors are not reported again as missing: the shard is the problem.
    assert "missing tensor model.language_model.norm.weight" not in message


def test_absurd_header_length_is_named(broken):
    shard = _shard_of(broken, "lm_head.weight")
    data = shard.read_bytes()
    shard.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    assert f"{shard}: corrupt safetensors header (says it is {10**12} bytes long" in _error(broken)


def test_truncated_shard_is_named_with_both_sizes(broken):
    """MAX segfaults on this one (exit 139) after compiling; here it is a message."""
    shard = _shard_of(broken, "model.language_model.norm.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    n, header = _header(shard)
    needed = 8 + n + max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    message = _error(broken)
    assert f"{shard}: file is {len(data) // 2} bytes but its header needs {needed} (truncated" in message


def test_index_listing_a_missing_shard_names_the_file_once(broken):
    shard = _shard_of(broken, "model.language_model.norm.weight")
    listed = [t for t, s in _index(broken)["weight_map"].items() if s == shard.name]
    shard.unlink()
    problems = checkpoint_problems(broken)
    assert problems == [
        f"{shard}: listed in {INDEX} for {len(listed)} tensors (e.g. {min(listed)}) but the file does not exist"
    ]


def test_index_listing_tensors_not_in_their_shard_is_named(broken):
    index = _index(broken)
    shard = index["weight_map"]["lm_head.weight"]
    index["weight_map"]["model.language_model.layers.0.mlp.shared_expert.weight"] = shard
    (broken / INDEX).write_text(json.dumps(index))
    message = _error(broken)
    assert (
        f"{broken / INDEX}: lists model.language_model.layers.0.mlp.shared_expert.weight in {shard} "
        "but that shard does not hold it"
    ) in message


def test_unreadable_index_is_named(broken):
    (broken / INDEX).write_text("not json")
    assert f"{broken / INDEX}: invalid JSON" in _error(broken)


def test_shard_not_in_index_is_named(broken):
    extra = broken / "extra.safetensors"
    shutil.copy(_shard_of(broken, "lm_head.weight"), extra)
    message = _error(broken)
    assert f"{extra}: not listed in {INDEX}" in message
    assert "tensor lm_head.weight is in both" in message


def test_wrong_expert_count_names_the_config_field(broken):
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_experts"] = 6
    (broken / "config.json").write_text(json.dumps(config))
    message = _error(broken)
    assert (
        "tensor model.language_model.layers.0.mlp.experts.gate_up_proj has shape [8, 64, 96] but config.json "
        "implies [6, 64, 96] (dim 0 = text_config.num_experts = 6)"
    ) in message
    assert "tensor model.language_model.layers.0.mlp.gate.weight has shape [8, 64]" in message


def test_wrong_moe_intermediate_size_names_the_derived_dim(broken):
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["moe_intermediate_size"] = 40
    (broken / "config.json").write_text(json.dumps(config))
    message = _error(broken)
    assert "dim 2 = 2*text_config.moe_intermediate_size = 80" in message
    assert "dim 1 = text_config.moe_intermediate_size = 40" in message


def test_missing_unexpected_and_misshapen_tensors_are_named(broken):
    norm = "model.language_model.norm.weight"
    up = "model.language_model.layers.2.mlp.up_proj.weight"
    shard = _shard_of(broken, norm)

    def edit(header):
        header["model.language_model.layers.0.mlp.shared_expert.weight"] = header.pop(norm)
        # Same bytes, another shape: [80, 64] -> [64, 80].
        if up in header:
            header[up]["shape"] = [64, 80]

    _rewrite_header(shard, edit)
    if up not in _header(shard)[1]:
        _rewrite_header(_shard_of(broken, up), lambda h: h[up].__setitem__("shape", [64, 80]))
    index = _index(broken)
    index["weight_map"]["model.language_model.layers.0.mlp.shared_expert.weight"] = index["weight_map"].pop(norm)
    (broken / INDEX).write_text(json.dumps(index))
    problems = checkpoint_problems(broken)
    assert f"missing tensor {norm} (shape [64]): in no *.safetensors file" in problems
    assert any(
        p.startswith("unexpected tensor model.language_model.layers.0.mlp.shared_expert.weight (shape [64])")
        for p in problems
    )
    assert (
        f"tensor {up} has shape [64, 80] but config.json implies [80, 64] "
        "(dim 0 = text_config.intermediate_size = 80; dim 1 = text_config.hidden_size = 64)"
    ) in problems
    assert len(problems) == 3


def test_transformers_expert_layout_is_accepted(broken):
    """save_pretrained writes experts transposed; the loader reads both layouts."""
    for name in ("experts.gate_up_proj", "experts.down_proj"):
        tensor = f"model.language_model.layers.0.mlp.{name}"
        _rewrite_header(_shard_of(broken, tensor), lambda h, t=tensor: h[t].__setitem__("shape", h[t]["shape"][:1] + h[t]["shape"][:0:-1]))
    assert checkpoint_problems(broken) == []


def test_no_chat_template_names_the_files_looked_at(good, tmp_path):
    path = tiny.write_tiny_checkpoint(tmp_path / "jinja", "moe", SEED, chat_template="jinja")
    (path / "chat_template.jinja").unlink()
    message = _error(path)
    for name in ("processor_config.json", "chat_template.json", "chat_template.jinja", "tokenizer_config.json"):
        assert name in message


def test_all_problems_in_one_message(broken):
    (broken / "tokenizer.json").unlink()
    shard = _shard_of(broken, "lm_head.weight")
    shard.write_bytes(shard.read_bytes()[:100])
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_experts"] = 6
    (broken / "config.json").write_text(json.dumps(config))
    message = _error(broken)
    assert re.search(r"is not a loadable Qwen3-VL checkpoint \(\d+ problems\)", message)
    assert "tokenizer.json: missing" in message
    assert f"{shard}: file is 100 bytes" in message
    assert "text_config.num_experts" in message


def test_api_refuses_before_compiling(broken):
    """The Python API checks first: no MAX pipeline (and no compile) is started."""
    from qwen3vl_moe.api import Qwen3VL

    shard = _shard_of(broken, "model.language_model.norm.weight")
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Qwen3VL(broken, devices="cpu", max_length=128, max_batch_size=1)


def test_max_serve_path_refuses_when_building_the_pipeline_config(broken):
    """`max serve --custom-architectures qwen3vl_moe` reaches this package first in the
    architecture's max-length policy, inside PipelineConfig.from_args: before the
    memory plan, the tokenizer, the weights and any compile."""
    from max.pipelines.lib import PipelineArgs, PipelineConfig
    from qwen3vl_moe import TELEMETRY_OFF  # noqa: F401

    (broken / "tokenizer.json").unlink()
    args = PipelineArgs.from_flat_kwargs(
        model_path=str(broken), device_specs="cpu", max_length=128, max_batch_size=1,
        custom_architectures=["qwen3vl_moe"],
    )
    with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
        PipelineConfig.from_args(args)


def test_qwen3vl_moe_serve_refuses_before_starting_max(broken, monkeypatch):
    from qwen3vl_moe import serving

    started = []
    monkeypatch.setattr("max._entrypoints.pipelines.main", lambda: started.append(1))
    (broken / INDEX).write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        serving.serve(["--model-path", str(broken)])
    assert not started


def test_serve_args_are_checked_in_both_flag_forms(broken, good):
    from qwen3vl_moe.checkpoints.validate import validate_serve_args

    (broken / "tokenizer.json").unlink()
    validate_serve_args(["serve", "--model-path", str(good), "--devices", "cpu"])
    validate_serve_args(["serve", "--model", "Qwen/Qwen3-VL-2B-Instruct"])  # a hub id: left to the loader
    for args in (["--model-path", str(broken)], [f"--model-path={broken}"], ["--model", str(broken)]):
        with pytest.raises(CheckpointError, match="tokenizer.json: missing"):
            validate_serve_args(["serve", *args])


def test_cli_prints_the_problems_and_exits_2(broken, capsys):
    from qwen3vl_moe.cli import main

    (broken / "tokenizer.json").unlink()
    assert main(["generate", "hi", "--model-path", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"qwen3vl-moe generate: {broken} is not a loadable Qwen3-VL checkpoint (1 problem)")
    assert "Traceback" not in err


# ---------------------------------------------------------------------------
# Experts stored per expert (Qwen's FP8 releases, llm-compressor)

EXPERT = "model.language_model.layers.0.mlp.experts."


@pytest.fixture(scope="module")
def good_per_expert(tmp_path_factory) -> Path:
    return tiny.write_tiny_checkpoint(
        tmp_path_factory.mktemp("good") / "moe-per-expert", "moe", SEED, expert_storage="per_expert"
    )


def _rename(path: Path, before: str, after: str, shape: list[int] | None = None) -> None:
    """Renames a tensor (same bytes; another shape if given) in its shard and the index."""
    def edit(header):
        header[after] = header.pop(before)
        if shape is not None:
            header[after]["shape"] = shape

    _rewrite_header(_shard_of(path, before), edit)
    index = _index(path)
    index["weight_map"][after] = index["weight_map"].pop(before)
    (path / INDEX).write_text(json.dumps(index))


def test_per_expert_experts_are_accepted(good_per_expert):
    assert f"{EXPERT}7.up_proj.weight" in _index(good_per_expert)["weight_map"]
    assert not any(t.endswith("gate_up_proj") for t in _index(good_per_expert)["weight_map"])
    assert checkpoint_problems(good_per_expert) == []


def test_broken_per_expert_experts_are_named(good_per_expert, tmp_path):
    broken = Path(shutil.copytree(good_per_expert, tmp_path / "broken"))
    _rename(broken, f"{EXPERT}5.up_proj.weight", f"{EXPERT}8.up_proj.weight")  # E = 8: no expert 8
    _rename(broken, f"{EXPERT}2.down_proj.weight", f"{EXPERT}2.down_proj.weight", shape=[48, 64])
    problems = checkpoint_problems(broken)
    assert sorted(problems) == sorted([
        f"missing tensor {EXPERT}5.up_proj.weight (shape [48, 64]): in no *.safetensors file",
        f"tensor {EXPERT}2.down_proj.weight has shape [48, 64] but config.json implies [64, 48] "
        "(dim 0 = text_config.hidden_size = 64; dim 1 = text_config.moe_intermediate_size = 48)",
        f"unexpected tensor {EXPERT}8.up_proj.weight (shape [48, 64]) in {_index(broken)['weight_map'][f'{EXPERT}8.up_proj.weight']}: "
        "config.json implies no such tensor",
    ])


def test_a_layer_with_both_expert_storages_is_refused(broken):
    """One problem naming both storages, not a missing/unexpected line per tensor."""
    _rename(broken, f"{EXPERT}down_proj", f"{EXPERT}0.down_proj.weight")
    assert checkpoint_problems(broken) == [
        f"layer 0 stores its experts both fused ({EXPERT}gate_up_proj) and per expert "
        f"({EXPERT}0.down_proj.weight): a checkpoint holds each layer's experts one way or the other"
    ]
