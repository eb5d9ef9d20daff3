"""Runtimes: named bundles of model defaults, as Kubeflow Trainer's torchtune runtimes are.

A runtime fixes the model family (which torchtune model builder, tokenizer and checkpoint
format to use), the default model URI and the default GPU count. The ``-tiny`` runtimes build
the model from the checkpoint's own ``config.json``, so any checkpoint of that architecture
works with them; they exist for CPU runs and smoke tests.

A runtime is described here by a :class:`RuntimeSpec` (model URI, defaults, recipe inputs);
users see it as the Kubeflow SDK's ``Runtime`` (``kfp_finetune.config.types.sdk_runtime``, what
``kfp_finetune.get_runtime`` and ``TrainerClient.get_runtime`` return). Wherever a runtime is
taken, its name, the SDK's ``Runtime`` or a ``RuntimeSpec`` will do (:func:`runtime_name`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from kfp_finetune.config.types import DataType
from kfp_finetune.errors import ConfigError


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
class MemoryRule:
    """A GPU default that depends on how much memory one card has.

    ``setting`` takes ``value`` when each card has at least ``min_gib`` GiB (``torch``/
    ``nvidia-smi`` total), and ``below`` otherwise; when the card's memory is unknown the
    torchtune config's own value stays. ``min_gib`` is for the runtime's default GPU count;
    ``sharded_bytes_per_param`` of the model's parameters are split over the GPUs (FSDP), so
    with fewer GPUs the threshold rises by that share.

    Attributes:
        setting: ``ResolvedConfig`` field: ``activation_checkpointing`` or ``fsdp_cpu_offload``.
        min_gib: Memory per card (GiB) from which ``value`` applies.
        value: Setting when the card is large enough.
        below: Setting when it is not.
        reason: Why, in one sentence (shown in the README's runtime table).
        sharded_bytes_per_param: Bytes per parameter of FSDP-sharded state in ``min_gib``.
        full_only: Only for full fine-tuning (LoRA has no optimizer state for the base).
    """

    setting: str
    min_gib: float
    value: Any
    below: Any
    reason: str
    sharded_bytes_per_param: float = 0.0
    full_only: bool = False

    def threshold_gib(self, gpus: int, default_gpus: int, params: int | None) -> float:
        """``min_gib`` adjusted for ``gpus`` cards instead of the runtime's default count."""
        if not self.sharded_bytes_per_param or not params or gpus <= 0:
            return self.min_gib
        per_card = self.sharded_bytes_per_param * params / 2**30
        return self.min_gib - per_card / default_gpus + per_card / gpus


@dataclass(frozen=True)
class RuntimeSpec:
    """One fine-tuning runtime: what this project knows of it (called ``Runtime`` before).

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
        memory_rules: Settings that depend on the memory of one GPU (see ``MemoryRule``).
        param_count: Parameters of the model (for the memory rules' sharded state).
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
    memory_rules: tuple[MemoryRule, ...] = ()
    param_count: int | None = None

    @property
    def family(self) -> str:
        """Model family name used in messages, e.g. ``llama3_2``."""
        return self.config_family


# Alpaca-like samples are ~200 tokens: packing them into 2048-token sequences removes the
# padding that dominates unpacked batches, and torch.compile fuses the small kernels of 1-3B
# models (and the 70B's, as torchtune's own llama3_3/70B_full_multinode config does).
FAST_GPU: dict[str, Any] = {"packed": True, "max_seq_len": 2048, "compile": True}


def _no_checkpointing(min_gib: float, estimate: str) -> MemoryRule:
    # Recomputing activations costs a second forward pass of every layer (torchtune's
    # memory-optimization tutorial: "will slow down training speed"; +27 % tokens/s without
    # it on Llama 3.2 3B in its table); keep it only where the packed batch would not fit.
    return MemoryRule(
        "activation_checkpointing", min_gib, False, True,
        f"off from {min_gib:g} GiB per card (peak without it at the default packed batch: "
        f"{estimate}); on below, where the activations would not fit",
    )


# 70B full fine-tuning on 8 cards: bf16 weights + gradients + AdamW's two bf16 states are
# 8 bytes per parameter, sharded by FSDP (70.6e9 * 8 / 8 = 66 GiB per card); activations
# (checkpointed), all-gather buffers and the chunked loss need ~34 GiB more. With that room
# the optimizer stays on the GPU (torchtune's llama3_3/70B_full_multinode config:
# fsdp_cpu_offload False); on 80 GB cards it is offloaded as torchtune's 70B_full config does.
LLAMA_70B_OFFLOAD = MemoryRule(
    "fsdp_cpu_offload", 100.0, False, True,
    "optimizer kept on the GPU from 100 GiB per card at 8 GPUs (66 GiB of sharded weights, "
    "gradients and AdamW states + 34 GiB headroom; more with fewer GPUs); offloaded to CPU "
    "below, as torchtune's 70B_full config does",
    sharded_bytes_per_param=8.0,
    full_only=True,
)

RUNTIMES: dict[str, RuntimeSpec] = {
    rt.name: rt
    for rt in (
        RuntimeSpec(
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
            memory_rules=(_no_checkpointing(40, "~25 GiB, estimated"),),
            param_count=1_235_814_400,
        ),
        RuntimeSpec(
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
            memory_rules=(_no_checkpointing(70, "~50 GiB, estimated"),),
            param_count=3_212_749_824,
        ),
        RuntimeSpec(
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
            # Activation checkpointing stays on (the config's): 80 layers of 8192-wide
            # activations do not fit beside the weights on any card.
            gpu_defaults=FAST_GPU,
            memory_rules=(LLAMA_70B_OFFLOAD,),
            param_count=70_553_706_496,
        ),
        RuntimeSpec(
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
            memory_rules=(_no_checkpointing(40, "~22 GiB, estimated"),),
            param_count=1_543_714_304,
        ),
        RuntimeSpec(
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
        RuntimeSpec(
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


def get_runtime(name: Any) -> RuntimeSpec:
    """Look up a runtime by name (or by the SDK's ``Runtime``, or a ``RuntimeSpec``).

    Args:
        name: Runtime name, e.g. ``torchtune-llama3.2-1b``, or a runtime object.

    Returns:
        The runtime.

    Raises:
        ConfigError: No runtime has that name; the message lists them.
    """
    if not isinstance(name, str):
        name = runtime_name(name)
    runtime = RUNTIMES.get(name.strip())
    if runtime is None:
        raise ConfigError(
            f"runtime={name!r} is unknown; choose one of: {', '.join(RUNTIMES)} "
            "(list them with `kfp-finetune runtimes`)."
        )
    return runtime


def runtime_name(runtime: Any) -> str:
    """The runtime's name from a name, the SDK's ``Runtime`` or a ``RuntimeSpec``.

    Raises:
        ConfigError: None was given, or the name is not one of this project's runtimes.
    """
    if runtime is None:
        raise ConfigError(
            f"runtime is missing; pass one of {', '.join(RUNTIMES)} or "
            "get_runtime(name)."
        )
    name = runtime if isinstance(runtime, str) else getattr(runtime, "name", None)
    if not isinstance(name, str):
        shown = repr(runtime) if isinstance(runtime, (int, float, dict, list)) else \
            type(runtime).__name__
        raise ConfigError(
            f"runtime={shown} is neither a runtime name nor a Runtime; pass e.g. "
            "'torchtune-llama3.2-1b' or get_runtime('torchtune-llama3.2-1b')."
        )
    return get_runtime(name).name


def runtime_for_shape(
    hf_model_type: str, hidden_size: int, layers: int
) -> RuntimeSpec | None:
    """The full-size runtime whose model has this architecture and shape, if any."""
    for runtime in RUNTIMES.values():
        if runtime.hf_model_type == hf_model_type and runtime.shape == (hidden_size, layers):
            return runtime
    return None


def __getattr__(name: str) -> Any:
    # Deprecated alias (README, "Deprecated names"): the class was called Runtime before
    # kfp_finetune.Runtime became the Kubeflow SDK's Runtime.
    if name == "Runtime":
        warnings.warn(
            "kfp_finetune.config.runtimes.Runtime is deprecated; it is now called RuntimeSpec "
            "(kfp_finetune.Runtime is the Kubeflow SDK's Runtime).",
            DeprecationWarning, stacklevel=2,
        )
        return RuntimeSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sdk_runtime(name: Any) -> Any:
    """The Kubeflow SDK's ``Runtime`` for one of this project's runtimes.

    This is what ``kfp_finetune.get_runtime`` and ``TrainerClient.get_runtime`` return, and
    what ``train(runtime=...)`` accepts (as it accepts the name).

    Raises:
        ConfigError: No runtime has that name.
    """
    from kubeflow.common.constants import UNKNOWN
    from kubeflow.trainer.types import types

    from kfp_finetune.config.images import TRAINER_IMAGE

    rt = get_runtime(name)
    trainer = types.RuntimeTrainer(
        trainer_type=types.TrainerType.BUILTIN_TRAINER,
        framework=types.TORCH_TUNE,
        image=TRAINER_IMAGE,
        num_nodes=1,
        device="gpu" if rt.default_gpus else "cpu",
        device_count=str(rt.default_gpus) if rt.default_gpus else UNKNOWN,
    )
    trainer.set_command(("tune", "run"))
    return types.Runtime(
        name=rt.name, trainer=trainer, kind=types.RuntimeKind.CLUSTER_TRAINING_RUNTIME,
        pretrained_model=rt.model_uri or None,
    )
