"""Validation of the Kubeflow SDK's config objects, at the point of use.

The SDK's dataclasses (``kubeflow.trainer.LoraConfig``, ``TorchTuneInstructDataset``, the
initializers) check nothing when they are built, so each ``normalize_*`` function here checks
one of them and returns a normalized copy (enum members for enum values given as text, the
defaults filled in); the user's object is never changed. ``kfp_finetune.TorchTuneConfig``
calls them on its nested objects, and ``train()``, the client and the CLI go through
:func:`kfp_finetune.config.types.normalize_config`. Every error is a ``ConfigError`` (a
``SourceError`` for a storage URI) that names the value and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from enum import Enum
from typing import Any, TypeVar

from kubeflow.trainer import (
    DataFormat,
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    LoraConfig,
    S3DatasetInitializer,
    S3ModelInitializer,
    TorchTuneInstructDataset,
)
from kubeflow.trainer.constants import constants

from kfp_finetune.errors import ConfigError

E = TypeVar("E", bound=Enum)

# torchtune.training.seed.set_seed (0.6.1) refuses seeds outside [0, 2**32 - world_size]
# (each rank seeds numpy with seed + rank, a uint32); with up to 8 processes per node:
SEED_MAX = 2**32 - 8
# LoRA exists to train a low-rank update; a rank above this is as large as the hidden size of
# the biggest supported model (8192, Llama 3.3 70B: 1024 keeps the adapter < 1/8 of a layer)
# and is a typo (an extra zero) far more often than a choice.
LORA_RANK_MAX = 1024
_COLUMN_KEYS = ("instruction", "input", "output", "messages", "conversations")
_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
# The SDK's model initializers default to these (kubeflow.trainer.constants.constants
# INITIALIZER_DEFAULT_IGNORE_PATTERNS). Our model step already skips other weight formats
# unless a repository has nothing else, which that default would break, so it means "not set".
SDK_DEFAULT_IGNORE = tuple(constants.INITIALIZER_DEFAULT_IGNORE_PATTERNS)


def coerce_enum(enum_cls: type[E], value: Any, field_name: str) -> E:
    """Turn an enum member, its value or its name (any case) into the member.

    Args:
        enum_cls: The enum class, e.g. ``DataType``.
        value: ``DataType.BF16``, ``"bf16"``, ``"BF16"`` or ``"DataType.BF16"``.
        field_name: Parameter name, used in the error message.

    Returns:
        The enum member.

    Raises:
        ConfigError: The value names no member; the message lists the allowed values.
    """
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(f"{enum_cls.__name__}."):
            text = text[len(enum_cls.__name__) + 1 :]
        for member in enum_cls:
            if text == member.value or text.lower() == member.name.lower():
                return member
    allowed = ", ".join(repr(m.value) for m in enum_cls)
    raise ConfigError(
        f"{field_name}={value!r} is not a valid {enum_cls.__name__}; "
        f"use one of {allowed} (or the enum member, e.g. {enum_cls.__name__}."
        f"{next(iter(enum_cls)).name})."
    )


def check_int(value: Any, field_name: str, minimum: int) -> int:
    """A whole number (not a bool) of at least ``minimum``; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(
            f"{field_name}={value!r} must be an integer >= {minimum}; "
            f"pass a whole number such as {max(minimum, 1)}."
        )
    if value < minimum:
        raise ConfigError(
            f"{field_name}={value} is below the minimum {minimum}; set {field_name} to {minimum} "
            "or more."
        )
    return value


