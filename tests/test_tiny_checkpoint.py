"""The tiny checkpoints load like real Qwen3-VL releases, offline, and are reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from qwen3vl_moe.checkpoints import tiny
from safetensors import safe_open

PRESETS = ["moe", "dense", "moe-sparse2"]
# Which text layers are sparse, by transformers' rule (checked independently below).
EXPECTED_MOE_LAYERS = {
    "moe": [True, True, False, True],
    "dense": [False, False, False],
    "moe-sparse2": [False, True, False, True],
}
SEED = 0


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    return {p: tiny.write_tiny_checkpoint(root / p, p, SEED) for p in PRESETS}


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict:
    """preset -> (model from from_pretrained, loading info)."""
    out = {}
    for preset, path in checkpoints.items():
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        model_class = getattr(transformers, config.architectures[0])
        model, info = model_class.from_pretrained(
            path, dtype=torch.float32, local_files_only=True, output_loading_info=True
        )
        out[preset] = (model.eval(), info)
    return out


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _shards(path) -> list[str]:
    return sorted(set(json.loads((path / tiny.INDEX_FILE).read_text())["weight_map"].values()))


def test_same_seed_is_byte_identical_and_seeds_differ(checkpoints, tmp_path):
    again = tiny.write_tiny_checkpoint(tmp_path / "again", "moe", SEED)
    assert _files(again) == _files(checkpoints["moe"])
    other = tiny.write_tiny_checkpoint(tmp_path / "other", "moe", SEED + 1)
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()
    assert _shards(other) == _shards(again)
    for shard in _shards(again):
        assert (other / shard).read_bytes() != (again / shard).read_bytes()


def test_writer_needs_no_torch(tmp_path):
    """`pip install .` has no torch: the writer must not import it (issue #15)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "from qwen3vl_moe.checkpoints import tiny\n"
        f"tiny.write_tiny_checkpoint({str(tmp_path / 'nt')!r}, 'moe', {SEED})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    written = tiny.write_tiny_checkpoint(tmp_path / "with-torch", "moe", SEED)
    assert _files(tmp_path / "nt") == _files(written)


@pytest.mark.parametrize("preset", PRESETS)
def test_config_json_uses_hub_layout_and_round_trips(checkpoints, preset):
    path = checkpoints[preset]
    raw = json.loads((path / "config.json").read_text())
    moe = preset != "dense"
    assert raw["model_type"] == ("qwen3_vl_moe" if moe else "qwen3_vl")
    assert raw["vision_config"]["model_type"] == raw["model_type"]
    assert raw["text_config"]["rope_scaling"] == {
        "rope_type": "default",
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    }
    assert raw["text_config"]["rope_theta"] == 5000000
    assert "rope_parameters" not in raw["text_config"]

    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    text, vision = config.text_config, config.vision_config
    assert text.rope_parameters["mrope_section"] == [24, 20, 20]
    assert text.rope_parameters["rope_theta"] == 5e6
    assert (text.hidden_size, text.head_dim) == (64, 128)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert text.num_hidden_layers == len(EXPECTED_MOE_LAYERS[preset])
    assert config.tie_word_embeddings is (not moe)
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.out_hidden_size) == (4, 144, 2, 64)
    assert list(vision.deepstack_visual_indexes) == [1, 2, 3]
    if moe:
        assert (text.num_experts, text.num_experts_per_tok, text.moe_intermediate_size) == (8, 2, 48)
        # The loader decides whether to transpose experts by shape: these must differ.
        assert text.hidden_size not in (text.moe_intermediate_size, 2 * text.moe_intermediate_size)


@pytest.mark.parametrize("preset", PRESETS)
def test_moe_layers_follow_transformers_rule(loaded, preset):
    model, _ = loaded[preset]
    text = model.config.text_config
    num_experts = getattr(text, "num_experts", 0)
    mlp_only = getattr(text, "mlp_only_layers", [])
    step = getattr(text, "decoder_sparse_step", 1)
    rule = [
        i not in mlp_only and num_experts > 0 and (i + 1) % step == 0 for i in range(text.num_hidden_layers)
    ]
    actual = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.language_model.layers]
    assert actual == rule == EXPECTED_MOE_LAYERS[preset]


