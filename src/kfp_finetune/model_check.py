"""Checking a model folder against the runtime before any GPU time is spent."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kfp_finetune.errors import ModelError
from kfp_finetune.runtimes import Runtime, runtime_for_shape


@dataclass(frozen=True)
class ModelInfo:
    """What the fine-tune step needs to know about the model folder.

    Attributes:
        checkpoint_files: Weight files, relative to the folder, in shard order.
        special_tokens_path: ``tokenizer.json`` when present (gives the special-token ids).
        hidden_size: From config.json.
        num_layers: From config.json.
    """

    checkpoint_files: list[str]
    special_tokens_path: str | None
    hidden_size: int
    num_layers: int


def check_model(folder: Path, runtime: Runtime) -> ModelInfo:
    """Check that ``folder`` holds a checkpoint the runtime can fine-tune.

    Args:
        folder: The model folder.
        runtime: The runtime the user chose.

    Returns:
        What the fine-tune step needs.

    Raises:
        ModelError: config.json, weights or tokenizer files are missing, or the architecture
            or size does not match the runtime (the message names the right runtime).
    """
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"the model has no config.json (in {str(folder)!r}); a Hugging Face model folder is "
            "needed: config.json, *.safetensors and the tokenizer files."
        )
    try:
        cfg = json.loads(config_path.read_text())
    except ValueError as exc:
        raise ModelError(f"config.json is not valid JSON ({exc}); re-download the model.") from None
    model_type = cfg.get("model_type")
    if model_type != runtime.hf_model_type:
        raise ModelError(
            f"the model is a {model_type!r} checkpoint but runtime {runtime.name!r} fine-tunes "
            f"{runtime.hf_model_type!r} models; choose a runtime of the model's family "
            "(`kfp-finetune runtimes`)."
        )
    hidden, layers = cfg.get("hidden_size"), cfg.get("num_hidden_layers")
    if runtime.shape is not None and (hidden, layers) != runtime.shape:
        right = runtime_for_shape(model_type, hidden, layers)
        hint = (
            f"use runtime {right.name!r}"
            if right
            else f"use torchtune-{runtime.config_family.replace('_', '.')}-tiny, which reads the "
            "sizes from config.json"
        )
        raise ModelError(
            f"the model has hidden_size={hidden}, num_hidden_layers={layers}, but runtime "
            f"{runtime.name!r} expects {runtime.shape[0]} and {runtime.shape[1]}; {hint}."
        )
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        raise ModelError(
            f"the model folder {str(folder)!r} has no *.safetensors weights; torchtune's "
            "Hugging Face checkpointer needs them."
        )
    missing = [f for f in runtime.tokenizer.files() if not (folder / f).is_file()]
    if missing:
        raise ModelError(
            f"the model folder lacks the tokenizer file(s) {missing} that runtime "
            f"{runtime.name!r} uses; download the full repository (it has them)."
        )
    special = folder / "tokenizer.json"
    return ModelInfo(
        checkpoint_files=weights,
        special_tokens_path=str(special) if special.is_file() else None,
        hidden_size=int(hidden or 0),
        num_layers=int(layers or 0),
    )
