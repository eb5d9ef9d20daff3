"""The user-facing API, with the names and meaning of the Kubeflow Trainer SDK.

A user of ``kubeflow.trainer`` recognises every class here: ``TorchTuneConfig``,
``TorchTuneInstructDataset``, ``LoraConfig``, ``HuggingFaceDatasetInitializer``,
``HuggingFaceModelInitializer`` and the enums ``DataType``, ``DataFormat`` and ``Loss``.
Every dataclass validates itself on construction, so bad input fails before anything runs.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

from kfp_finetune.config.overrides import FIXED_KEYS as FIXED_KEYS
from kfp_finetune.config.overrides import check_overrides
from kfp_finetune.errors import ConfigError


class Loss(Enum):
    """Loss function for the fine-tune step (value: the torchtune component path)."""

    CEWithChunkedOutputLoss = "torchtune.modules.loss.CEWithChunkedOutputLoss"


class DataType(Enum):
    """Training precision."""

    BF16 = "bf16"
    FP32 = "fp32"


class DataFormat(Enum):
    """Format of the dataset files (the ``datasets`` builder name)."""

    JSON = "json"
    CSV = "csv"
    PARQUET = "parquet"
    ARROW = "arrow"
    TEXT = "text"
    XML = "xml"


E = TypeVar("E", bound=Enum)


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


def _check_int(value: Any, field_name: str, minimum: int) -> int:
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


def _check_number(value: Any, field_name: str, low: float, high: float | None,
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


# torchtune.training.seed.set_seed (0.6.1) refuses seeds outside [0, 2**32 - world_size]
# (each rank seeds numpy with seed + rank, a uint32); with up to 8 processes per node:
SEED_MAX = 2**32 - 8
# LoRA exists to train a low-rank update; a rank above this is as large as the hidden size of
# the biggest supported model (8192, Llama 3.3 70B: 1024 keeps the adapter < 1/8 of a layer)
# and is a typo (an extra zero) far more often than a choice.
LORA_RANK_MAX = 1024
_COLUMN_KEYS = ("instruction", "input", "output", "messages", "conversations")


@dataclass
class TorchTuneInstructDataset:
    """How the dataset files are read and turned into prompts and responses.

    Args:
        source: Format of the data files (``DataFormat`` or its value). Default: parquet.
        split: Split expression of ``datasets``, e.g. ``"train[:95%]"``. Default: ``"train"``.
        train_on_input: Whether the prompt tokens count in the loss. Default: False.
        new_system_prompt: A system message prepended to every sample. Default: none.
        column_map: Maps the expected column names (``instruction``, ``input``, ``output``) to
            the names in your data, e.g. ``{"input": "incorrect", "output": "correct"}``.
    """

    source: DataFormat | str | None = None
    split: str | None = None
    train_on_input: bool | None = None
    new_system_prompt: str | None = None
    column_map: dict[str, str] | None = None

    def __post_init__(self) -> None:
        self.source = coerce_enum(DataFormat, self.source or DataFormat.PARQUET, "source")
        if self.split is None or self.split == "":
            self.split = "train"
        check_split_syntax(self.split)
        if self.train_on_input is None:
            self.train_on_input = False
        if not isinstance(self.train_on_input, bool):
            raise ConfigError(
                f"train_on_input={self.train_on_input!r} must be true or false."
            )
        if self.new_system_prompt == "":
            self.new_system_prompt = None
        if self.new_system_prompt is not None and not isinstance(self.new_system_prompt, str):
            raise ConfigError(f"new_system_prompt={self.new_system_prompt!r} must be text.")
        self.column_map = check_column_map(self.column_map)


_SPLIT_RE = re.compile(
    r"^[A-Za-z_][\w.-]*"  # split name
    r"(\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?$"  # optional slice [a:b], percents allowed
)


def check_split_syntax(split: str) -> str:
    """Check a ``datasets`` split expression such as ``train`` or ``train[:95%]``.

    Args:
        split: The split expression.

    Returns:
        The split, unchanged.

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


_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


