"""Fetching a dataset or model from its storage URI into a (staging) folder.

One module per scheme lists and downloads files (``storage_hf``, ``storage_s3`` and the local
copy here); this module chooses the files, retries network errors with backoff, downloads in
parallel, checks sizes and prunes what does not belong. Downloads resume at file granularity:
a file that a previous, interrupted run finished in the same staging folder is not fetched
again, and a partial file is never taken as finished (files are written to a temporary name
and renamed when complete).

Tokens and keys come from the environment (Kubernetes Secrets on a cluster), never from
parameters, and every message built from a third-party error is redacted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from kfp_finetune.errors import DatasetError, KfpFinetuneError, ModelError, SourceError
from kfp_finetune.storage.credentials import redact
from kfp_finetune.storage.ownership import remove_owned
from kfp_finetune.storage.uris import StorageUri
from kfp_finetune.storage.workspace import check_free_space, disk_errors

Log = Callable[[str], None]
T = TypeVar("T")

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


def _quiet(*_: Any) -> None:
    return None


class TransientError(Exception):
    """A network or server error worth retrying (timeouts, resets, HTTP 429 and 5xx)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently network errors are retried.

    Attributes:
        attempts: Tries per file (and per listing), at least 1.
        base_delay: Seconds before the second try; doubled each time.
        max_delay: Upper bound of one wait.
    """

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Policy from ``KFP_FINETUNE_DOWNLOAD_ATTEMPTS`` and ``KFP_FINETUNE_RETRY_DELAY_S``."""
        try:
            attempts = int(os.environ.get("KFP_FINETUNE_DOWNLOAD_ATTEMPTS", "5"))
            delay = float(os.environ.get("KFP_FINETUNE_RETRY_DELAY_S", "1.0"))
        except ValueError:
            attempts, delay = 5, 1.0
        return cls(max(1, attempts), max(0.0, delay))

    def delay(self, attempt: int) -> float:
        """Wait before try number ``attempt + 1``."""
        return min(self.max_delay, self.base_delay * 2 ** (attempt - 1))


def with_retry(fn: Callable[[], T], what: str, policy: RetryPolicy, log: Log) -> T:
    """Call ``fn``; retry it with exponential backoff while it raises ``TransientError``.

    Raises:
        SourceError: Every try failed; the message names ``what`` and how to resume.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except TransientError as exc:
            if attempt >= policy.attempts:
                raise SourceError(
                    f"{what} failed after {policy.attempts} attempt(s): {redact(exc)}. Check the "
                    "network and the endpoint, then re-run the step: files already downloaded "
                    "are kept and the download resumes."
                ) from None
            wait_s = policy.delay(attempt)
            log(f"  {what}: {redact(exc)}; retrying in {wait_s:.1f} s "
                f"(attempt {attempt + 1}/{policy.attempts})")
            time.sleep(wait_s)
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source.

    Attributes:
        path: Relative path in the destination folder (``/``-separated).
        size: Size in bytes when the listing gives it.
        ref: What the backend needs to fetch it (repo path, object key, local path).
        etag: Version tag of the file when the backend has one.
    """

    path: str
    size: int | None
    ref: str
    etag: str | None = None


@dataclass(frozen=True)
class Listing:
    """The files of a source at one version.

    Attributes:
        version: Commit (hf) or a digest of the listing (s3, local); changes when content does.
        files: Every file under the URI (before selection).
        revision: The resolved revision to record (commit sha for hf), or None.
    """

    version: str
    files: list[RemoteFile]
    revision: str | None = None


