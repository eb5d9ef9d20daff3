"""Turning flat pipeline parameters (what the KFP UI shows) into the API's dataclasses.

Pipeline parameters cannot be None, so "use the runtime's or torchtune config's value" is
spelled ``0`` for numbers, ``"auto"`` for on/off switches and ``"none"`` for ``peft_method``.
"""

from __future__ import annotations

from typing import Any

from kfp_finetune.config.types import LoraConfig, TorchTuneConfig, TorchTuneInstructDataset
from kfp_finetune.config.validation import normalize_dataset, normalize_lora
from kfp_finetune.errors import ConfigError

PEFT_METHODS = ("none", "lora", "qlora", "dora")


def switch(value: Any, name: str) -> bool | None:
    """Parse an on/off parameter: ``auto`` (or empty) -> None, ``true``/``false`` -> bool.

    Raises:
        ConfigError: Any other value.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise ConfigError(f"{name}={value!r} must be auto, true or false.")


def lora_from_params(
    peft_method: str,
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_dropout: float = -1.0,
    lora_attn_modules: list | None = None,
    apply_lora_to_mlp: Any = "auto",
    apply_lora_to_output: Any = "auto",
) -> LoraConfig | None:
    """Build ``LoraConfig`` from pipeline parameters, or None for full fine-tuning.

    Raises:
        ConfigError: ``peft_method`` is not none, lora, qlora or dora, or a LoRA value is bad.
    """
    method = (peft_method or "none").strip().lower() if isinstance(peft_method, str) \
        or not peft_method else str(peft_method)
    if method not in PEFT_METHODS:
        raise ConfigError(
            f"peft_method={peft_method!r} is not one of {', '.join(PEFT_METHODS)}; use none for "
            "full fine-tuning."
        )
    if method == "none":
        given = _lora_options_given(lora_rank, lora_alpha, lora_dropout, lora_attn_modules,
                                    apply_lora_to_mlp, apply_lora_to_output)
        if given:
            raise ConfigError(
                f"{', '.join(given)} given, but peft_method is 'none' (full fine-tuning), which "
                "would ignore it and train every weight; set peft_method (CLI: --peft) to lora, "
                "qlora or dora, or drop the LoRA options."
            )
        return None
    kwargs: dict[str, Any] = {
        "lora_rank": lora_rank or None,
        "lora_alpha": lora_alpha or None,
        "lora_dropout": None if lora_dropout is None or _negative(lora_dropout)
        else lora_dropout,
        "apply_lora_to_mlp": switch(apply_lora_to_mlp, "apply_lora_to_mlp"),
        "apply_lora_to_output": switch(apply_lora_to_output, "apply_lora_to_output"),
        "quantize_base": method == "qlora" or None,
        "use_dora": method == "dora" or None,
    }
    if lora_attn_modules:
        kwargs["lora_attn_modules"] = list(lora_attn_modules)
    return normalize_lora(LoraConfig(**kwargs))


def _negative(value: Any) -> bool:
    """Whether ``value`` is a number below 0 (the "use the default" spelling of dropout)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value < 0


def _lora_options_given(
    lora_rank: Any, lora_alpha: Any, lora_dropout: Any, lora_attn_modules: Any,
    apply_lora_to_mlp: Any, apply_lora_to_output: Any,
) -> list[str]:
    """The LoRA options set to something other than their "use the default" spelling."""
    given = []
    if lora_rank not in (0, None):
        given.append(f"lora_rank={lora_rank!r}")
    if lora_alpha not in (0, None):  # NaN != 0: reported too
        given.append(f"lora_alpha={lora_alpha!r}")
    if lora_dropout is not None and not _negative(lora_dropout):
        given.append(f"lora_dropout={lora_dropout!r}")
    if lora_attn_modules:
        given.append(f"lora_attn_modules={list(lora_attn_modules)!r}")
    for name, value in (("apply_lora_to_mlp", apply_lora_to_mlp),
                        ("apply_lora_to_output", apply_lora_to_output)):
        if switch(value, name) is not None:
            given.append(f"{name}={value!r}")
    return given


