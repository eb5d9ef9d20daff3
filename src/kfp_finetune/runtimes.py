"""Runtimes: named bundles of model defaults, as Kubeflow Trainer's torchtune runtimes are.

A runtime fixes the model family (which torchtune model builder, tokenizer and checkpoint
format to use), the default model URI and the default GPU count. The ``-tiny`` runtimes build
the model from the checkpoint's own ``config.json``, so any checkpoint of that architecture
works with them; they exist for CPU runs and smoke tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kfp_finetune.errors import ConfigError
from kfp_finetune.types import DataType


@dataclass(frozen=True)
class TokenizerSpec:
    """Which torchtune tokenizer to build and where its files lie in the model folder.

    Attributes:
        component: torchtune builder, e.g. ``torchtune.models.llama3.llama3_tokenizer``.
        path: File passed as ``tokenizer.path``, relative to the model folder.
        merges_file: File passed as ``tokenizer.merges_file`` (BPE tokenizers), or None.
    """

    component: str
    path: str
    merges_file: str | None = None

    def files(self) -> list[str]:
        """Files the model folder must contain for this tokenizer."""
        return [self.path] + ([self.merges_file] if self.merges_file else [])


LLAMA3_TOKENIZER = TokenizerSpec(
    "torchtune.models.llama3.llama3_tokenizer", "original/tokenizer.model"
)
QWEN2_5_TOKENIZER = TokenizerSpec(
    "torchtune.models.qwen2_5.qwen2_5_tokenizer", "vocab.json", "merges.txt"
)


@dataclass(frozen=True)
class Runtime:
    """One fine-tuning runtime.

    Attributes:
        name: Runtime name, e.g. ``torchtune-llama3.2-1b``.
        description: One line for ``kfp-finetune runtimes`` and the KFP UI.
        config_family: torchtune config folder, e.g. ``llama3_2``.
        config_size: torchtune config size prefix, e.g. ``1B``.
        model_uri: Default model URI ("" when the user must give one).
        checkpoint_model_type: torchtune checkpointer ``model_type``.
        hf_model_type: ``model_type`` expected in the checkpoint's ``config.json``.
        tokenizer: Tokenizer builder and files.
        default_gpus: GPUs per node when the user gives none (0 = CPU).
        default_dtype: Precision when the user gives none.
        default_batch_size: Batch size when the user gives none.
        default_epochs: Epochs when the user gives none.
        pvc_size: Default size of the workspace volume.
        shape: ``(hidden_size, num_hidden_layers)`` the checkpoint must have; None for tiny.
        tiny: Build the model from the checkpoint's config.json instead of a fixed builder.
        learning_rate: Learning rate override, or None to keep the torchtune config's.
        gpu_defaults: Speed settings applied on GPU unless the user sets them: ``packed``,
            ``max_seq_len``, ``compile``, ``activation_checkpointing`` (see README, "Speed").
        defaults: Settings applied on any device unless the user sets them.
    """

    name: str
    description: str
    config_family: str
    config_size: str
    model_uri: str
    checkpoint_model_type: str
    hf_model_type: str
    tokenizer: TokenizerSpec
    default_gpus: int
    default_dtype: DataType
    default_batch_size: int
    default_epochs: int
    pvc_size: str
    shape: tuple[int, int] | None = None
    tiny: bool = False
    learning_rate: float | None = None
    gpu_defaults: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """Model family name used in messages, e.g. ``llama3_2``."""
        return self.config_family


# Alpaca-like samples are ~200 tokens: packing them into 2048-token sequences removes the
# padding that dominates unpacked batches, and torch.compile fuses the small kernels of 1-3B
# models. Activation checkpointing keeps the torchtune config's choice.
FAST_GPU: dict[str, Any] = {"packed": True, "max_seq_len": 2048, "compile": True}

RUNTIMES: dict[str, Runtime] = {
    rt.name: rt
    for rt in (
        Runtime(
            name="torchtune-llama3.2-1b",
            description="Llama 3.2 1B Instruct",
            config_family="llama3_2",
            config_size="1B",
            model_uri="hf://meta-llama/Llama-3.2-1B-Instruct",
            checkpoint_model_type="LLAMA3_2",
            hf_model_type="llama",
            tokenizer=LLAMA3_TOKENIZER,
            default_gpus=1,
            default_dtype=DataType.BF16,
            default_batch_size=4,
            default_epochs=1,
            pvc_size="20Gi",
            shape=(2048, 16),
            gpu_defaults=FAST_GPU,
        ),
        Runtime(
            name="torchtune-llama3.2-3b",
            description="Llama 3.2 3B Instruct",
            config_family="llama3_2",
            config_size="3B",
            model_uri="hf://meta-llama/Llama-3.2-3B-Instruct",
            checkpoint_model_type="LLAMA3_2",
            hf_model_type="llama",
            tokenizer=LLAMA3_TOKENIZER,
            default_gpus=1,
            default_dtype=DataType.BF16,
            default_batch_size=4,
            default_epochs=1,
            pvc_size="40Gi",
            shape=(3072, 28),
            gpu_defaults=FAST_GPU,
        ),
        Runtime(
            name="torchtune-llama3.3-70b",
            description="Llama 3.3 70B Instruct (8 GPUs)",
            config_family="llama3_3",
            config_size="70B",
            model_uri="hf://meta-llama/Llama-3.3-70B-Instruct",
            checkpoint_model_type="LLAMA3",
            hf_model_type="llama",
            tokenizer=LLAMA3_TOKENIZER,
            default_gpus=8,
            default_dtype=DataType.BF16,
            default_batch_size=2,
            default_epochs=1,
            pvc_size="500Gi",
            shape=(8192, 80),
            gpu_defaults={"packed": True, "max_seq_len": 2048},
        ),
        Runtime(
            name="torchtune-qwen2.5-1.5b",
            description="Qwen2.5 1.5B Instruct",
            config_family="qwen2_5",
            config_size="1.5B",
            model_uri="hf://Qwen/Qwen2.5-1.5B-Instruct",
            checkpoint_model_type="QWEN2",
            hf_model_type="qwen2",
            tokenizer=QWEN2_5_TOKENIZER,
            default_gpus=1,
            default_dtype=DataType.BF16,
            default_batch_size=2,
            default_epochs=1,
            pvc_size="20Gi",
            shape=(1536, 28),
            gpu_defaults=FAST_GPU,
        ),
        Runtime(
            name="torchtune-llama3.2-tiny",
            description="Any Llama-3.2-architecture checkpoint, built from its config.json "
            "(CPU runs and smoke tests)",
            config_family="llama3_2",
            config_size="1B",
            model_uri="",
            checkpoint_model_type="LLAMA3_2",
            hf_model_type="llama",
            tokenizer=LLAMA3_TOKENIZER,
            default_gpus=0,
            default_dtype=DataType.FP32,
            default_batch_size=4,
            default_epochs=3,
            pvc_size="1Gi",
            tiny=True,
            learning_rate=3e-3,
            # One update per batch: the tiny runs are a handful of steps long.
            defaults={"gradient_accumulation_steps": 1},
        ),
        Runtime(
            name="torchtune-qwen2.5-tiny",
            description="Any Qwen2.5-architecture checkpoint, built from its config.json "
            "(CPU runs and smoke tests)",
            config_family="qwen2_5",
            config_size="0.5B",
            model_uri="",
            checkpoint_model_type="QWEN2",
            hf_model_type="qwen2",
            tokenizer=QWEN2_5_TOKENIZER,
            default_gpus=0,
            default_dtype=DataType.FP32,
            default_batch_size=4,
            default_epochs=3,
            pvc_size="1Gi",
            tiny=True,
            learning_rate=3e-3,
            # One update per batch: the tiny runs are a handful of steps long.
            defaults={"gradient_accumulation_steps": 1},
        ),
    )
}


def get_runtime(name: str) -> Runtime:
    """Look up a runtime by name.

    Args:
        name: Runtime name, e.g. ``torchtune-llama3.2-1b``.

    Returns:
        The runtime.

    Raises:
        ConfigError: No runtime has that name; the message lists them.
    """
    runtime = RUNTIMES.get(name.strip() if isinstance(name, str) else name)
    if runtime is None:
        raise ConfigError(
            f"runtime={name!r} is unknown; choose one of: {', '.join(RUNTIMES)} "
            "(list them with `kfp-finetune runtimes`)."
        )
    return runtime


def runtime_for_shape(hf_model_type: str, hidden_size: int, layers: int) -> Runtime | None:
    """The full-size runtime whose model has this architecture and shape, if any."""
    for runtime in RUNTIMES.values():
        if runtime.hf_model_type == hf_model_type and runtime.shape == (hidden_size, layers):
            return runtime
    return None