def check_number(value: Any, field_name: str, low: float, high: float | None,
                 low_open: bool = True, high_open: bool = True, example: str = "") -> float:
    """A finite real number within the bounds (NaN and infinities are refused)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    if ok and not math.isfinite(value):
        raise ConfigError(
            f"{field_name}={value!r} is not a finite number; give a real value"
            f"{' such as ' + example if example else ''}."
        )
    ok = ok and (value > low if low_open else value >= low)
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        span = (f"{'(' if low_open else '['}{low:g}, "
                f"{'inf)' if high is None else f'{high:g}' + (')' if high_open else ']')}")
        raise ConfigError(
            f"{field_name}={value!r} must be a number in {span}"
            f"{', e.g. ' + example if example else ''}."
        )
    return float(value)


def check_bool(value: Any, field_name: str) -> bool | None:
    """None, True or False; ConfigError for anything else (``"yes"``, ``1``)."""
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{field_name}={value!r} must be true or false.")
    return value


_SPLIT_RE = re.compile(
    r"^[A-Za-z_][\w.-]*"  # split name
    r"(\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$"  # optional slice [a:b], percents allowed
)


def check_split_syntax(split: str) -> str:
    """Check a ``datasets`` split expression such as ``train`` or ``train[:95%]``.

    Args:
        split: The split expression.

    Returns:
        The split, without surrounding blanks.

    Raises:
        ConfigError: The expression is not of the form ``name`` or ``name[start:stop]``.
    """
    if not isinstance(split, str) or not _SPLIT_RE.match(split.strip()):
        raise ConfigError(
            f"split={split!r} is not a valid split expression; use a split name with an "
            "optional slice, e.g. 'train', 'train[:95%]' or 'train[100:200]'."
        )
    for part in re.findall(r"-?\d+%", split):
        if not 0 <= abs(int(part[:-1])) <= 100:
            raise ConfigError(
                f"split={split!r} has the percentage {part}; percentages must lie in 0..100%."
            )
    return split.strip()


def check_column_map(column_map: Any) -> dict[str, str] | None:
    """Validate a column map: keys are the expected column names, values the dataset's.

    Args:
        column_map: A mapping or None.

    Returns:
        The mapping as a plain dict, or None when empty.

    Raises:
        ConfigError: It is not a mapping of known keys to non-empty column names.
    """
    if column_map is None or column_map == {}:
        return None
    if not isinstance(column_map, dict):
        raise ConfigError(
            f"column_map={column_map!r} must be a mapping such as "
            "{'input': 'question', 'output': 'answer'}."
        )
    for key, value in column_map.items():
        if key not in _COLUMN_KEYS:
            raise ConfigError(
                f"column_map key {key!r} is not an expected column; keys must be among "
                f"{', '.join(_COLUMN_KEYS)} and values the column names in your data."
            )
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(
                f"column_map[{key!r}]={value!r} must be the non-empty name of a column in "
                "your data."
            )
    seen: dict[str, str] = {}
    for key, value in column_map.items():
        if value.strip() in seen:
            raise ConfigError(
                f"column_map maps both {seen[value.strip()]!r} and {key!r} to the column "
                f"{value.strip()!r}; the model would learn to copy its prompt. Map each of them "
                "to its own column."
            )
        seen[value.strip()] = key
    return {str(k): str(v).strip() for k, v in column_map.items()}


def normalize_dataset(dataset: Any) -> TorchTuneInstructDataset:
    """A checked copy of the SDK's ``TorchTuneInstructDataset``, with the defaults filled in.

    Defaults: ``source`` parquet, ``split`` ``"train"``, ``train_on_input`` False. ``source``
    may be given as its value (``"parquet"``).

    Raises:
        ConfigError: Not a ``TorchTuneInstructDataset``, or a field is invalid.
    """
    if dataset is None:
        dataset = TorchTuneInstructDataset()
    if not isinstance(dataset, TorchTuneInstructDataset):
        raise ConfigError(
            f"dataset_preprocess_config={_shown(dataset)} must be a "
            "TorchTuneInstructDataset(...)."
        )
    split = dataset.split
    train_on_input = False if dataset.train_on_input is None else dataset.train_on_input
    prompt = None if dataset.new_system_prompt in (None, "") else dataset.new_system_prompt
    if prompt is not None and not isinstance(prompt, str):
        raise ConfigError(f"new_system_prompt={prompt!r} must be text.")
    return dataclasses.replace(
        dataset,
        source=coerce_enum(DataFormat, dataset.source or DataFormat.PARQUET, "source"),
        split="train" if split is None or split == "" else check_split_syntax(split),
        train_on_input=check_bool(train_on_input, "train_on_input"),
        new_system_prompt=prompt,
        column_map=check_column_map(dataset.column_map),
    )


def normalize_lora(lora: Any) -> LoraConfig | None:
    """A checked copy of the SDK's ``LoraConfig`` (None stays None: full fine-tuning).

    Raises:
        ConfigError: Not a ``LoraConfig``, or a field is out of range.
    """
    if lora is None:
        return None
    if not isinstance(lora, LoraConfig):
        raise ConfigError(f"peft_config={_shown(lora)} must be a LoraConfig(...) or None.")
    modules = lora.lora_attn_modules
    modules = list(modules) if isinstance(modules, (list, tuple)) else None
    if not modules or any(m not in _LORA_MODULES for m in modules):
        raise ConfigError(
            f"lora_attn_modules={lora.lora_attn_modules!r} must be a non-empty list among "
            f"{', '.join(_LORA_MODULES)}."
        )
    for name in ("apply_lora_to_mlp", "apply_lora_to_output", "quantize_base", "use_dora"):
        check_bool(getattr(lora, name), name)
    if lora.lora_rank is not None:
        check_int(lora.lora_rank, "lora_rank", 1)
        if lora.lora_rank > LORA_RANK_MAX:
            raise ConfigError(
                f"lora_rank={lora.lora_rank} is above {LORA_RANK_MAX}: LoRA trains a "
                "low-rank update, and a rank that large costs as much memory as full "
                "fine-tuning (usual ranks are 8 to 128); lower it, or use full fine-tuning "
                "(lora_method empty)."
            )
    if lora.lora_alpha is not None:
        check_number(lora.lora_alpha, "lora_alpha", 0, None, example="16 or 2 * lora_rank")
    if lora.lora_dropout is not None:
        try:
            check_number(lora.lora_dropout, "lora_dropout", 0, 1, low_open=False, example="0.05")
        except ConfigError:
            raise ConfigError(
                f"lora_dropout={lora.lora_dropout!r} must lie in [0, 1), e.g. 0.05."
            ) from None
    if lora.quantize_base and lora.use_dora:
        raise ConfigError(
            "quantize_base=True with use_dora=True is not supported by torchtune's "
            "recipes; choose QLoRA (quantize_base) or DoRA (use_dora), not both."
        )
    return dataclasses.replace(lora, lora_attn_modules=modules)


def check_resources(resources: Any) -> dict[str, Any]:
    """Validate ``resources_per_node``: keys gpu, cpu, memory; 0 to 8 GPUs (one node).

    Raises:
        ConfigError: Not a mapping, an unknown key, or a GPU count out of range.
    """
    if not isinstance(resources, dict):
        raise ConfigError(
            f"resources_per_node={resources!r} must be a mapping such as {{'gpu': 1}}."
        )
    allowed = {"gpu", "cpu", "memory"}
    unknown = sorted(set(resources) - allowed)
    if unknown:
        raise ConfigError(
            f"resources_per_node has unknown keys {unknown}; allowed keys are "
            f"{sorted(allowed)}, e.g. {{'gpu': 2}}."
        )
    if "gpu" in resources:
        check_int(resources["gpu"], "resources_per_node['gpu']", 0)
        if resources["gpu"] > 8:
            raise ConfigError(
                f"resources_per_node['gpu']={resources['gpu']} exceeds one node's 8 GPUs; "
                "use 1 to 8 GPUs (multi-node fine-tuning is not supported)."
            )
    return dict(resources)


_INITIALIZERS = {
    "dataset": (HuggingFaceDatasetInitializer, S3DatasetInitializer),
    "model": (HuggingFaceModelInitializer, S3ModelInitializer),
}


def _shown(value: Any) -> str:
    # Text and numbers as they are; an object by its class only, since an initializer's repr
    # shows its access_token and keys (the SDK's dataclasses do not hide them).
    if value is None or isinstance(value, (str, int, float, bool, dict, list)):
        return repr(value)
    return f"{type(value).__name__}(...)"


def normalize_initializer(init: Any, role: str) -> Any:
    """A checked copy of a dataset or model initializer (the SDK's HF or S3 one).

    ``storage_uri`` is parsed (a ``pathlib.Path`` becomes its text); the SDK's default
    ``ignore_patterns`` of a model initializer count as not set; a dataset initializer's
    ``ignore_patterns`` are refused (point ``storage_uri`` at the data instead).

    Args:
        init: The initializer, or None.
        role: ``"dataset"`` or ``"model"``.

    Returns:
        The copy, or None when ``init`` is None.

    Raises:
        ConfigError: Not a supported initializer, or an unsupported field.
        SourceError: The storage URI is invalid.
    """
    from kfp_finetune.storage.fetch import check_ignore_patterns
    from kfp_finetune.storage.uris import parse_storage_uri

    if init is None:
        return None
    hf_cls, s3_cls = _INITIALIZERS[role]
    if not isinstance(init, (hf_cls, s3_cls)):
        fix = (f"wrap the URI: {role}={hf_cls.__name__}(storage_uri={init!r})"
               if isinstance(init, str) else f"use {hf_cls.__name__}(storage_uri=...)")
        raise ConfigError(
            f"Initializer({role}={_shown(init)}) must be a {hf_cls.__name__}(storage_uri=...) "
            f"or {s3_cls.__name__}(storage_uri=...), or None; {fix}."
        )
    owner = type(init).__name__
    uri = init.storage_uri
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)  # a pathlib.Path is a local path
    parse_storage_uri(uri, kind=role)
    patterns = init.ignore_patterns
    if role == "model" and patterns is not None and tuple(patterns) == SDK_DEFAULT_IGNORE:
        patterns = None
    patterns = list(check_ignore_patterns(patterns)) or None
    if role == "dataset" and patterns:
        raise ConfigError(
            f"{owner}(ignore_patterns={patterns!r}) is not supported: point storage_uri at "
            "the data directory or file to use instead."
        )
    return dataclasses.replace(init, storage_uri=uri, ignore_patterns=patterns)
