"""Checks that make an exported checkpoint a Hugging Face folder transformers and vLLM load.

torchtune's checkpointer may leave out the safetensors index and ``generation_config.json``;
the export step writes them (from the shards' headers and ``config.json``) when missing.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from kfp_finetune.errors import ModelError

INDEX_FILE = "model.safetensors.index.json"


def _safetensors_header(path: Path) -> dict[str, Any]:
    with path.open("rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(size))


def _tensor_bytes(info: dict[str, Any]) -> int:
    start, end = info["data_offsets"]
    return int(end) - int(start)


def ensure_index(folder: Path) -> dict[str, Any]:
    """Check the safetensors shards of ``folder`` and write their index if it is missing.

    Raises:
        ModelError: No shards, or the index names a missing file or misses a shard.
    """
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if not shards:
        raise ModelError(
            f"{str(folder)!r} has no .safetensors weights; the fine-tune step must save with "
            "torchtune's FullModelHFCheckpointer (safe_serialization=True)."
        )
    index_path = folder / INDEX_FILE
    if index_path.exists():
        index = json.loads(index_path.read_text())
        named = set(index.get("weight_map", {}).values())
        missing = sorted(named - set(shards))
        unlisted = sorted(set(shards) - named)
        if missing or unlisted:
            raise ModelError(
                f"{str(index_path)!r} does not match the shards (missing files {missing}, "
                f"unlisted shards {unlisted}); the checkpoint is incomplete: re-run fine-tune."
            )
        return index
    weight_map: dict[str, str] = {}
    total = 0
    for shard in shards:
        for key, info in _safetensors_header(folder / shard).items():
            if key != "__metadata__":
                weight_map[key] = shard
                total += _tensor_bytes(info)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    return index


def ensure_generation_config(folder: Path) -> None:
    """Write ``generation_config.json`` from ``config.json`` when the checkpoint has none.

    Raises:
        ModelError: ``config.json`` is missing or has no ``model_type``.
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not config.get("model_type"):
        raise ModelError(
            f"{str(folder)!r} has no valid config.json with a model_type, so transformers "
            "cannot load it; the base model folder must contain the Hugging Face config.json."
        )
    gen = folder / "generation_config.json"
    if not gen.exists():
        keys = ("bos_token_id", "eos_token_id", "pad_token_id")
        gen.write_text(json.dumps({k: config[k] for k in keys if k in config}, indent=2) + "\n")
