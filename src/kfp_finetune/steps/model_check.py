"""Checking a model folder against the runtime before any GPU time is spent.

The checks run twice on CPU in the model step: on the file listing and ``config.json`` before
the weights are downloaded (so a wrong-family or wrong-size checkpoint costs one small file),
and on the finished folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import RUNTIMES, RuntimeSpec, runtime_for_shape
from kfp_finetune.errors import ModelError

_BIN_WEIGHTS = re.compile(r"^(pytorch_)?model(-\d+-of-\d+)?\.bin$")


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


def weight_files(names: list[str]) -> list[str]:
    """The top-level weight files among ``names``: safetensors, else PyTorch ``.bin`` shards."""
    top = [n for n in names if "/" not in n]
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    if safetensors:
        return safetensors
    return sorted(n for n in top if _BIN_WEIGHTS.match(n))


def _runtimes_of(model_type: Any) -> str:
    names = [rt.name for rt in RUNTIMES.values() if rt.hf_model_type == model_type]
    return f" (runtimes for {model_type!r}: {', '.join(names)})" if names else ""


# config.json fields the model builders read as numbers (hf_models, torchtune's builders).
_WHOLE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "vocab_size",
                 "max_position_embeddings", "head_dim")
_REAL_FIELDS = ("rms_norm_eps", "rope_theta")


def check_config_numbers(cfg: dict[str, Any], where: str = "the model") -> None:
    """Check that the shape fields of ``config.json`` are positive numbers.

    Raises:
        ModelError: A field is text, a bool, zero, negative or not finite; names the field.
    """
    import math

    for name in _WHOLE_FIELDS + _REAL_FIELDS:
        if name not in cfg or (name == "head_dim" and cfg[name] is None):
            continue
        value = cfg[name]
        whole = name in _WHOLE_FIELDS
        ok = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
        if ok and not (math.isfinite(value) and value > 0):
            ok = False
        if not ok:
            raise ModelError(
                f"config.json of {where}: field {name!r} is {value!r}, not a positive "
                f"{'whole number' if whole else 'number'}; the model cannot be built from it. "
                "Fix the value in config.json (e.g. from the original repository) or "
                "re-download the model."
            )


def check_model_config(
    cfg: dict[str, Any], runtime: RuntimeSpec, where: str = "the model"
) -> None:
    """Check a parsed ``config.json`` against the runtime's family and size.

    Raises:
        ModelError: Wrong ``model_type`` or shape, or a non-numeric shape field; the message
            names the right runtime or the field.
    """
    check_config_numbers(cfg, where)
    model_type = cfg.get("model_type")
    if model_type != runtime.hf_model_type:
        raise ModelError(
            f"{where} is a {model_type!r} checkpoint but runtime {runtime.name!r} fine-tunes "
            f"{runtime.hf_model_type!r} models; choose a runtime of the model's family"
            f"{_runtimes_of(model_type)} (`kfp-finetune runtimes`)."
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
            f"{where} has hidden_size={hidden}, num_hidden_layers={layers}, but runtime "
            f"{runtime.name!r} expects {runtime.shape[0]} and {runtime.shape[1]}; {hint}."
        )


def read_config(path: Path) -> dict[str, Any]:
    """Parse ``config.json``.

    Raises:
        ModelError: It is missing or not a JSON object.
    """
    if not path.is_file():
        raise ModelError(
            f"the model has no config.json (in {str(path.parent)!r}); a Hugging Face model "
            "folder is needed: config.json, *.safetensors and the tokenizer files."
        )
    check_no_lfs_pointers(path.parent, [path.name])
    try:
        cfg = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(
            f"config.json in {str(path.parent)!r} is not valid JSON ({exc}); re-download the "
            "model."
        ) from None
    if not isinstance(cfg, dict):
        raise ModelError(f"config.json in {str(path.parent)!r} is not a JSON object.")
    return cfg


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def check_no_lfs_pointers(folder: Path, names: list[str]) -> None:
    """Refuse Git LFS pointer files standing in for model files (a clone without ``git lfs``).

    Raises:
        ModelError: A file is a pointer; the message names it and how to get the content.
    """
    for name in names:
        path = folder / name
        try:
            if path.stat().st_size > 1024:
                continue  # pointers are ~130 bytes
            head = path.read_bytes()[: len(_LFS_POINTER)]
        except OSError:
            continue
        if head == _LFS_POINTER:
            raise ModelError(
                f"the model file {name!r} (in {str(folder)!r}) is a Git LFS pointer, not the "
                "file itself: the repository was cloned without Git LFS. Run `git lfs pull` in "
                "the source folder (or download with hf://org/repo, which fetches the "
                "content), then re-run the model step."
            )


_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def check_safetensors(path: Path) -> int:
    """Check that ``path`` is a whole safetensors file (header and every tensor's bytes).

    Reads only the header, so it costs milliseconds even for large shards.

    Args:
        path: The weight file.

    Returns:
        The number of tensors in it.

    Raises:
        ModelError: The file is empty, cut short, or not safetensors; the message names the
            file and says how to fix it.
    """
    import struct

    fix = ("re-upload or re-convert the checkpoint at the source (e.g. with transformers' "
           "save_pretrained(safe_serialization=True)), then re-run the model step")
    size = path.stat().st_size
    problem = None
    header: Any = None
    if size < 8:
        problem = f"it has {size} bytes, too few for a safetensors header"
    else:
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(_MAX_HEADER, size - 8):
                problem = f"its header claims {length} bytes but the file has {size}"
            else:
                try:
                    header = json.loads(handle.read(length))
                except (ValueError, UnicodeDecodeError):
                    problem = "its header is not valid safetensors JSON"
    if problem is None:
        if not isinstance(header, dict):
            problem = "its header is not a JSON object"
        else:
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            try:
                end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
            except (TypeError, KeyError, IndexError, ValueError):
                end, problem = 0, "a tensor entry has no valid data_offsets"
            data = size - 8 - length
            if problem is None and end != data:
                problem = (f"its tensors need {end} bytes of data but the file holds {data} "
                           "(cut short or padded)")
            if problem is None:
                return len(tensors)
    raise ModelError(
        f"the weight file {str(path)!r} is not a valid safetensors file: {problem}. The "
        f"checkpoint is corrupt or was cut short; {fix}."
    )


def check_model_files(
    names: list[str], runtime: RuntimeSpec, where: str = "the model"
) -> None:
    """Check a file listing (before download): config, weights and tokenizer files present.

    Raises:
        ModelError: Something the runtime needs is missing; the message names it.
    """
    present = set(names)
    if "config.json" not in present:
        raise ModelError(
            f"{where} has no config.json at its top level (files: {sorted(present)[:8]}); "
            "point the URI at a Hugging Face transformers checkpoint folder."
        )
    if not weight_files(names):
        raise ModelError(
            f"{where} has no *.safetensors (or PyTorch model*.bin) weights at its top level; "
            "torchtune's Hugging Face checkpointer needs them."
        )
    missing = [f for f in runtime.tokenizer.files() if f not in present]
    if missing:
        raise ModelError(
            f"{where} lacks the tokenizer file(s) {missing} that runtime {runtime.name!r} "
            "uses; point the URI at the full repository (it has them), or choose the runtime "
            "of the model's family."
        )


def check_model(folder: Path, runtime: RuntimeSpec) -> ModelInfo:
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
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    check_no_lfs_pointers(folder, names)
    cfg = read_config(folder / "config.json")
    check_model_config(cfg, runtime)
    weights = weight_files(names)
    if not weights:
        raise ModelError(
            f"the model folder {str(folder)!r} has no *.safetensors weights; torchtune's "
            "Hugging Face checkpointer needs them."
        )
    for name in weights:
        if name.endswith(".safetensors"):
            check_safetensors(folder / name)
    missing = [f for f in runtime.tokenizer.files() if not (folder / f).is_file()]
    if missing:
        raise ModelError(
            f"the model folder lacks the tokenizer file(s) {missing} that runtime "
            f"{runtime.name!r} uses; download the full repository (it has them)."
        )
    special = folder / "tokenizer.json"
    from kfp_finetune.steps.tokenizer_check import check_tokenizer_fits

    check_tokenizer_fits(folder, runtime, cfg, weights)
    return ModelInfo(
        checkpoint_files=weights,
        special_tokens_path=str(special) if special.is_file() else None,
        hidden_size=int(cfg.get("hidden_size") or 0),
        num_layers=int(cfg.get("num_hidden_layers") or 0),
    )