@pytest.mark.parametrize("preset", PRESETS)
def test_safetensors_hub_layout_and_exact_reload(checkpoints, loaded, preset):
    path = checkpoints[preset]
    model, info = loaded[preset]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

    reference = model.state_dict()
    index = json.loads((path / tiny.INDEX_FILE).read_text())
    shards = _shards(path)
    assert len(shards) >= 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards

    tied = model.config.tie_word_embeddings
    on_disk: dict[str, torch.Tensor] = {}
    total = 0
    for shard in shards:
        with safe_open(path / shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                assert index["weight_map"][name] == shard
                on_disk[name] = f.get_tensor(name)
                total += on_disk[name].numel() * on_disk[name].element_size()
    assert index["metadata"]["total_size"] == total
    assert set(on_disk) == set(index["weight_map"]) == set(reference) - ({"lm_head.weight"} if tied else set())
    for name, tensor in on_disk.items():
        assert tensor.dtype == torch.float32
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensor = tensor.transpose(1, 2)  # hub [E, H, 2I] / [E, I, H] -> transformers' memory layout
        assert torch.equal(reference[name], tensor), name
    if tied:
        assert torch.equal(reference["lm_head.weight"], on_disk["model.language_model.embed_tokens.weight"])
    for i, is_moe in enumerate(EXPECTED_MOE_LAYERS[preset]):
        prefix = f"model.language_model.layers.{i}.mlp."
        if not is_moe:
            assert prefix + "gate_proj.weight" in on_disk
            continue
        assert on_disk[prefix + "experts.gate_up_proj"].shape == (8, 64, 96)  # [E, H, 2I]
        assert on_disk[prefix + "experts.down_proj"].shape == (8, 48, 64)  # [E, I, H]

    rebuilt = tiny.build_model(path).state_dict()
    assert all(torch.equal(rebuilt[name], tensor) for name, tensor in reference.items())


def test_weights_are_unit_scale(loaded):
    state = loaded["moe"][0].state_dict()
    q = state["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert q.std().item() == pytest.approx(64**-0.5, rel=0.1)
    norm = state["model.language_model.layers.0.input_layernorm.weight"]
    assert norm.mean().item() == pytest.approx(1.0, abs=0.05)
    assert state["model.visual.pos_embed.weight"].std().item() == pytest.approx(1.0, rel=0.05)
    assert state["model.visual.blocks.0.attn.qkv.bias"].std().item() == pytest.approx(0.5, rel=0.2)
    experts = state["model.language_model.layers.0.mlp.experts.down_proj"]  # [E, H, I] in memory
    assert experts.std().item() == pytest.approx(48**-0.5, rel=0.1)
    conv = state["model.visual.patch_embed.proj.weight"]
    assert conv.std().item() == pytest.approx((3 * 2 * 16 * 16) ** -0.5, rel=0.1)
    assert state["lm_head.weight"].std().item() == pytest.approx(64**-0.5, rel=0.1)
    # Tied: the embedding is the lm_head, drawn at the lm_head's scale.
    tied = loaded["dense"][0].state_dict()["model.language_model.embed_tokens.weight"]
    assert tied.std().item() == pytest.approx(64**-0.5, rel=0.1)


@pytest.mark.parametrize("preset", PRESETS)
def test_tokenizer_ids_match_config(checkpoints, preset):
    path = checkpoints[preset]
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert len(tok) == config.text_config.vocab_size
    ids = tok.convert_tokens_to_ids(list(tiny._SPECIAL_TOKENS))
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # consecutive, in release order
    assert tok.convert_tokens_to_ids("<|image_pad|>") == config.image_token_id
    assert tok.convert_tokens_to_ids("<|video_pad|>") == config.video_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == config.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_end|>") == config.vision_end_token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])

    text = "Hello, what is in this picture?\n  3.14 naïve — ünïcode<|im_end|>"
    encoded = tok(text).input_ids
    assert encoded[-1] == tok.eos_token_id
    assert tok.decode(encoded) == text


def test_chat_template_is_the_instruct_template(checkpoints):
    template = tiny.CHAT_TEMPLATE.encode()
    assert len(template) == 5292
    assert hashlib.sha256(template).hexdigest() == (
        "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    )
    tok = transformers.AutoTokenizer.from_pretrained(checkpoints["moe"], local_files_only=True)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]},
    ]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>And this?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    tool_turns = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "Sunny"},
    ]
    assert tok.apply_chat_template(tool_turns, tokenize=False) == (
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nSunny\n</tool_response><|im_end|>\n"
    )


@pytest.mark.parametrize("preset", PRESETS)
def test_processor_offline_and_generate(checkpoints, loaded, preset):
    path = checkpoints[preset]
    model, _ = loaded[preset]
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe it."}]}
    ]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    # 64x96 is scaled up to the 65536-pixel minimum: 224x320 -> 14x20 patches.
    assert inputs["image_grid_thw"].tolist() == [[1, 14, 20]]
    assert inputs["pixel_values"].shape == (14 * 20, 3 * 2 * 16 * 16)
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 14 * 20 // 4
    with torch.no_grad():
        out = model.generate(**inputs, min_new_tokens=8, max_new_tokens=8, do_sample=False)
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape == (1, prompt_len + 8)
    assert torch.equal(out[:, :prompt_len], inputs["input_ids"])


def test_tiny_checkpoint_caches_atomically(tmp_path, monkeypatch):
    results = []
    barrier = threading.Barrier(2)

    def make():
        barrier.wait()
        results.append(tiny.tiny_checkpoint("dense", 3, cache_dir=tmp_path))

    threads = [threading.Thread(target=make) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = tmp_path / f"dense-s3-v{tiny.FORMAT_VERSION}"
    assert results == [expected, expected]
    assert sorted(p.name for p in tmp_path.iterdir()) == [expected.name]  # no temp dirs left
    assert (expected / tiny.INDEX_FILE).is_file()

    mtime = (expected / tiny.INDEX_FILE).stat().st_mtime_ns
    assert tiny.tiny_checkpoint("dense", 3, cache_dir=tmp_path) == expected
    assert (expected / tiny.INDEX_FILE).stat().st_mtime_ns == mtime

    monkeypatch.setenv("QWEN3VL_MOE_CACHE", str(tmp_path / "env"))
    assert tiny.default_cache_dir() == tmp_path / "env" / "checkpoints"
    with pytest.raises(KeyError):
        tiny.tiny_checkpoint("no-such-preset", cache_dir=tmp_path)


def test_cli(tmp_path, capsys):
    tiny.main(["--list"])
    listed = capsys.readouterr().out
    assert all(f"{p}:" in listed for p in PRESETS)
    tiny.main(["--preset", "moe-sparse2", "--seed", "2", "--out", str(tmp_path / "cli")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert all((tmp_path / "cli" / shard).is_file() for shard in _shards(tmp_path / "cli"))
    tiny.main(["--preset", "dense", "--out", str(tmp_path / "jinja"), "--chat-template", "jinja"])
    capsys.readouterr()
    assert (tmp_path / "jinja" / "chat_template.jinja").read_text() == tiny.CHAT_TEMPLATE
    assert not (tmp_path / "jinja" / "chat_template.json").exists()
    assert "chat_template" not in json.loads((tmp_path / "jinja" / "tokenizer_config.json").read_text())
