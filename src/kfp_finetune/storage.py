"""Fetching a dataset or model from its storage URI into a (staging) folder.

The Hugging Face token is read from the ``HF_TOKEN`` environment variable, which a Kubernetes
Secret fills on a cluster; it is never a parameter and never printed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kfp_finetune.errors import SourceError
from kfp_finetune.uris import StorageUri

# What torchtune needs from a model repo; the other weight formats are skipped (see README).
MODEL_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*", "*.tiktoken"]
MODEL_IGNORE_PATTERNS = ["*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.gguf", "*.onnx"]


def fetch(uri: StorageUri, dest: Path, kind: str) -> None:
    """Copy or download what ``uri`` names into the empty folder ``dest``.

    Args:
        uri: Parsed storage URI.
        dest: Empty destination folder.
        kind: ``"dataset"`` or ``"model"``.

    Raises:
        SourceError: The source does not exist, is empty, or cannot be read.
    """
    if uri.scheme == "file":
        _copy_local(Path(uri.path), dest, uri)
    else:
        _download_hf(uri, dest, kind)
    if not any(p.is_file() for p in dest.rglob("*")):
        raise SourceError(
            f"{kind} storage_uri={uri.describe()!r} holds no files; point it at a folder or file "
            "that has the data."
        )


def _copy_local(src: Path, dest: Path, uri: StorageUri) -> None:
    if not src.exists():
        raise SourceError(
            f"storage_uri={uri.raw!r}: {str(src)!r} does not exist; check the path (it must be "
            "visible to the process that runs the step)."
        )
    if src.is_file():
        shutil.copy2(src, dest / src.name)
        return
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .git, .cache and our own markers are not content
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)


def _download_hf(uri: StorageUri, dest: Path, kind: str) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if kind == "dataset":
        repo_type = "dataset"
        allow = [uri.path, f"{uri.path}/*"] if uri.path else None
        ignore = [".gitattributes", "README.md"]
    else:
        repo_type = "model"
        allow, ignore = MODEL_ALLOW_PATTERNS, MODEL_IGNORE_PATTERNS
    token = os.environ.get("HF_TOKEN") or None
    try:
        snapshot_download(
            repo_id=uri.repo_id,
            repo_type=repo_type,
            revision=uri.revision,
            allow_patterns=allow,
            ignore_patterns=ignore,
            local_dir=str(dest),
            token=token,
        )
    except GatedRepoError:
        raise SourceError(
            f"{uri.describe()!r} is gated: accept its licence on huggingface.co, then give the "
            "pipeline a token with access: `kubectl create secret generic hf-token "
            "--from-literal=HF_TOKEN=<token>` (locally: export HF_TOKEN)."
        ) from None
    except RevisionNotFoundError:
        raise SourceError(
            f"{uri.describe()!r}: revision {uri.revision!r} does not exist; use a branch, tag or "
            "commit of the repository."
        ) from None
    except RepositoryNotFoundError:
        raise SourceError(
            f"{uri.describe()!r}: {repo_type} repository {uri.repo_id!r} was not found (or it is "
            "private and no valid HF_TOKEN was given); check the name, or create the token "
            "Secret: `kubectl create secret generic hf-token --from-literal=HF_TOKEN=<token>`."
        ) from None
    except EntryNotFoundError:
        raise SourceError(
            f"{uri.describe()!r}: path {uri.path!r} does not exist in {uri.repo_id!r}."
        ) from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise SourceError(
            f"downloading {uri.describe()!r} failed: {type(exc).__name__}; check the network and "
            "retry (the step resumes)."
        ) from None
    # huggingface_hub keeps its own bookkeeping in .cache; it is not content.
    shutil.rmtree(dest / ".cache", ignore_errors=True)
