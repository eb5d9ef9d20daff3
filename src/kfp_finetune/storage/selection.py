"""Which files of a source listing a step takes, and the options that decide it."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kfp_finetune.errors import DatasetError, ModelError, SourceError
from kfp_finetune.storage.base import Listing, RemoteFile
from kfp_finetune.storage.uris import StorageUri

# What torchtune needs from a model repo: configs, weights, tokenizer files; and what the
# export carries over: the chat template (chat_template.jinja) and the card (its license).
MODEL_ALLOW_PATTERNS = [
    "*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.tiktoken", "*.jinja",
    "README.md",
]
# Weight formats torchtune's Hugging Face checkpointer does not need when safetensors exist.
MODEL_IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.ot"]
# Taken instead of safetensors when a repo has none (torchtune reads PyTorch .bin shards too).
MODEL_FALLBACK_WEIGHTS = ["*.bin"]
NOT_WEIGHTS = ["training_args.bin", "optimizer.bin", "scheduler.bin", "*/training_args.bin"]
DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class FetchOptions:
    """What to take from a source and what to check before the bulk of the download.

    Attributes:
        kind: ``"dataset"`` or ``"model"``.
        extensions: Dataset: only files with these suffixes (the declared format's).
        data_format: Dataset: the declared format, for messages.
        ignore_patterns: Extra glob patterns (fnmatch, as huggingface_hub) to skip.
        check_config: Model: called with the downloaded ``config.json`` first of all.
        check_files: Called with the selected relative paths before the bulk download.
        workers: Parallel downloads.
    """

    kind: str
    extensions: tuple[str, ...] = ()
    data_format: str = ""
    ignore_patterns: tuple[str, ...] = ()
    check_files: Callable[[list[str]], None] | None = field(default=None, compare=False)
    check_config: Callable[[Path], None] | None = field(default=None, compare=False)
    workers: int = DEFAULT_WORKERS

    def fingerprint(self) -> dict[str, Any]:
        """The options that decide which files are taken (recorded in the manifest)."""
        return {
            "kind": self.kind,
            "extensions": list(self.extensions),
            "ignore_patterns": list(self.ignore_patterns),
        }


def check_ignore_patterns(patterns: Iterable[str] | None) -> tuple[str, ...]:
    """Check user ignore patterns (glob strings) and return them as a tuple.

    Raises:
        SourceError: A pattern is empty, not text, or would ignore everything (``*``).
    """
    out: list[str] = []
    for pattern in patterns or ():
        if not isinstance(pattern, str) or not pattern.strip():
            raise SourceError(
                f"ignore_patterns contains {pattern!r}; each pattern must be a non-empty glob "
                "such as '*.pth' or 'original/*'."
            )
        if pattern.strip() in ("*", "**", "*/*"):
            raise SourceError(
                f"ignore_patterns contains {pattern!r}, which ignores every file; remove it."
            )
        out.append(pattern.strip())
    return tuple(out)


def _match(path: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(path, p) for p in patterns)


def _dataset_files(uri: StorageUri, visible: list[RemoteFile], opts: FetchOptions
                   ) -> list[RemoteFile]:
    """The files of the declared format (DatasetError, listing what was found, when none)."""
    chosen = [f for f in visible if PurePosixPath(f.path).suffix.lower() in opts.extensions]
    if not chosen:
        found = sorted({PurePosixPath(f.path).suffix or PurePosixPath(f.path).name
                        for f in visible})
        raise DatasetError(
            f"source={opts.data_format!r} but {uri.describe()!r} has no "
            f"{'/'.join(opts.extensions)} files (found: {', '.join(found[:10])}); set source "
            "to the files' format (e.g. source='json' for .jsonl files) or point the URI "
            "at the data files."
        )
    return chosen


def _model_files(uri: StorageUri, visible: list[RemoteFile]) -> list[RemoteFile]:
    """Configs, weights and tokenizer files (ModelError when there are no weights)."""
    has_safetensors = any(f.path.endswith(".safetensors") for f in visible)
    allow = list(MODEL_ALLOW_PATTERNS)
    ignore = list(MODEL_IGNORE_PATTERNS)
    if not has_safetensors:
        allow += MODEL_FALLBACK_WEIGHTS
        ignore = [p for p in ignore if p not in MODEL_FALLBACK_WEIGHTS] + NOT_WEIGHTS
    chosen = [f for f in visible if _match(f.path, allow) and not _match(f.path, ignore)]
    weights = [f for f in chosen if f.path.endswith((".safetensors", ".bin"))]
    if not weights:
        raise ModelError(
            f"model storage_uri={uri.describe()!r} has no *.safetensors (or PyTorch *.bin) "
            "weights; torchtune's Hugging Face checkpointer needs them. Point the URI at a "
            "Hugging Face transformers checkpoint."
        )
    return chosen


def select_files(uri: StorageUri, listing: Listing, opts: FetchOptions) -> list[RemoteFile]:
    """The files of ``listing`` that the step needs.

    Models: configs, safetensors and tokenizer files (``*.bin`` only when the source has no
    safetensors); datasets: files of the declared format. Hidden files (``.gitattributes``)
    and the user's ignore patterns are skipped.

    Raises:
        SourceError: The source holds no files, or the ignore patterns leave none.
        DatasetError: No file has the declared format (the message lists what was found).
        ModelError: The source has neither safetensors nor .bin weights.
    """
    visible = [
        f for f in listing.files
        if not any(part.startswith(".") for part in PurePosixPath(f.path).parts)
    ]
    if not visible:
        raise SourceError(
            f"{opts.kind} storage_uri={uri.describe()!r} holds no files; point it at a folder or "
            "file that has the data."
        )
    if opts.kind == "dataset":
        chosen = _dataset_files(uri, visible, opts)
    else:
        chosen = _model_files(uri, visible)
    if opts.ignore_patterns:
        kept = [f for f in chosen if not _match(f.path, opts.ignore_patterns)]
        if not kept:
            raise SourceError(
                f"ignore_patterns={list(opts.ignore_patterns)} leave no file of "
                f"{uri.describe()!r} to fetch; narrow the patterns."
            )
        chosen = kept
    return sorted(chosen, key=lambda f: f.path)
