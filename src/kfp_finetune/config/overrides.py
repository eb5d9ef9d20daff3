"""The one validator of raw torchtune ``key=value`` overrides.

An override is resolved the way it will take effect, then compared with the keys the pipeline
owns (the workspace layout and the values it derives from its own parameters):

* ``~key`` deletes ``key`` (torchtune's command-line syntax; ``tune_config.apply_overrides``
  does the same), so deleting an owned key or a section that holds one is refused too;
* ``section=value`` on a section that holds a component is torchtune's alias of
  ``section._component_=value`` (``torchtune/config/_utils.py::_merge_yaml_and_cli_args``:
  ``if k in yaml_kwargs and _has_component(yaml_kwargs[k]): k += "._component_"``), so the
  key is rewritten that way before it is checked and applied;
* setting a section (``checkpointer={...}``) replaces every key under it;
* a key whose last part names a folder or file list (``output_dir``, ``log_dir``,
  ``checkpoint_dir``, ``cache_dir``, ``data_dir``, ``data_files``) reads or writes files
  outside the workspace layout, wherever it sits (``checkpointer.output_dir``,
  ``profiler.output_dir``, ...).

Values are parsed as YAML (as ``apply_overrides`` does) and interpolations (``${...}``) with
OmegaConf's grammar, so a malformed value is refused here, not inside ``tune run``.
"""

from __future__ import annotations

import re
from typing import Any

from kfp_finetune.errors import ConfigError
from kfp_finetune.storage.credentials import redact

# The keys the README has always listed first; a refusal names the first owned key it hits.
FIXED_KEYS = (
    "output_dir",
    "tokenizer.path",
    "tokenizer.merges_file",
    "checkpointer.checkpoint_dir",
)
# Owned key -> what to do instead.
OWNED: dict[str, str] = {
    **{key: "the pipeline fixes it to the workspace layout" for key in FIXED_KEYS},
    "tokenizer.special_tokens_path": "the model step sets it to the model's tokenizer.json",
    "tokenizer._component_": "the runtime chooses the tokenizer; choose another runtime",
    "checkpointer.output_dir": "the pipeline fixes it to the workspace layout",
    "checkpointer.checkpoint_files": "the model step lists the model's weight files",
    "checkpointer.model_type": "the runtime sets it; choose another runtime",
    "checkpointer.recipe_checkpoint": "the fine-tune step manages resuming",
    "checkpointer._component_": "the export step reads the Hugging Face checkpointer's output",
    "model._component_": "the runtime and lora_method choose the model builder",
    "model.checkpoint_dir": "the pipeline fixes it to the workspace layout",
    "dataset._component_": "the dataset step chooses the builder from the data's columns",
    "dataset.source": "use the source parameter",
    "dataset.data_files": "the dataset step lists the data files it checked",
    "dataset.data_dir": "point dataset_uri at the folder instead",
    "dataset.split": "use the split parameter",
    "dataset.column_map": "use the column_map parameter",
    "dataset.cache_dir": "the pipeline fixes it to the workspace layout",
    "dataset.conversation_column": "use column_map={'messages': '<column>'}",
    "dataset.conversation_style": "the dataset step detects it from the data",
    "metric_logger._component_": "the fine-tune step reads torchtune's DiskLogger output",
    "metric_logger.log_dir": "the pipeline fixes it to the workspace layout",
    "metric_logger.filename": "the fine-tune step reads metrics.txt",
    "resume_from_checkpoint": "the fine-tune step resumes a retried run by itself",
}
# Leaf names that point at files or folders, owned wherever they sit.
PATH_LEAVES = ("output_dir", "log_dir", "checkpoint_dir", "cache_dir", "data_dir", "data_files")
# Top-level sections of torchtune's configs that hold a ``_component_``.
COMPONENT_SECTIONS = ("model", "tokenizer", "dataset", "checkpointer", "optimizer", "loss",
                      "metric_logger", "profiler", "lr_scheduler")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_EXAMPLE = "write e.g. 'optimizer.weight_decay=0.01'"