@dataclass
class LoraConfig:
    """Parameter-efficient fine-tuning: LoRA, QLoRA (``quantize_base``) or DoRA (``use_dora``).

    Args:
        apply_lora_to_mlp: Add LoRA to the MLP layers. Default: runtime config's.
        apply_lora_to_output: Add LoRA to the output projection. Default: runtime config's.
        lora_attn_modules: Attention projections that get LoRA, among q_proj, k_proj, v_proj,
            output_proj. Default: ``["q_proj", "v_proj", "output_proj"]``.
        lora_rank: Rank of the LoRA matrices. Default: runtime config's.
        lora_alpha: LoRA scaling. Default: runtime config's.
        lora_dropout: Dropout on the LoRA path. Default: runtime config's.
        quantize_base: Quantize the frozen base weights to NF4 (QLoRA).
        use_dora: Use DoRA instead of LoRA.
    """

    apply_lora_to_mlp: bool | None = None
    apply_lora_to_output: bool | None = None
    lora_attn_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj", "output_proj"]
    )
    lora_rank: int | None = None
    lora_alpha: int | float | None = None
    lora_dropout: float | None = None
    quantize_base: bool | None = None
    use_dora: bool | None = None

    def __post_init__(self) -> None:
        modules = list(self.lora_attn_modules or [])
        if not modules or any(m not in _LORA_MODULES for m in modules):
            raise ConfigError(
                f"lora_attn_modules={self.lora_attn_modules!r} must be a non-empty list among "
                f"{', '.join(_LORA_MODULES)}."
            )
        self.lora_attn_modules = modules
        if self.lora_rank is not None:
            _check_int(self.lora_rank, "lora_rank", 1)
            if self.lora_rank > LORA_RANK_MAX:
                raise ConfigError(
                    f"lora_rank={self.lora_rank} is above {LORA_RANK_MAX}: LoRA trains a "
                    "low-rank update, and a rank that large costs as much memory as full "
                    "fine-tuning (usual ranks are 8 to 128); lower it, or use full fine-tuning "
                    "(peft_method none)."
                )
        if self.lora_alpha is not None:
            _check_number(self.lora_alpha, "lora_alpha", 0, None, example="16 or 2 * lora_rank")
        if self.lora_dropout is not None:
            try:
                _check_number(self.lora_dropout, "lora_dropout", 0, 1, low_open=False,
                              example="0.05")
            except ConfigError:
                raise ConfigError(
                    f"lora_dropout={self.lora_dropout!r} must lie in [0, 1), e.g. 0.05."
                ) from None
        if self.quantize_base and self.use_dora:
            raise ConfigError(
                "quantize_base=True with use_dora=True is not supported by torchtune's "
                "recipes; choose QLoRA (quantize_base) or DoRA (use_dora), not both."
            )


@dataclass
class TorchTuneConfig:
    """The fine-tune step's configuration (``BuiltinTrainer(config=TorchTuneConfig(...))``).

    Args:
        dtype: Training precision, ``DataType.BF16`` or ``DataType.FP32``. Default: runtime's.
        batch_size: Samples per device per step. Default: runtime's.
        epochs: Passes over the dataset. Default: runtime's.
        loss: Loss function. Default: ``Loss.CEWithChunkedOutputLoss``.
        num_nodes: Number of nodes; only 1 is supported (as in Kubeflow Trainer).
        peft_config: A ``LoraConfig`` for LoRA/QLoRA/DoRA; None for full fine-tuning.
        dataset_preprocess_config: How the dataset is read (``TorchTuneInstructDataset``).
        resources_per_node: ``{"gpu": N}``: GPUs requested per node, and the process count.
            ``{"gpu": 0}`` trains on CPU.
        learning_rate: Optimizer learning rate. Default: the torchtune config's.
        gradient_accumulation_steps: Steps whose gradients are summed before an update.
        max_seq_len: Longest tokenized sample; longer ones are truncated. Needed for packing.
        packed: Pack several samples into each max_seq_len sequence (faster on GPU).
        activation_checkpointing: Recompute activations in the backward pass (less memory).
        compile: ``torch.compile`` the model and loss (faster after a warm-up, GPU only).
        max_steps_per_epoch: Stop each epoch after this many steps.
        seed: Random seed (default 42, so runs are reproducible).
        overrides: Raw torchtune ``key=value`` overrides for everything else, applied last;
            ``output_dir``, ``tokenizer.path``, ``tokenizer.merges_file`` and
            ``checkpointer.checkpoint_dir`` are set by the pipeline and refused here.
        eval_split: Held-out split expression, e.g. ``"train[95%:]"`` with
            ``split="train[:95%]"``; it must not share a row with the training split. The
            fine-tune step reports the base and the fine-tuned model's loss and perplexity on
            it. Default: none (no held-out evaluation).
    """

    dtype: DataType | str | None = None
    batch_size: int | None = None
    epochs: int | None = None
    loss: Loss | str | None = None
    num_nodes: int | None = None
    peft_config: LoraConfig | None = None
    dataset_preprocess_config: TorchTuneInstructDataset | None = None
    resources_per_node: dict[str, Any] | None = None
    learning_rate: float | None = None
    gradient_accumulation_steps: int | None = None
    max_seq_len: int | None = None
    packed: bool | None = None
    activation_checkpointing: bool | None = None
    compile: bool | None = None
    max_steps_per_epoch: int | None = None
    seed: int | None = None
    overrides: list[str] | None = None
    eval_split: str | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            self.dtype = coerce_enum(DataType, self.dtype, "dtype")
        if self.loss is not None:
            self.loss = coerce_enum(Loss, self.loss, "loss")
        if self.batch_size is not None:
            _check_int(self.batch_size, "batch_size", 1)
        if self.epochs is not None:
            _check_int(self.epochs, "epochs", 1)
        if self.num_nodes is not None:
            _check_int(self.num_nodes, "num_nodes", 1)
            if self.num_nodes != 1:
                raise ConfigError(
                    f"num_nodes={self.num_nodes} is not supported: torchtune fine-tuning runs on "
                    "one node (as in Kubeflow Trainer); set num_nodes=1 and use "
                    "resources_per_node={'gpu': N} for several GPUs."
                )
        if self.peft_config is not None and not isinstance(self.peft_config, LoraConfig):
            raise ConfigError(
                f"peft_config={self.peft_config!r} must be a LoraConfig(...) or None."
            )
        if self.dataset_preprocess_config is None:
            self.dataset_preprocess_config = TorchTuneInstructDataset()
        elif not isinstance(self.dataset_preprocess_config, TorchTuneInstructDataset):
            raise ConfigError(
                f"dataset_preprocess_config={self.dataset_preprocess_config!r} must be a "
                "TorchTuneInstructDataset(...)."
            )
        if self.resources_per_node is not None:
            self.resources_per_node = _check_resources(self.resources_per_node)
        if self.learning_rate is not None:
            _check_number(self.learning_rate, "learning_rate", 0, 1, example="2e-5")
        for name, minimum in (("gradient_accumulation_steps", 1), ("max_seq_len", 16),
                              ("max_steps_per_epoch", 1), ("seed", 0)):
            if getattr(self, name) is not None:
                _check_int(getattr(self, name), name, minimum)
        if self.seed is not None and self.seed > SEED_MAX:
            raise ConfigError(
                f"seed={self.seed} is out of range: torchtune seeds numpy with a 32-bit value "
                f"(seed + rank), so the seed must lie in 0..{SEED_MAX}; pick a smaller one, "
                "e.g. 42."
            )
        for name in ("packed", "activation_checkpointing", "compile"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name}={value!r} must be true or false.")
        self.overrides = check_overrides(self.overrides)
        from kfp_finetune.config.splits import check_eval_split  # splits imports this module

        self.eval_split = check_eval_split(self.dataset_preprocess_config.split, self.eval_split)

    @property
    def gpus(self) -> int | None:
        """GPUs per node from ``resources_per_node``, or None when not given."""
        if not self.resources_per_node:
            return None
        return self.resources_per_node.get("gpu")