def preprocess_from_params(
    source: str, split: str, train_on_input: bool, new_system_prompt: str, column_map: Any
) -> TorchTuneInstructDataset:
    """Build ``TorchTuneInstructDataset`` from pipeline parameters (validated)."""
    return normalize_dataset(TorchTuneInstructDataset(
        source=source or None,
        split=split or None,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt or None,
        column_map=dict(column_map) if column_map else None,
    ))


def config_from_params(
    *,
    dtype: str,
    batch_size: int,
    epochs: int,
    loss: str,
    num_nodes: int,
    gpus_per_node: int,
    source: str,
    split: str,
    train_on_input: bool,
    new_system_prompt: str,
    column_map: Any,
    peft_method: str = "none",
    lora_rank: int = 0,
    lora_alpha: float = 0.0,
    lora_dropout: float = -1.0,
    lora_attn_modules: list | None = None,
    apply_lora_to_mlp: Any = "auto",
    apply_lora_to_output: Any = "auto",
    learning_rate: float = 0.0,
    gradient_accumulation_steps: int = 0,
    max_seq_len: int = 0,
    packed: Any = "auto",
    compile: Any = "auto",
    activation_checkpointing: Any = "auto",
    max_steps_per_epoch: int = 0,
    seed: int = 42,
    overrides: list | None = None,
) -> TorchTuneConfig:
    """Build ``TorchTuneConfig`` from pipeline parameters (validated).

    Raises:
        ConfigError: A parameter is out of range or not an allowed value.
    """
    return TorchTuneConfig(
        dtype=dtype or None,
        batch_size=batch_size,
        epochs=epochs,
        loss=loss or None,
        num_nodes=num_nodes,
        resources_per_node={"gpu": gpus_per_node},
        dataset_preprocess_config=preprocess_from_params(
            source, split, train_on_input, new_system_prompt, column_map
        ),
        peft_config=lora_from_params(
            peft_method, lora_rank, lora_alpha, lora_dropout, lora_attn_modules,
            apply_lora_to_mlp, apply_lora_to_output,
        ),
        learning_rate=learning_rate or None,
        gradient_accumulation_steps=gradient_accumulation_steps or None,
        max_seq_len=max_seq_len or None,
        packed=switch(packed, "packed"),
        compile=switch(compile, "compile"),
        activation_checkpointing=switch(activation_checkpointing, "activation_checkpointing"),
        max_steps_per_epoch=max_steps_per_epoch or None,
        seed=seed,
        overrides=list(overrides) if overrides else None,
    )


def _switch_text(value: bool | None) -> str:
    return "auto" if value is None else str(value).lower()


def training_params(config: TorchTuneConfig) -> dict[str, Any]:
    """The pipeline parameters for the knobs beyond the seed's (inverse of the above).

    Args:
        config: A validated ``TorchTuneConfig``.

    Returns:
        ``peft_method``, the LoRA fields, ``learning_rate`` ... ``overrides``, with the
        "use the default" spellings (0, "auto", "none") for unset values.
    """
    peft = config.peft_config
    if peft is None:
        method = "none"
    else:
        method = "qlora" if peft.quantize_base else "dora" if peft.use_dora else "lora"
    return {
        "peft_method": method,
        "lora_rank": (peft.lora_rank or 0) if peft else 0,
        "lora_alpha": float(peft.lora_alpha or 0.0) if peft else 0.0,
        "lora_dropout": float(peft.lora_dropout) if peft and peft.lora_dropout is not None
        else -1.0,
        "lora_attn_modules": list(peft.lora_attn_modules) if peft else [],
        "apply_lora_to_mlp": _switch_text(peft.apply_lora_to_mlp if peft else None),
        "apply_lora_to_output": _switch_text(peft.apply_lora_to_output if peft else None),
        "learning_rate": float(config.learning_rate or 0.0),
        "gradient_accumulation_steps": config.gradient_accumulation_steps or 0,
        "max_seq_len": config.max_seq_len or 0,
        "packed": _switch_text(config.packed),
        "compile": _switch_text(config.compile),
        "activation_checkpointing": _switch_text(config.activation_checkpointing),
        "max_steps_per_epoch": config.max_steps_per_epoch or 0,
        "seed": 42 if config.seed is None else config.seed,
        "overrides": list(config.overrides or []),
    }
