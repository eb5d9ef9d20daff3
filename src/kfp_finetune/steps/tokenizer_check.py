"""Loading the tokenizer on CPU as torchtune will, and comparing it with the embedding.

A token id at or above the embedding's row count makes ``nn.Embedding`` index out of range
inside ``tune run`` on the GPU node; here it is found in the model step, on CPU, from the
tokenizer files and config.json (and the embedding's shape in the safetensors header).
"""

from __future__ import annotations

import importlib
import json
import struct
from pathlib import Path
from typing import Any

from kfp_finetune.config.runtimes import RuntimeSpec
from kfp_finetune.errors import ModelError
from kfp_finetune.storage.credentials import redact

_EMBEDDING_NAMES = ("model.embed_tokens.weight", "tok_embeddings.weight")


def load_tokenizer(folder: Path, runtime: RuntimeSpec) -> Any:
    """Build the runtime's torchtune tokenizer from ``folder`` (the fine-tune step's files).

    Raises:
        ModelError: torchtune cannot load the files; the message names them.
    """
    spec = runtime.tokenizer
    module_name, _, func_name = spec.component.rpartition(".")
    builder = getattr(importlib.import_module(module_name), func_name)
    kwargs: dict[str, Any] = {"path": str(folder / spec.path)}
    if spec.merges_file:
        kwargs["merges_file"] = str(folder / spec.merges_file)
    if (folder / "tokenizer.json").is_file():
        kwargs["special_tokens_path"] = str(folder / "tokenizer.json")
    try:
        return builder(**kwargs)
    except Exception as exc:  # noqa: BLE001 - tiktoken, json and torchtune raise many types
        files = [spec.path] + ([spec.merges_file] if spec.merges_file else [])
        if "special_tokens_path" in kwargs:
            files.append("tokenizer.json")
        detail = redact(str(exc)).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise ModelError(
            f"torchtune's {func_name} cannot load the tokenizer files {files} of "
            f"{str(folder)!r} ({type(exc).__name__}: {detail}); they are corrupt or belong to "
            "another model family. Re-download the model, or choose the runtime of its family."
        ) from None


def max_token_id(tokenizer: Any) -> int:
    """The largest id the tokenizer can produce (base vocabulary and special tokens)."""
    ids: list[int] = list(getattr(tokenizer, "special_tokens", {}).values())
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict) and encoder:
        ids.append(max(encoder.values()))
    if hasattr(tokenizer, "tt_model"):  # tiktoken: n_vocab is the largest id + 1
        ids.append(int(tokenizer.vocab_size) - 1)
    return max(ids) if ids else -1


def embedding_rows(folder: Path, weights: list[str]) -> tuple[str, int] | None:
    """(file, rows) of the token embedding from the safetensors headers, or None."""
    for name in weights:
        if not name.endswith(".safetensors"):
            continue
        with (folder / name).open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key in _EMBEDDING_NAMES:
            shape = header.get(key, {}).get("shape") if isinstance(header, dict) else None
            if shape:
                return name, int(shape[0])
    return None


def check_tokenizer_fits(folder: Path, runtime: RuntimeSpec, cfg: dict[str, Any],
                         weights: list[str]) -> None:
    """Check that config.json, the embedding and the tokenizer agree on the vocabulary.

    Raises:
        ModelError: The embedding's rows differ from ``vocab_size``, or the tokenizer makes
            ids the embedding has no row for.
    """
    vocab = cfg.get("vocab_size")
    rows = embedding_rows(folder, weights)
    if rows is not None and isinstance(vocab, int) and rows[1] != vocab:
        raise ModelError(
            f"config.json of {str(folder)!r} says vocab_size={vocab} but the embedding in "
            f"{rows[0]!r} has {rows[1]} rows; config.json and the weights come from different "
            "models. Re-download the model as one piece."
        )
    limit = rows[1] if rows is not None else vocab
    if not isinstance(limit, int):
        return
    top = max_token_id(load_tokenizer(folder, runtime))
    if top >= limit:
        raise ModelError(
            f"the tokenizer of {str(folder)!r} ({runtime.tokenizer.path}"
            f"{' + tokenizer.json' if (folder / 'tokenizer.json').is_file() else ''}) makes "
            f"token ids up to {top}, but the model's embedding has {limit} rows (config.json "
            f"vocab_size={vocab}): ids {limit}..{top} would index past it inside tune run. The "
            "tokenizer files belong to another model; put the model's own tokenizer files in "
            "the folder."
        )
