"""Find a checkpoint's chat template wherever transformers would.

transformers reads templates in two places with two orders (5.12.1):

* ``AutoProcessor`` (what a Qwen3-VL user calls): ``processor_config.json``'s
  ``chat_template`` key, else ``chat_template.json`` (the legacy processor file
  of the Qwen3-VL releases), else ``chat_template.jinja`` plus
  ``additional_chat_templates/*.jinja``. It never reads ``tokenizer_config.json``.
* ``AutoTokenizer`` (what MAX's tokenizer holds): ``chat_template.jinja``
  (plus ``additional_chat_templates/``), else ``tokenizer_config.json``'s
  ``chat_template`` (a string, or a list of ``{"name", "template"}``). It never
  reads ``chat_template.json``.

This module takes the processor's order and falls back to the tokenizer's, so
every checkpoint that renders in transformers renders here, and where both
have a template the one ``AutoProcessor.apply_chat_template`` uses wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SOURCES", "ChatTemplate", "MissingChatTemplateError", "find_chat_template"]

# Looked at in this order (see the module docstring).
SOURCES = (
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer_config.json",
)
_EXTRA_DIR = "additional_chat_templates"


class MissingChatTemplateError(ValueError):
    """The checkpoint has no chat template in any place transformers reads one."""


@dataclass(frozen=True)
class ChatTemplate:
    """A template (one string, or named templates with a ``default``) and the file it came from."""

    template: str | dict[str, str]
    source: str


def _resolve(model_path: str | Path, name: str) -> Path | None:
    """The file ``name`` of a local directory, or of a hub repo already in the local cache."""
    local = Path(model_path) / name
    if Path(model_path).is_dir():
        return local if local.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(str(model_path), name, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MissingChatTemplateError(f"cannot read the chat template from {path}: {e}") from e
    if not isinstance(data, dict):
        raise MissingChatTemplateError(f"{path} is not a JSON object")
    return data


def _named(value: Any, path: Path) -> str | dict[str, str] | None:
    """A ``chat_template`` value: a string, or tokenizer_config's list of named templates."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(t, dict) and {"name", "template"} <= t.keys() for t in value):
        return {t["name"]: t["template"] for t in value}
    raise MissingChatTemplateError(
        f"{path}: chat_template must be a string or a list of {{'name', 'template'}} objects, "
        f"not {type(value).__name__}"
    )


def _extra_templates(model_path: str | Path) -> dict[str, str]:
    directory = Path(model_path) / _EXTRA_DIR
    if not directory.is_dir():
        return {}
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(directory.glob("*.jinja"))}


def find_chat_template(model_path: str | Path) -> ChatTemplate:
    """The checkpoint's chat template, by transformers' precedence.

    Raises:
        MissingChatTemplateError: None of :data:`SOURCES` holds one (the
            message names every file looked at), or one is unreadable.
    """
    processor_config = _resolve(model_path, "processor_config.json")
    if processor_config is not None:
        template = _named(_read_json(processor_config).get("chat_template"), processor_config)
        if template is not None:
            return ChatTemplate(template, str(processor_config))
    legacy = _resolve(model_path, "chat_template.json")
    if legacy is not None:
        template = _named(_read_json(legacy).get("chat_template"), legacy)
        if template is not None:
            return ChatTemplate(template, str(legacy))
    jinja = _resolve(model_path, "chat_template.jinja")
    extra = _extra_templates(model_path)
    if jinja is not None or extra:
        templates = dict(extra)
        if jinja is not None:
            templates["default"] = jinja.read_text(encoding="utf-8")
        only_default = list(templates) == ["default"]
        source = jinja if jinja is not None else Path(model_path) / _EXTRA_DIR
        return ChatTemplate(templates["default"] if only_default else templates, str(source))
    tokenizer_config = _resolve(model_path, "tokenizer_config.json")
    if tokenizer_config is not None:
        template = _named(_read_json(tokenizer_config).get("chat_template"), tokenizer_config)
        if template is not None:
            return ChatTemplate(template, str(tokenizer_config))
    raise MissingChatTemplateError(
        f"{model_path} has no chat template: looked in "
        + ", ".join([*SOURCES[:3], f"{_EXTRA_DIR}/*.jinja", SOURCES[3]])
        + " (chat requests need one; add the model's template as chat_template.jinja)"
    )