class Backend(Protocol):
    """What a storage scheme provides."""

    def version(self) -> str:
        """The source's current version, from metadata only (no file content)."""

    def listing(self) -> Listing:
        """Every file under the URI, with the version they belong to."""

    def download(self, listing: Listing, item: RemoteFile, dest: Path) -> bool:
        """Fetch ``item`` to ``dest / item.path`` atomically; False when it was already there."""


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


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` did.

    Attributes:
        version: Source version fetched.
        revision: Resolved revision (hf commit) or None.
        files: ``{"path", "bytes"}`` of every file now in the destination.
        downloaded: Files transferred in this call (the others were already complete).
        downloaded_bytes: Bytes of those files.
    """

    version: str
    revision: str | None
    files: list[dict[str, Any]]
    downloaded: int
    downloaded_bytes: int


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
    else:
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
    if opts.ignore_patterns:
        kept = [f for f in chosen if not _match(f.path, opts.ignore_patterns)]
        if not kept:
            raise SourceError(
                f"ignore_patterns={list(opts.ignore_patterns)} leave no file of "
                f"{uri.describe()!r} to fetch; narrow the patterns."
            )
        chosen = kept
    return sorted(chosen, key=lambda f: f.path)


def backend_for(uri: StorageUri, kind: str, log: Log = _quiet) -> Backend:
    """The backend of ``uri``'s scheme."""
    if uri.scheme == "hf":
        from kfp_finetune.storage.hf import HfBackend

        return HfBackend(uri, kind, log)
    if uri.scheme == "s3":
        from kfp_finetune.storage.s3 import S3Backend

        return S3Backend(uri, kind, log)
    return LocalBackend(uri)


def remote_version(uri: StorageUri, kind: str, policy: RetryPolicy, log: Log) -> str | None:
    """The source's current version from metadata only, or None when it cannot be learnt.

    Used on a re-run: when it equals the manifest's version, the step skips the download. No
    request for file content is made.
    """
    backend = backend_for(uri, kind, log)
    short = RetryPolicy(min(policy.attempts, 2), policy.base_delay, policy.max_delay)
    try:
        return with_retry(backend.version, f"checking {uri.describe()}", short, _quiet)
    except KfpFinetuneError as exc:
        log(f"  could not check {uri.describe()} for changes ({redact(exc)}); keeping the "
            "complete copy in the workspace.")
        return None


def fetch(
    uri: StorageUri,
    dest: Path,
    kind: str | FetchOptions,
    *,
    log: Log = _quiet,
    retry: RetryPolicy | None = None,
) -> FetchResult:
    """Fetch what ``uri`` names into ``dest``, resuming what a previous attempt finished.

    Args:
        uri: Parsed storage URI.
        dest: Destination folder (a staging folder; created if needed).
        kind: ``"dataset"``/``"model"`` or full :class:`FetchOptions`.
        log: Where progress lines go (never receives secrets).
        retry: Retry policy for network errors (default: from the environment).

    Returns:
        What was fetched.

    Raises:
        SourceError: The source does not exist, is empty, denies access, or the network
            failed on every retry.
        DatasetError: The dataset has no file of the declared format.
        ModelError: The model lacks weights, config or tokenizer files, or does not match.
    """
    opts = kind if isinstance(kind, FetchOptions) else FetchOptions(kind=kind)
    policy = retry or RetryPolicy.from_env()
    dest.mkdir(parents=True, exist_ok=True)
    backend = backend_for(uri, opts.kind, log)
    listing = with_retry(backend.listing, f"listing {uri.describe()}", policy, log)
    chosen = select_files(uri, listing, opts)
    _prune(dest, {f.path for f in chosen})
    # Pre-flight: the listed sizes of what is still missing must fit on the volume.
    missing = sum(
        f.size for f in chosen
        if f.size is not None and _size(dest / f.path) != f.size
    )
    check_free_space(dest, missing, f"the {opts.kind} {uri.describe()}")

    downloaded: list[RemoteFile] = []

    def one(item: RemoteFile) -> None:
        done = with_retry(
            lambda: backend.download(listing, item, dest),
            f"downloading {item.path} from {uri.describe()}", policy, log,
        )
        if done:
            downloaded.append(item)
            log(f"  {item.path} ({_size(dest / item.path)} bytes)")

    first = [f for f in chosen if f.path == "config.json"] if opts.check_config else []
    with disk_errors(dest, f"fetching the {opts.kind} {uri.describe()}"):
        for item in first:
            one(item)
            assert opts.check_config is not None
            opts.check_config(dest / item.path)
        if opts.check_files is not None:
            opts.check_files([f.path for f in chosen])
        rest = [f for f in chosen if f not in first]
        _parallel(one, rest, opts.workers)

    files = []
    for item in chosen:
        path = dest / item.path
        if not path.is_file():
            raise SourceError(
                f"{item.path} of {uri.describe()!r} is missing after the download; re-run the "
                "step (it resumes)."
            )
        size = path.stat().st_size
        if item.size is not None and size != item.size:
            remove_owned(path)
            raise SourceError(
                f"{item.path} of {uri.describe()!r} has {size} bytes but the source lists "
                f"{item.size}; the download was cut short. Re-run the step (it resumes)."
            )
        files.append({"path": item.path, "bytes": size})
    remove_owned(dest / ".cache")
    return FetchResult(
        version=listing.version,
        revision=listing.revision,
        files=files,
        downloaded=len(downloaded),
        downloaded_bytes=sum(_size(dest / f.path) for f in downloaded),
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _parallel(fn: Callable[[RemoteFile], None], items: list[RemoteFile], workers: int) -> None:
    if not items:
        return
    if workers <= 1 or len(items) == 1:
        for item in items:
            fn(item)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for fut in pending:
            fut.cancel()
        for fut in futures:
            if fut.done() and not fut.cancelled() and fut.exception() is not None:
                raise fut.exception()  # type: ignore[misc]


def _prune(dest: Path, keep: set[str]) -> None:
    """Remove files of an earlier attempt that the current selection does not include.

    Only in a workspace's staging area (``remove_owned`` refuses anything else).
    """
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest)
        if rel.parts and rel.parts[0] == ".cache":
            continue
        if (path.is_file() and rel.as_posix() not in keep) or (
                path.is_dir() and not any(path.iterdir())):
            remove_owned(path)


def digest(items: Iterable[Any]) -> str:
    """A short, stable digest of JSON-serialisable items (used as a version)."""
    data = json.dumps(list(items), sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:32]


class LocalBackend:
    """A file or folder on a local (or mounted) filesystem."""

    def __init__(self, uri: StorageUri) -> None:
        self.uri = uri
        self.root = Path(uri.path)

    def _files(self) -> list[tuple[RemoteFile, os.stat_result]]:
        src = self.root
        if not src.exists():
            raise SourceError(
                f"storage_uri={self.uri.raw!r}: {str(src)!r} does not exist; check the path (it "
                "must be visible to the process that runs the step)."
            )
        if src.is_file():
            return [(RemoteFile(src.name, src.stat().st_size, str(src)), src.stat())]
        out = []
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                st = path.stat()
                out.append((RemoteFile(rel.as_posix(), st.st_size, str(path)), st))
        return out

    def version(self) -> str:
        """Digest of the names, sizes, modification and change times.

        The change time (ctime) cannot be set back by the user, so a file replaced with its
        size and mtime kept (``cp -p``, ``touch -r``) still counts as changed.
        """
        return digest((f.path, f.size, st.st_mtime_ns, st.st_ctime_ns) for f, st in self._files())

    def listing(self) -> Listing:
        """Every visible file under the path."""
        files = self._files()
        return Listing(digest((f.path, f.size, st.st_mtime_ns, st.st_ctime_ns) for f, st in files),
                       [f for f, _ in files])

    def download(self, listing: Listing, item: RemoteFile, dest: Path) -> bool:
        """Copy the file (to a temporary name, then rename)."""
        target = dest / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.part")
        try:
            shutil.copy2(item.ref, tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a cut copy never stays behind (e.g. disk full)
            raise
        return True
