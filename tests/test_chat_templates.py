"""Chat templates are found wherever transformers finds them, with its precedence.

One tiny checkpoint per template placement (``tokenizer_config.json``,
``chat_template.json``, ``chat_template.jinja``, all of them); each renders the
same prompt ids as transformers' ``AutoProcessor.apply_chat_template`` and
generates through the Python API.
"""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import transformers
from PIL import Image
from qwen3vl_moe.chat_template import MissingChatTemplateError, find_chat_template
from qwen3vl_moe.checkpoints import tiny

SEED = 0
PLACEMENTS = ["tokenizer_config", "chat_template_json", "jinja", "all"]
IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8))
TEXT = [{"role": "user", "content": "Describe the weather."}]
WITH_IMAGE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is this?"}]},
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("templates")
    return {p: tiny.write_tiny_checkpoint(root / p, "moe", SEED, chat_template=p) for p in PLACEMENTS}


def _marked(template: str, mark: str) -> str:
    """The template with ``mark`` prepended to every rendering (to tell sources apart)."""
    return mark + template


def _transformers_ids(path, messages) -> list[int]:
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    # transformers' processor never reads tokenizer_config.json's template; its
    # tokenizer does, and that is what a user of such a checkpoint passes.
    template = processor.chat_template or processor.tokenizer.chat_template
    out = processor.apply_chat_template(
        messages, chat_template=template, tokenize=True, add_generation_prompt=True, return_dict=True,
    )
    return list(np.asarray(out["input_ids"]).reshape(-1))


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_placement_writes_only_its_files(checkpoints, placement):
    path = checkpoints[placement]
    in_tokenizer_config = "chat_template" in json.loads((path / "tokenizer_config.json").read_text())
    assert in_tokenizer_config == (placement in ("tokenizer_config", "all"))
    assert (path / "chat_template.json").exists() == (placement in ("chat_template_json", "all"))
    assert (path / "chat_template.jinja").exists() == (placement in ("jinja", "all"))
    found = find_chat_template(path)
    assert found.template == tiny.CHAT_TEMPLATE
    expected_source = {
        "tokenizer_config": "tokenizer_config.json", "chat_template_json": "chat_template.json",
        "jinja": "chat_template.jinja", "all": "chat_template.json",
    }[placement]
    assert found.source == str(path / expected_source)


def _conflicting(checkpoints, tmp_path, files: dict[str, str]):
    """The all-placements checkpoint with each named file's template marked differently."""
    path = shutil.copytree(checkpoints["all"], tmp_path / "conflict")
    for name, mark in files.items():
        if name == "chat_template.jinja":
            (path / name).write_text(_marked(tiny.CHAT_TEMPLATE, mark))
        else:
            data = json.loads((path / name).read_text())
            data["chat_template"] = _marked(tiny.CHAT_TEMPLATE, mark)
            (path / name).write_text(json.dumps(data))
    return path


def test_precedence_is_the_processors_then_the_tokenizers(checkpoints, tmp_path):
    """Where placements disagree, the template AutoProcessor uses wins; where the
    processor has none, the one AutoTokenizer uses."""
    path = _conflicting(
        checkpoints, tmp_path,
        {"chat_template.json": "JSON ", "chat_template.jinja": "JINJA ", "tokenizer_config.json": "TOKCFG "},
    )
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    assert find_chat_template(path).template == processor.chat_template
    assert processor.chat_template.startswith("JSON ")
    (path / "chat_template.json").unlink()
    processor = transformers.AutoProcessor.from_pretrained(path, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert find_chat_template(path).template == processor.chat_template == tokenizer.chat_template
    assert tokenizer.chat_template.startswith("JINJA ")
    (path / "chat_template.jinja").unlink()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert find_chat_template(path).template == tokenizer.chat_template
    assert tokenizer.chat_template.startswith("TOKCFG ")


def test_named_templates_in_tokenizer_config(checkpoints, tmp_path):
    path = shutil.copytree(checkpoints["tokenizer_config"], tmp_path / "named")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "default", "template": tiny.CHAT_TEMPLATE},
        {"name": "tool_use", "template": _marked(tiny.CHAT_TEMPLATE, "TOOLS ")},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    assert find_chat_template(path).template == tokenizer.chat_template
    assert set(tokenizer.chat_template) == {"default", "tool_use"}


def test_no_template_names_every_file_looked_at(checkpoints, tmp_path):
    path = shutil.copytree(checkpoints["jinja"], tmp_path / "none")
    (path / "chat_template.jinja").unlink()
    with pytest.raises(MissingChatTemplateError) as info:
        find_chat_template(path)
    message = str(info.value)
    for name in ("processor_config.json", "chat_template.json", "chat_template.jinja",
                 "additional_chat_templates/*.jinja", "tokenizer_config.json"):
        assert name in message


def test_malformed_template_entry_names_the_file(checkpoints, tmp_path):
    path = shutil.copytree(checkpoints["chat_template_json"], tmp_path / "bad")
    (path / "chat_template.json").write_text(json.dumps({"chat_template": 42}))
    with pytest.raises(MissingChatTemplateError, match=r"chat_template\.json: chat_template must be a string"):
        find_chat_template(path)


@pytest.fixture(scope="module")
def tokenizers(checkpoints) -> dict:
    """This package's request tokenizer per placement (no graph compile)."""
    from max.pipelines.lib import PIPELINE_REGISTRY, PipelineArgs, PipelineConfig
    from qwen3vl_moe import TELEMETRY_OFF  # noqa: F401

    out = {}
    for placement, path in checkpoints.items():
        config = PipelineConfig.from_args(PipelineArgs.from_flat_kwargs(
            model_path=str(path), device_specs="cpu", custom_architectures=["qwen3vl_moe"], max_length=4096,
        ))
        out[placement] = PIPELINE_REGISTRY.retrieve_tokenizer(config)
    return out


def _prompt_ids(tokenizer, messages) -> list[int]:
    from max.pipelines.context import SamplingParams
    from max.pipelines.modeling.types import RequestID, TextGenerationRequest
    from qwen3vl_moe.api import _split_media

    chat, images, _ = _split_media(messages)
    context = asyncio.run(tokenizer.new_context(TextGenerationRequest(
        request_id=RequestID(), model_name="m", messages=chat, images=images,
        sampling_params=SamplingParams(max_new_tokens=1),
    )))
    return [int(t) for t in context.tokens.all[: len(context.tokens)]]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("messages", [TEXT, WITH_IMAGE], ids=["text", "image"])
def test_prompt_ids_equal_transformers(checkpoints, tokenizers, placement, messages):
    ids = _prompt_ids(tokenizers[placement], messages)
    assert ids == _transformers_ids(checkpoints[placement], messages)
    assert tokenizers[placement].delegate.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_generation_works_for_every_placement(checkpoints):
    """Same weights, same graphs as the moe preset (compile cache hits): each
    placement generates, with transformers' prompt ids and identical tokens."""
    from qwen3vl_moe.api import Qwen3VL

    outputs = {}
    for placement, path in checkpoints.items():
        llm = Qwen3VL(path, devices="cpu", max_length=1024, max_batch_size=1)
        [out] = llm.generate([WITH_IMAGE], max_new_tokens=6, ignore_eos=True)
        assert out.prompt_token_ids == _transformers_ids(path, WITH_IMAGE)
        assert len(out.token_ids) == 6
        outputs[placement] = out.token_ids
        del llm
    assert len({tuple(ids) for ids in outputs.values()}) == 1, outputs
