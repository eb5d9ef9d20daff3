"""Parsing of storage URIs: ``hf://org/repo[@revision][/path]``, ``file:///abs`` and ``/abs``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal

from kfp_finetune.errors import SourceError

Kind = Literal["dataset", "model"]

_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
SUPPORTED = "hf://org/repo[/path], file:///absolute/path or /absolute/path"


@dataclass(frozen=True)
class StorageUri:
    """A parsed storage URI.

    Attributes:
        scheme: ``"hf"`` or ``"file"``.
        repo_id: ``org/repo`` for ``hf``; empty for ``file``.
        revision: Branch, tag or commit for ``hf``; None for the default branch.
        path: Path inside the repo (``hf``, may be empty) or the absolute local path (``file``).
        raw: The URI as given.
    """

    scheme: str
    repo_id: str
    revision: str | None
    path: str
    raw: str

    def describe(self) -> str:
        """A short, credential-free description for logs and metadata."""
        if self.scheme == "hf":
            rev = f"@{self.revision}" if self.revision else ""
            sub = f"/{self.path}" if self.path else ""
            return f"hf://{self.repo_id}{rev}{sub}"
        return f"file://{self.path}"


def _redact(uri: str) -> str:
    # Never echo credentials that a user pasted into a URI (https://user:pass@host).
    return re.sub(r"//[^/@\s]*:[^/@\s]*@", "//***:***@", uri)


def _check_segments(segments: list[str], uri: str) -> None:
    for seg in segments:
        if seg in ("..", "."):
            raise SourceError(
                f"storage_uri={_redact(uri)!r} contains the path segment {seg!r}; paths may not "
                "walk out of their repository or folder. Remove it and give the path directly."
            )


def parse_storage_uri(uri: str, kind: Kind) -> StorageUri:
    """Parse and check a storage URI without touching the network or disk.

    Args:
        uri: The URI, e.g. ``hf://tatsu-lab/alpaca/data`` or ``/data/my-model``.
        kind: ``"dataset"`` (a path inside the repo is allowed) or ``"model"``.

    Returns:
        The parsed URI.

    Raises:
        SourceError: The URI is empty, malformed or uses an unsupported scheme.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise SourceError(
            f"The {kind} storage_uri is empty ({uri!r}); give one of: {SUPPORTED}."
        )
    text = uri.strip()
    if re.search(r"//[^/@\s]*:[^/@\s]*@", text):
        raise SourceError(
            f"storage_uri={_redact(text)!r} embeds credentials; never put secrets in a URI. "
            "Store the token in a Kubernetes Secret (HF_TOKEN) and remove it from the URI."
        )
    if text.startswith("hf://"):
        return _parse_hf(text, kind)
    if text.startswith("file://"):
        rest = text[len("file://") :]
        if not rest.startswith("/"):
            raise SourceError(
                f"storage_uri={text!r} is not an absolute file URI; write file:///absolute/path "
                "(three slashes)."
            )
        return _parse_local(rest, text)
    if text.startswith("/"):
        return _parse_local(text, text)
    scheme = text.split("://", 1)[0] if "://" in text else None
    if scheme:
        raise SourceError(
            f"storage_uri={_redact(text)!r} uses the unsupported scheme {scheme!r}; "
            f"use one of: {SUPPORTED}."
        )
    raise SourceError(
        f"storage_uri={text!r} is neither a URI nor an absolute path; use one of: {SUPPORTED} "
        f"(for example hf://{text} if it names a Hugging Face repository)."
    )


def _parse_local(path: str, raw: str) -> StorageUri:
    parts = PurePosixPath(path).parts
    _check_segments(list(parts[1:]), raw)
    return StorageUri("file", "", None, str(PurePosixPath(path)), raw)


def _parse_hf(text: str, kind: Kind) -> StorageUri:
    body = text[len("hf://") :].strip("/")
    segments = body.split("/") if body else []
    if len(segments) < 2 or not segments[0] or not segments[1]:
        raise SourceError(
            f"storage_uri={text!r} must name a repository as hf://org/repo"
            + ("[/path/to/dir-or-file]" if kind == "dataset" else "")
            + ", e.g. "
            + ("hf://tatsu-lab/alpaca/data." if kind == "dataset" else "hf://Qwen/Qwen2.5-1.5B.")
        )
    org, repo = segments[0], segments[1]
    revision = None
    if "@" in repo:
        repo, revision = repo.split("@", 1)
        if not revision or not _REVISION.match(revision) or ".." in revision:
            raise SourceError(
                f"storage_uri={text!r} has an invalid revision {revision!r}; write "
                "hf://org/repo@<branch|tag|commit>/path."
            )
    for name in (org, repo):
        if not _HF_NAME.match(name) or ".." in name:
            raise SourceError(
                f"storage_uri={text!r}: {name!r} is not a valid Hugging Face name (letters, "
                "digits, '-', '_' and '.', starting with a letter or digit)."
            )
    rest = segments[2:]
    if any(not seg for seg in rest):
        raise SourceError(f"storage_uri={text!r} contains an empty path segment ('//').")
    _check_segments(rest, text)
    if kind == "model" and rest:
        raise SourceError(
            f"storage_uri={text!r}: a model URI names a whole repository (hf://org/repo); "
            f"drop the path {'/'.join(rest)!r}."
        )
    return StorageUri("hf", f"{org}/{repo}", revision, "/".join(rest), text)
