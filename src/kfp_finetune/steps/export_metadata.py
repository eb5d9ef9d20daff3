"""What an export records about its model: metadata, and the PEFT adapter's base model."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from kfp_finetune.steps.model_card import ADAPTER_DIR, hf_repo_id, hyperparameters, lora_settings


def adapter_base(base: dict[str, Any], model_dir: Path) -> tuple[str, str | None]:
    """What an adapter's ``base_model_name_or_path`` (and ``revision``) should say.

    An hf:// base gives its repo id and revision; a file:// base its own folder; any other
    (S3) base the workspace's copy, the only local folder that holds it.
    """
    source = str(base.get("source", ""))
    repo = hf_repo_id(source)
    if repo:
        return repo, base.get("revision") or None
    if source.startswith("file://"):
        return source[len("file://"):], None
    if source.startswith("/"):
        return source, None
    return str(model_dir), None


def adapter_config(path: Path, base: dict[str, Any], model_dir: Path) -> None:
    """Complete a PEFT ``adapter_config.json`` so that peft and vLLM can load the adapter."""
    config = json.loads(path.read_text())
    # PEFT (AutoPeftModelForCausalLM) and vLLM load the base model from this field; torchtune
    # leaves it empty, which neither can load.
    if not config.get("base_model_name_or_path"):
        name, revision = adapter_base(base, model_dir)
        config["base_model_name_or_path"] = name
        if revision:
            config.setdefault("revision", revision)
    config.setdefault("task_type", "CAUSAL_LM")
    config.setdefault("bias", "none")
    path.write_text(json.dumps(config, indent=2) + "\n")


def _training(resolved: dict[str, Any], conf: dict[str, Any]) -> dict[str, Any]:
    """The resolved training values, LoRA ones ("config default": None) filled from ``conf``."""
    training = dict(resolved)
    if isinstance(training.get("peft"), dict):
        lora = lora_settings(conf)
        training["peft"] = {k: (lora.get(k) if v is None else v)
                            for k, v in training["peft"].items()}
    return training


def load_config(path: Path) -> dict[str, Any]:
    """The saved torchtune config as a plain dict ({} when there is none)."""
    if not path.is_file():
        return {}
    from omegaconf import OmegaConf

    conf = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return conf if isinstance(conf, dict) else {}


def export_metadata(trained: dict[str, Any], base: dict[str, Any], dataset: dict[str, Any],
              conf: dict[str, Any], runtime: str, run_id: str, final: Path,
              adapter: bool) -> dict[str, Any]:
    """What the export records: the folder's manifest and the KFP Model artifact's metadata."""
    return {
        "kind": "export",
        "format": "huggingface-safetensors",
        "run_id": run_id,
        "fingerprint": trained["fingerprint"],
        "runtime": runtime,
        "base_model": base["source"],
        "base_model_revision": base.get("revision"),
        "dataset": dataset["source"],
        "inputs": trained.get("inputs"),
        "recipe": trained["recipe"],
        "config": trained["config"],
        "training": _training(trained["resolved"], conf),
        "hyperparameters": hyperparameters(conf, trained["recipe"]),
        "final_loss": trained.get("final_loss"),
        "lora": adapter,
        "path": str(final),
        "adapter_path": str(final / ADAPTER_DIR) if adapter else None,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
