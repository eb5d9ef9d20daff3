"""The user-facing types: the Kubeflow Trainer SDK's own, and one extension of them.

``LoraConfig``, ``TorchTuneInstructDataset``, ``Initializer``, the ``HuggingFace*`` and ``S3*``
initializers, ``BuiltinTrainer``, ``Runtime`` and the enums ``DataType``, ``DataFormat`` and
``Loss`` ARE ``kubeflow.trainer``'s classes (``kfp_finetune.LoraConfig is
kubeflow.trainer.LoraConfig``). The settings the SDK lacks live in one extension,
:class:`TorchTuneConfig`, a subclass of the SDK's ``TorchTuneConfig``: an SDK
``TorchTuneConfig`` is accepted anywhere, and ours is one.

The SDK's dataclasses check nothing when they are built; ours checks its own fields and its
nested SDK objects (``peft_config``, ``dataset_preprocess_config``) when it is built, and
:func:`normalize_config` checks an SDK ``TorchTuneConfig`` where it is used (``train()``, the
client, the CLI). The checks themselves are in :mod:`kfp_finetune.config.validation`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from kubeflow.trainer import (
    BuiltinTrainer,
    DataFormat,
    DataType,
    HuggingFaceDatasetInitializer,
    HuggingFaceModelInitializer,
    Initializer,
    LoraConfig,
    Loss,
    Runtime,
    S3DatasetInitializer,
    S3ModelInitializer,
    TorchTuneInstructDataset,
)
from kubeflow.trainer import TorchTuneConfig as SdkTorchTuneConfig

from kfp_finetune.config.overrides import FIXED_KEYS as FIXED_KEYS
from kfp_finetune.config.overrides import check_overrides
from kfp_finetune.config.splits import check_eval_split
from kfp_finetune.config.validation import (
    LORA_RANK_MAX,
    SEED_MAX,
    check_bool,
    check_column_map,
    check_int,
    check_number,
    check_resources,
    check_split_syntax,
    coerce_enum,
    normalize_dataset,
    normalize_initializer,
    normalize_lora,
)
from kfp_finetune.errors import ConfigError

__all__ = [
    "FIXED_KEYS", "LORA_RANK_MAX", "SEED_MAX", "BuiltinTrainer", "DataFormat", "DataType",
    "HuggingFaceDatasetInitializer", "HuggingFaceModelInitializer", "Initializer",
    "LoraConfig", "Loss", "Runtime", "S3DatasetInitializer", "S3ModelInitializer",
    "SdkTorchTuneConfig", "TorchTuneConfig", "TorchTuneInstructDataset", "check_column_map",
    "check_split_syntax", "coerce_enum", "normalize_config", "normalize_dataset",
    "normalize_initializer", "normalize_lora",
]


@dataclass
class TorchTuneConfig(SdkTorchTuneConfig):
    """The SDK's ``TorchTuneConfig`` with the settings it lacks (the one extension).

    Use it as ``BuiltinTrainer(config=TorchTuneConfig(...))``. The first eight fields are the
    SDK's; the others are this project's. Every field is checked when the config is built,
    and so are the nested ``LoraConfig`` and ``TorchTuneInstructDataset`` (which are stored
    as checked copies, the defaults filled in: the objects you passed are not changed).

    Args:
        dtype: Training precision, ``DataType.BF16`` or ``DataType.FP32`` (or ``"bf16"``,
            ``"fp32"``). Default: runtime's.
        batch_size: Samples per device per step. Default: runtime's.
        epochs: Passes over the dataset. Default: runtime's.
        loss: Loss function. Default: ``Loss.CEWithChunkedOutputLoss``.
        num_nodes: Number of nodes; only 1 is supported (as in Kubeflow Trainer).
        peft_config: A ``LoraConfig`` for LoRA/QLoRA/DoRA; None for full fine-tuning.
        dataset_preprocess_config: How the dataset is read (``TorchTuneInstructDataset``).
        resources_per_node: ``{"gpu": N}``: GPUs requested per node, and the process count.
            ``{"gpu": 0}`` trains on CPU.
        learning_rate: Optimizer learning rate. Default: the torchtune config's.
        weight_decay: AdamW weight decay. Default: the torchtune config's.
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

    learning_rate: float | None = None
    weight_decay: float | None = None
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
        for name in ("batch_size", "epochs", "num_nodes"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1)
        if self.num_nodes is not None and self.num_nodes != 1:
            raise ConfigError(
                f"num_nodes={self.num_nodes} is not supported: torchtune fine-tuning runs on "
                "one node (as in Kubeflow Trainer); set num_nodes=1 and use "
                "resources_per_node={'gpu': N} for several GPUs."
            )
        self.peft_config = normalize_lora(self.peft_config)
        self.dataset_preprocess_config = normalize_dataset(self.dataset_preprocess_config)
        if self.resources_per_node is not None:
            self.resources_per_node = check_resources(self.resources_per_node)
        if self.learning_rate is not None:
            check_number(self.learning_rate, "learning_rate", 0, 1, example="2e-5")
        if self.weight_decay is not None:
            check_number(self.weight_decay, "weight_decay", 0, 1, low_open=False, example="0.01")
        for name, minimum in (("gradient_accumulation_steps", 1), ("max_seq_len", 16),
                              ("max_steps_per_epoch", 1), ("seed", 0)):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, minimum)
        if self.seed is not None and self.seed > SEED_MAX:
            raise ConfigError(
                f"seed={self.seed} is out of range: torchtune seeds numpy with a 32-bit value "
                f"(seed + rank), so the seed must lie in 0..{SEED_MAX}; pick a smaller one, "
                "e.g. 42."
            )
        for name in ("packed", "activation_checkpointing", "compile"):
            check_bool(getattr(self, name), name)
        self.overrides = check_overrides(self.overrides)
        self.eval_split = check_eval_split(self.dataset_preprocess_config.split, self.eval_split)

    @property
    def gpus(self) -> int | None:
        """GPUs per node from ``resources_per_node``, or None when not given."""
        if not self.resources_per_node:
            return None
        return self.resources_per_node.get("gpu")


def normalize_config(config: Any) -> TorchTuneConfig:
    """The checked ``kfp_finetune.TorchTuneConfig`` for any ``TorchTuneConfig``, or None.

    The one check ``train()``, the client and the CLI run on a config: an SDK
    ``TorchTuneConfig`` (which checks nothing when built) gets every check of ours, with the
    same messages; ours is checked again (its fields may have been changed since). The
    result is a new object.

    Args:
        config: ``kubeflow.trainer.TorchTuneConfig``, ``kfp_finetune.TorchTuneConfig`` or None
            (all defaults).

    Returns:
        The checked config, enum values as members, defaults filled in.

    Raises:
        ConfigError: Not a ``TorchTuneConfig``, or a field is invalid.
    """
    if config is None:
        return TorchTuneConfig()
    if not isinstance(config, SdkTorchTuneConfig):
        shown = repr(config) if isinstance(config, (str, dict)) else type(config).__name__
        raise ConfigError(
            f"BuiltinTrainer(config={shown}) is not a TorchTuneConfig; pass "
            "BuiltinTrainer(config=TorchTuneConfig(...))."
        )
    return TorchTuneConfig(**{f.name: getattr(config, f.name)
                              for f in dataclasses.fields(config) if f.init})
