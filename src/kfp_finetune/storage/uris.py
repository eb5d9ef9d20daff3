"""Parsing of storage URIs.

Supported forms (checked without touching the network or the disk):

* ``hf://org/repo`` (model) and ``hf://org/repo[/dir-or-file]`` (dataset), with an optional
  revision: ``hf://org/repo@<branch|tag|commit>[/path]``; a revision that contains ``/``
  (``refs/pr/1``) is written URL-encoded: ``hf://org/repo@refs%2Fpr%2F1``.
* ``s3://bucket[/prefix-or-key]`` for AWS S3, MinIO and other S3-compatible stores (endpoint,
  region and keys come from the environment, filled from a Kubernetes Secret on a cluster).
* ``file:///absolute/path`` and ``/absolute/path``.

``push_to`` (where the export step copies the model) uses the same grammar, narrowed by
:func:`parse_destination`: ``hf://org/repo[@branch]`` or ``s3://bucket[/prefix]``, no local
paths.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath
from typing import Any, Literal
from urllib.parse import unquote

from kfp_finetune.errors import ConfigError, SourceError
from kfp_finetune.storage.credentials import USER_ONLY, USERINFO, redact
from kfp_finetune.storage.credentials import redact_uri as redact_uri

Kind = Literal["dataset", "model"]

_HF_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
# A branch to push to: one git ref name, no '/'.
_BRANCH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUPPORTED = (
    "hf://org/repo[@revision][/path], s3://bucket[/prefix], file:///absolute/path or "
    "/absolute/path"
)


@dataclass(frozen=True)
class StorageUri:
    """A parsed storage URI.

    Attributes:
        scheme: ``"hf"``, ``"s3"`` or ``"file"``.
        repo_id: ``org/repo`` for ``hf``; empty otherwise.
        revision: Branch, tag or commit for ``hf``; None for the default branch.
        path: Path inside the repo (``hf``, may be empty), the key or prefix inside the bucket
            (``s3``, may be empty) or the absolute local path (``file``).
        raw: The URI as given (credential-free: URIs with credentials are refused).
        bucket: The bucket for ``s3``; empty otherwise.
    """

    scheme: str
    repo_id: str
    revision: str | None
    path: str
    raw: str
    bucket: str = ""

    def describe(self) -> str:
        """A short, credential-free description for logs and metadata."""
        if self.scheme == "hf":
            rev = f"@{self.revision.replace('/', '%2F')}" if self.revision else ""
            sub = f"/{self.path}" if self.path else ""
            return f"hf://{self.repo_id}{rev}{sub}"
        if self.scheme == "s3":
            sub = f"/{self.path}" if self.path else ""
            return f"s3://{self.bucket}{sub}"
        return f"file://{self.path}"


# The longest file-name component Linux filesystems accept (NAME_MAX, in bytes).
NAME_MAX = 255


def _check_segments(segments: list[str], uri: str) -> None:
    for seg in segments:
        if seg in ("..", "."):
            raise SourceError(
                f"storage_uri={redact(uri)!r} contains the path segment {seg!r}; paths may "
                "not walk out of their repository, bucket or folder. Remove it and give the "
                "path directly."
            )


def parse_storage_uri(uri: str | os.PathLike[str], kind: Kind) -> StorageUri:
    """Parse and check a storage URI without touching the network or disk.

    Args:
        uri: The URI, e.g. ``hf://tatsu-lab/alpaca/data``, ``s3://bucket/models/llama`` or
            ``/data/my-model``; a ``pathlib.Path`` is taken as a local path.
        kind: ``"dataset"`` (a path inside the repo is allowed) or ``"model"``.

    Returns:
        The parsed URI.

    Raises:
        SourceError: The URI is empty, malformed, walks out of its root (``..``), embeds
            credentials or uses an unsupported scheme. Every echo of it is redacted.
    """
    if isinstance(uri, PurePath):
        uri = os.fspath(uri)
    if not isinstance(uri, str):
        raise SourceError(
            f"The {kind} storage_uri is {_type_name(uri)}, not text; give one of: {SUPPORTED}."
        )
    if not uri.strip():
        raise SourceError(
            f"The {kind} storage_uri is empty ({uri!r}); give one of: {SUPPORTED}."
        )
    text = uri.strip()
    shown = redact(text)
    if USERINFO.search(text) or USER_ONLY.search(text) or shown != text:
        raise SourceError(
            f"storage_uri={shown!r} embeds credentials; never put secrets in a URI. "
            "Store them in a Kubernetes Secret (HF_TOKEN, or AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY for s3://) and remove them from the URI."
        )
    local = text.startswith(("/", "file://"))
    # Local paths may hold spaces (a folder named "My Data"); URIs of a service may not.
    if _CONTROL.search(text) or (not local and re.search(r"\s", text)):
        raise SourceError(
            f"storage_uri={shown!r} contains whitespace, a backslash or a control character; "
            f"write a URI such as {SUPPORTED.split(',')[0]}."
        )
    if text.startswith("hf://"):
        return _parse_hf(text, kind)
    if text.startswith("s3://"):
        return _parse_s3(text)
    if text.startswith("file://"):
        rest = text[len("file://") :]
        if not rest.startswith("/"):
            raise SourceError(
                f"storage_uri={shown!r} is not an absolute file URI; write file:///absolute/path "
                "(three slashes)."
            )
        return _parse_local(rest, text)
    if text.startswith("/"):
        return _parse_local(text, text)
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
    if match:
        scheme = match.group(1)
        hint = ""
        web = re.match(r"^https?://(?:www\.)?huggingface\.co/(datasets/)?([^/]+/[^/?#]+)", text)
        if web:
            hint = f" For a Hugging Face repository write hf://{web.group(2)}."
        raise SourceError(
            f"storage_uri={shown!r} uses the unsupported scheme {scheme!r}; "
            f"use one of: {SUPPORTED}.{hint}"
        )
    raise SourceError(
        f"storage_uri={shown!r} is neither a URI nor an absolute path; use one of: {SUPPORTED} "
        f"(for example hf://{shown.lstrip('./~')} if it names a Hugging Face repository)."
    )


def _type_name(value: Any) -> str:
    if value is None:
        return "None"
    return f"of type {type(value).__name__} ({redact(repr(value))[:80]})"


def _parse_local(path: str, raw: str) -> StorageUri:
    parts = PurePosixPath(path).parts
    _check_segments(list(parts[1:]), raw)
    for part in parts[1:]:
        if len(part.encode()) > NAME_MAX:
            raise SourceError(
                f"storage_uri={redact(raw)[:120]!r}...: the path component {part[:40]!r}... has "
                f"{len(part.encode())} bytes, over the file-name limit of {NAME_MAX}; no "
                "filesystem can hold it. Check the path (a pasted value in the wrong place?)."
            )
    return StorageUri("file", "", None, str(PurePosixPath(path)), raw)


def _parse_s3(text: str) -> StorageUri:
    body = text[len("s3://") :]
    bucket, _, key = body.partition("/")
    if not bucket:
        raise SourceError(
            f"storage_uri={redact(text)!r} names no bucket; write s3://<bucket>/<prefix>, e.g. "
            "s3://my-bucket/datasets/alpaca."
        )
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise SourceError(
            f"storage_uri={redact(text)!r}: {bucket!r} is not a valid bucket name (3-63 lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit)."
        )
    key = key.rstrip("/")
    segments = key.split("/") if key else []
    if any(not seg for seg in segments):
        raise SourceError(f"storage_uri={redact(text)!r} contains an empty path segment ('//').")
    _check_segments(segments, text)
    return StorageUri("s3", "", None, key, text, bucket=bucket)


def _parse_hf(text: str, kind: Kind) -> StorageUri:
    body = text[len("hf://") :].rstrip("/")
    segments = body.split("/") if body else []
    if len(segments) < 2 or not segments[0] or not segments[1]:
        raise SourceError(
            f"storage_uri={redact(text)!r} must name a repository as hf://org/repo"
            + ("[/path/to/dir-or-file]" if kind == "dataset" else "")
            + ", e.g. "
            + ("hf://tatsu-lab/alpaca/data." if kind == "dataset" else "hf://Qwen/Qwen2.5-1.5B.")
        )
    org, repo = segments[0], segments[1]
    revision = None
    if "@" in org:
        raise SourceError(
            f"storage_uri={redact(text)!r}: the revision goes after the repository name, as "
            "hf://org/repo@<revision>/path."
        )
    if "@" in repo:
        repo, raw_revision = repo.split("@", 1)
        revision = unquote(raw_revision)
        if not revision or not _REVISION.match(revision) or ".." in revision:
            raise SourceError(
                f"storage_uri={redact(text)!r} has an invalid revision {raw_revision!r}; write "
                "hf://org/repo@<branch|tag|commit>/path (encode '/' in a revision as %2F, e.g. "
                "@refs%2Fpr%2F1)."
            )
    for name in (org, repo):
        if not _HF_NAME.match(name) or ".." in name:
            raise SourceError(
                f"storage_uri={redact(text)!r}: {name!r} is not a valid Hugging Face name "
                "(letters, digits, '-', '_' and '.', starting with a letter or digit)."
            )
    rest = segments[2:]
    if any(not seg for seg in rest):
        raise SourceError(f"storage_uri={redact(text)!r} contains an empty path segment ('//').")
    _check_segments(rest, text)
    if kind == "model" and rest:
        raise SourceError(
            f"storage_uri={redact(text)!r}: a model URI names a whole repository (hf://org/repo); "
            f"drop the path {'/'.join(rest)!r}."
        )
    return StorageUri("hf", f"{org}/{repo}", revision, "/".join(rest), text)


# --------------------------------------------------------------------------- push_to


@dataclass(frozen=True)
class Destination:
    """A parsed ``push_to`` value: a storage URI that a finished model is copied to.

    Attributes:
        uri: The URI, parsed by the same grammar as sources (``hf`` or ``s3``).
    """

    uri: StorageUri

    @property
    def scheme(self) -> str:
        """``hf`` or ``s3``."""
        return self.uri.scheme

    @property
    def target(self) -> str:
        """``org/repo`` (hf) or the bucket (s3)."""
        return self.uri.repo_id if self.uri.scheme == "hf" else self.uri.bucket

    @property
    def prefix(self) -> str:
        """The branch (hf, "" for main) or the key prefix inside the bucket (s3)."""
        return (self.uri.revision or "") if self.uri.scheme == "hf" else self.uri.path

    @property
    def raw(self) -> str:
        """The value as given (without surrounding whitespace)."""
        return self.uri.raw


def _as_source(text: str) -> StorageUri | None:
    """``text`` parsed as a model source (a whole repository; a bucket and prefix), or None."""
    try:
        return parse_storage_uri(text, "model")
    except SourceError:
        return None


def parse_destination(push_to: str) -> Destination | None:
    """Parse ``push_to``: "" (none), ``hf://org/repo[@branch]`` or ``s3://bucket[/prefix]``.

    The grammar is :func:`parse_storage_uri`'s; a destination adds its own rules: only the
    ``hf`` and ``s3`` schemes (never a local path), a whole repository, and a branch name
    (no ``/``) as the revision.

    Raises:
        ConfigError: The value is neither, or embeds credentials (echoed redacted).
    """
    text = push_to.strip()
    if not text:
        return None
    if redact_uri(text) != text:
        raise ConfigError(
            f"push_to={redact_uri(text)!r} embeds credentials; never put secrets in a URI. "
            "Store them in the Kubernetes Secret named by secret_hf_token (HF_TOKEN) or "
            "secret_s3 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and remove them from "
            "export_push_to."
        )
    if text.startswith("hf://"):
        uri = _as_source(text)
        if uri is not None and (uri.revision is None or _BRANCH.fullmatch(uri.revision)):
            return Destination(uri)
        raise ConfigError(
            f"push_to={push_to!r} is not a Hugging Face model repository; write "
            "hf://<org>/<repo> (optionally hf://<org>/<repo>@<branch>)."
        )
    if text.startswith("s3://"):
        uri = _as_source(text)
        if uri is not None:
            return Destination(uri)
        raise ConfigError(
            f"push_to={push_to!r} is not an S3 location; write s3://<bucket>[/<prefix>] "
            "(bucket names are 3-63 lowercase letters, digits, '.' or '-')."
        )
    raise ConfigError(
        f"push_to={push_to!r}: unsupported destination; use hf://<org>/<repo>, "
        "s3://<bucket>[/<prefix>], or leave it empty to keep the model on the workspace volume."
    )
