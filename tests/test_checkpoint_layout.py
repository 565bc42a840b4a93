"""The layout derived from a config equals transformers' own model, tensor for tensor."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from qwen3vl_moe.checkpoints import tiny
from qwen3vl_moe.checkpoints.layout import checkpoint_layout, expert_storage_of, is_moe_layer


def _variants() -> dict[str, dict]:
    configs = {name: tiny.preset_config(name) for name in tiny.PRESETS}
    tied_moe = copy.deepcopy(configs["moe"])
    tied_moe["tie_word_embeddings"] = True
    untied_dense = copy.deepcopy(configs["dense"])
    untied_dense["tie_word_embeddings"] = False
    # No head_dim: MoE text configs then use hidden / heads; one deepstack merger; q/k/v/o biases.
    implicit = copy.deepcopy(configs["moe"])
    del implicit["text_config"]["head_dim"]
    implicit["vision_config"]["deepstack_visual_indexes"] = [2]
    implicit["text_config"]["attention_bias"] = True
    implicit["text_config"]["mlp_only_layers"] = [0, 3]
    return configs | {"moe-tied": tied_moe, "dense-untied": untied_dense, "moe-implicit": implicit}


VARIANTS = _variants()


def _transformers_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    model_class = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):  # shapes only, no memory
        model = model_class(model_class.config_class.from_dict(copy.deepcopy(config)))
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_layout_is_transformers_state_dict(name):
    config = VARIANTS[name]
    expected = _transformers_shapes(config)
    layout = checkpoint_layout(config, expert_layout="transformers", include_tied_lm_head=True)
    assert {n: s.shape for n, s in layout.items()} == expected


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_hub_layout_transposes_experts_and_drops_a_tied_lm_head(name):
    config = VARIANTS[name]
    memory = checkpoint_layout(config, expert_layout="transformers", include_tied_lm_head=True)
    hub = checkpoint_layout(config)
    tied = config["tie_word_embeddings"]
    assert set(memory) - set(hub) == ({"lm_head.weight"} if tied else set())
    for n, spec in hub.items():
        if n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, a, b = memory[n].shape
            assert spec.shape == (E, b, a)
            assert spec.fan_in == memory[n].fan_in  # the input dim, whichever axis holds it
        else:
            assert spec.shape == memory[n].shape


def test_dims_name_their_config_fields():
    layout = checkpoint_layout(VARIANTS["moe"])
    gate_up = layout["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert gate_up.shape == (8, 64, 96)
    assert [d.source for d in gate_up.dims] == [
        "text_config.num_experts", "text_config.hidden_size", "2*text_config.moe_intermediate_size",
    ]
    q = layout["model.language_model.layers.0.self_attn.q_proj.weight"]
    assert q.dims[0].source == "text_config.num_attention_heads*text_config.head_dim"
    fc1 = layout["model.visual.deepstack_merger_list.0.linear_fc1.weight"]
    assert fc1.dims[1].source == "vision_config.hidden_size*vision_config.spatial_merge_size^2"
    assert layout["lm_head.weight"].dims[0].source == "text_config.vocab_size"
    assert {spec.dtype for spec in layout.values()} == {"float32"}
    implicit = checkpoint_layout(VARIANTS["moe-implicit"])
    k = implicit["model.language_model.layers.1.self_attn.k_proj.weight"]
    assert k.shape == (2 * 16, 64) and "hidden_size / num_attention_heads" in k.dims[0].source


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_moe_layers_follow_transformers(name):
    config = VARIANTS[name]
    model_class = getattr(transformers, config["architectures"][0])
    with torch.device("meta"):
        model = model_class(model_class.config_class.from_dict(copy.deepcopy(config)))
    actual = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in model.model.language_model.layers]
    assert [is_moe_layer(config, i) for i in range(len(actual))] == actual


def test_transformers_config_object_gives_the_same_layout():
    config = VARIANTS["moe-sparse2"]
    hf = transformers.Qwen3VLMoeConfig.from_dict(copy.deepcopy(config))
    assert checkpoint_layout(hf) == checkpoint_layout(config)


@pytest.mark.parametrize("name", ["moe", "moe-sparse2", "moe-implicit"])
def test_per_expert_storage_lists_each_experts_linear_weights(name):
    """Per expert: nn.Linear weights gate/up [I, H] and down [H, I] in place of the two fused tensors."""
    config = VARIANTS[name]
    fused = checkpoint_layout(config)
    per_expert = checkpoint_layout(config, expert_storage="per_expert")
    E, H, I2 = config["text_config"]["num_experts"], config["text_config"]["hidden_size"], 2 * config["text_config"]["moe_intermediate_size"]
    sparse = [i for i in range(config["text_config"]["num_hidden_layers"]) if is_moe_layer(config, i)]
    fused_experts = {n for n in fused if expert_storage_of(n) is not None}
    assert fused_experts == {f"model.language_model.layers.{i}.mlp.experts.{p}" for i in sparse for p in ("gate_up_proj", "down_proj")}
    assert {n: s for n, s in fused.items() if n not in fused_experts} == {n: s for n, s in per_expert.items() if expert_storage_of(n) is None}
    for i in sparse:
        for e in range(E):
            p = f"model.language_model.layers.{i}.mlp.experts.{e}."
            assert expert_storage_of(p + "up_proj.weight") == (i, "per_expert")
            assert per_expert[p + "gate_proj.weight"].shape == per_expert[p + "up_proj.weight"].shape == (I2 // 2, H)
            assert per_expert[p + "down_proj.weight"].shape == (H, I2 // 2)
    down = per_expert[f"model.language_model.layers.{sparse[0]}.mlp.experts.0.down_proj.weight"]
    assert [d.source for d in down.dims] == ["text_config.hidden_size", "text_config.moe_intermediate_size"]
    assert down.fan_in == I2 // 2
    # By layer: only the layers named are per expert.
    one = checkpoint_layout(config, expert_storage={sparse[-1]: "per_expert"})
    assert {expert_storage_of(n) for n in one if expert_storage_of(n) is not None} == {
        *((i, "fused") for i in sparse[:-1]), (sparse[-1], "per_expert")}