def _check_resources(resources: Any) -> dict[str, Any]:
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
        _check_int(resources["gpu"], "resources_per_node['gpu']", 0)
        if resources["gpu"] > 8:
            raise ConfigError(
                f"resources_per_node['gpu']={resources['gpu']} exceeds one node's 8 GPUs; "
                "use 1 to 8 GPUs (multi-node fine-tuning is not supported)."
            )
    return dict(resources)


@dataclass
class HuggingFaceDatasetInitializer:
    """Where the dataset comes from.

    Args:
        storage_uri: ``hf://org/repo[/dir-or-file]``, ``file:///abs/path`` or ``/abs/path``.
        access_token: Never sent as a pipeline parameter: store it in a Kubernetes Secret
            (``kfp-finetune secret-help``); locally it is read from ``HF_TOKEN``.
        ignore_patterns: Glob patterns of files not to fetch, e.g. ``["*.md"]``.
    """

    storage_uri: str
    access_token: str | None = field(default=None, repr=False)
    ignore_patterns: list[str] | None = None

    def __post_init__(self) -> None:
        from kfp_finetune.storage.selection import check_ignore_patterns
        from kfp_finetune.storage.uris import parse_storage_uri

        if isinstance(self.storage_uri, os.PathLike):
            self.storage_uri = os.fspath(self.storage_uri)  # a pathlib.Path is a local path
        parse_storage_uri(self.storage_uri, kind="dataset")
        self.ignore_patterns = list(check_ignore_patterns(self.ignore_patterns)) or None


@dataclass
class HuggingFaceModelInitializer:
    """Where the base model comes from.

    Args:
        storage_uri: ``hf://org/repo``, ``file:///abs/path`` or ``/abs/path``.
        access_token: Never sent as a pipeline parameter: store it in a Kubernetes Secret
            (``kfp-finetune secret-help``); locally it is read from ``HF_TOKEN``.
        ignore_patterns: Glob patterns of files not to fetch, e.g. ``["original/*.pth"]``;
            other weight formats are skipped anyway when the repository has safetensors.
    """

    storage_uri: str
    access_token: str | None = field(default=None, repr=False)
    ignore_patterns: list[str] | None = None

    def __post_init__(self) -> None:
        from kfp_finetune.storage.selection import check_ignore_patterns
        from kfp_finetune.storage.uris import parse_storage_uri

        if isinstance(self.storage_uri, os.PathLike):
            self.storage_uri = os.fspath(self.storage_uri)  # a pathlib.Path is a local path
        parse_storage_uri(self.storage_uri, kind="model")
        self.ignore_patterns = list(check_ignore_patterns(self.ignore_patterns)) or None


@dataclass
class Initializer:
    """The dataset and model initializers of one run."""

    dataset: HuggingFaceDatasetInitializer | None = None
    model: HuggingFaceModelInitializer | None = None

    def __post_init__(self) -> None:
        for name, cls in (("dataset", HuggingFaceDatasetInitializer),
                          ("model", HuggingFaceModelInitializer)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise ConfigError(
                    f"Initializer({name}={value!r}) must be a {cls.__name__}(storage_uri=...) "
                    f"or None; wrap the URI: {name}={cls.__name__}(storage_uri={value!r})."
                )
