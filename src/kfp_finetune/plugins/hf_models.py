"""torchtune model builders that read the architecture from a checkpoint's ``config.json``.

torchtune's own builders (``llama3_2_1b()``, ``qwen2_5_1_5b_instruct()``) fix every size. The
``-tiny`` runtimes point ``model._component_`` here instead, so any checkpoint of the family
(a 2-layer test model, a pruned model, a future size) trains without a new builder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
from torchtune.models.qwen2._component_builders import lora_qwen2, qwen2
from torchtune.modules import TransformerDecoder


def read_hf_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Read ``config.json`` from a Hugging Face model folder."""
    return json.loads((Path(checkpoint_dir) / "config.json").read_text())


def _llama3_2_args(cfg: dict[str, Any]) -> dict[str, Any]:
    rope_scaling = cfg.get("rope_scaling") or {}
    return {
        "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "embed_dim": cfg["hidden_size"],
        "max_seq_len": cfg.get("max_position_embeddings", 2048),
        "intermediate_dim": cfg.get("intermediate_size"),
        "norm_eps": cfg.get("rms_norm_eps", 1e-5),
        "rope_base": int(cfg.get("rope_theta", 500_000)),
        "scale_factor": int(rope_scaling.get("factor", 32)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", True)),
    }


def _qwen2_args(cfg: dict[str, Any]) -> dict[str, Any]:
    return {
        "vocab_size": cfg["vocab_size"],
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": cfg["num_attention_heads"],
        "num_kv_heads": cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        "embed_dim": cfg["hidden_size"],
        "intermediate_dim": cfg["intermediate_size"],
        "max_seq_len": cfg.get("max_position_embeddings", 32768),
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "rope_base": float(cfg.get("rope_theta", 1_000_000.0)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }


def llama3_2_from_hf_config(checkpoint_dir: str) -> TransformerDecoder:
    """Build a Llama 3.2 decoder with the sizes in ``checkpoint_dir/config.json``.

    Args:
        checkpoint_dir: Hugging Face model folder.

    Returns:
        The torchtune decoder, randomly initialised (the checkpointer loads the weights).
    """
    return llama3_2(**_llama3_2_args(read_hf_config(checkpoint_dir)))


def lora_llama3_2_from_hf_config(checkpoint_dir: str, **lora_args: Any) -> TransformerDecoder:
    """Build a LoRA Llama 3.2 decoder with the sizes in ``checkpoint_dir/config.json``.

    Args:
        checkpoint_dir: Hugging Face model folder.
        **lora_args: ``lora_attn_modules``, ``lora_rank``, ``lora_alpha`` and the other
            arguments of torchtune's ``lora_llama3_2``.

    Returns:
        The torchtune decoder with LoRA adapters.
    """
    return lora_llama3_2(**_llama3_2_args(read_hf_config(checkpoint_dir)), **lora_args)


def qwen2_5_from_hf_config(checkpoint_dir: str) -> TransformerDecoder:
    """Build a Qwen2.5 decoder with the sizes in ``checkpoint_dir/config.json``.

    Args:
        checkpoint_dir: Hugging Face model folder.

    Returns:
        The torchtune decoder, randomly initialised (the checkpointer loads the weights).
    """
    return qwen2(**_qwen2_args(read_hf_config(checkpoint_dir)))


def lora_qwen2_5_from_hf_config(checkpoint_dir: str, **lora_args: Any) -> TransformerDecoder:
    """Build a LoRA Qwen2.5 decoder with the sizes in ``checkpoint_dir/config.json``.

    Args:
        checkpoint_dir: Hugging Face model folder.
        **lora_args: ``lora_attn_modules``, ``lora_rank``, ``lora_alpha`` and the other
            arguments of torchtune's ``lora_qwen2``.

    Returns:
        The torchtune decoder with LoRA adapters.
    """
    return lora_qwen2(**_qwen2_args(read_hf_config(checkpoint_dir)), **lora_args)