def _split_items(overrides: Any) -> list[Any]:
    if isinstance(overrides, str):
        return [p for p in overrides.split("\n") if p.strip()]
    if not isinstance(overrides, (list, tuple)):
        raise ConfigError(
            f"overrides={redact(repr(overrides))[:120]} must be a list of 'key=value' strings, "
            "e.g. ['optimizer.weight_decay=0.01']."
        )
    return list(overrides)


def _owned_hit(key: str) -> tuple[str, str] | None:
    """The owned key that setting or deleting ``key`` changes, with what to do instead."""
    for owned, why in OWNED.items():
        if key == owned or owned.startswith(key + ".") or key.startswith(owned + "."):
            return owned, why
    parts = key.split(".")
    for leaf in PATH_LEAVES:
        if leaf in parts:
            return key, "it points at files outside the pipeline's workspace layout"
    return None


def _parse_value(text: str, key: str, raw: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        detail = str(exc).strip().splitlines()[0]
        raise ConfigError(
            f"override {redact(text)!r}: the value of {redact(key)!r} is not valid YAML "
            f"({detail}); quote it as a string (key='text'), or write a number, true/false, "
            "[a, b] or {k: v}."
        ) from None
    if isinstance(raw, str) and "${" in raw:
        from omegaconf import grammar_parser
        from omegaconf.errors import GrammarParseError

        try:
            grammar_parser.parse(raw.strip())
        except GrammarParseError:
            raise ConfigError(
                f"override {redact(text)!r}: the value of {redact(key)!r} is a malformed OmegaConf "
                "interpolation; write ${section.key} with matching braces, or quote it."
            ) from None
    return value


def check_override(item: Any) -> str:
    """Validate one override and return it as it will be applied.

    Args:
        item: ``"key=value"`` or ``"~key"`` (deletion).

    Returns:
        The override with its key resolved (``section=X`` -> ``section._component_=X``).

    Raises:
        ConfigError: It is not ``key=value``, its value is malformed, or it sets or deletes
            a key the pipeline owns; the message names the key and what to do instead.
    """
    if not isinstance(item, str):
        raise ConfigError(
            f"override {redact(repr(item))[:80]} is of type {type(item).__name__}, not text; "
            f"{_EXAMPLE}."
        )
    text = item.strip()
    remove = text.startswith("~")
    key, sep, raw = text.lstrip("~").partition("=")
    if not _KEY_RE.match(key) or (not sep and not remove):
        raise ConfigError(
            f"override {redact(text)!r} is not key=value (a dotted key of letters, digits and "
            f"'_', then '=', then the value); {_EXAMPLE}, or '~key' to delete a key."
        )
    if remove and "_component_" in key:
        raise ConfigError(
            f"override {redact(text)!r} deletes a _component_, which torchtune refuses; set "
            "the section to another component instead."
        )
    value = None if remove else _parse_value(text, key, raw)
    if key in COMPONENT_SECTIONS and not remove and not isinstance(value, dict):
        key = f"{key}._component_"  # torchtune's alias: section=X sets section._component_
    hit = _owned_hit(key)
    if hit is not None:
        owned, why = hit
        verb = "deletes" if remove else "sets"
        raise ConfigError(
            f"override {redact(text)!r} {verb} {owned!r}, which the pipeline owns ({why}); "
            "remove it."
        )
    if remove:
        return f"~{key}"
    return f"{key}={raw}"


def check_overrides(overrides: Any) -> list[str] | None:
    """Validate raw torchtune ``key=value`` overrides (see the module docstring).

    Args:
        overrides: A list of strings (or a newline separated string), or None.

    Returns:
        The overrides as they will be applied, or None when empty.

    Raises:
        ConfigError: An item is malformed or sets a key the pipeline owns.
    """
    if overrides is None or overrides == [] or overrides == "" or overrides == ():
        return None
    return [check_override(item) for item in _split_items(overrides)] or None
