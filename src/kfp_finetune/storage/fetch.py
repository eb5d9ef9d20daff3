"""Fetching a dataset or model from its storage URI into a (staging) folder.

One module per scheme lists and downloads files (``storage.hf``, ``storage.s3``,
``storage.local``; what they share is in ``storage.base``); this module chooses the files
(``storage.selection``), retries network errors with backoff, downloads in parallel, checks
sizes and prunes what does not belong. Downloads resume at file granularity: a file that a
previous, interrupted run finished in the same staging folder is not fetched again, and a
partial file is never taken as finished (files are written to a temporary name and renamed
when complete).

Tokens and keys come from the environment (Kubernetes Secrets on a cluster), never from
parameters, and every message built from a third-party error is redacted.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.errors import KfpFinetuneError, SourceError
from kfp_finetune.storage.base import (
    Backend,
    Listing,
    Log,
    RemoteFile,
    RetryPolicy,
    TransientError,
    digest,
    with_retry,
)
from kfp_finetune.storage.base import quiet as _quiet
from kfp_finetune.storage.credentials import redact
from kfp_finetune.storage.hf import HfBackend
from kfp_finetune.storage.local import LocalBackend
from kfp_finetune.storage.ownership import remove_owned
from kfp_finetune.storage.s3 import S3Backend
from kfp_finetune.storage.selection import FetchOptions, check_ignore_patterns, select_files
from kfp_finetune.storage.uris import StorageUri
from kfp_finetune.storage.workspace import check_free_space, disk_errors

# RetryPolicy, FetchOptions, check_ignore_patterns, digest and TransientError moved to
# storage.base and storage.selection; they stay importable from here for older imports.
__all__ = ["FetchOptions", "FetchResult", "RetryPolicy", "TransientError", "backend_for",
           "check_ignore_patterns", "digest", "fetch", "remote_version"]


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


def backend_for(uri: StorageUri, kind: str, log: Log = _quiet) -> Backend:
    """The backend of ``uri``'s scheme."""
    if uri.scheme == "hf":
        return HfBackend(uri, kind, log)
    if uri.scheme == "s3":
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
    with disk_errors(dest, f"fetching the {opts.kind} {uri.describe()}"):
        downloaded = _download(backend, listing, chosen, uri, dest, opts, policy, log)
    files = _check_complete(chosen, uri, dest)
    remove_owned(dest / ".cache")
    return FetchResult(
        version=listing.version,
        revision=listing.revision,
        files=files,
        downloaded=len(downloaded),
        downloaded_bytes=sum(_size(dest / f.path) for f in downloaded),
    )


def _download(
    backend: Backend, listing: Listing, chosen: list[RemoteFile], uri: StorageUri, dest: Path,
    opts: FetchOptions, policy: RetryPolicy, log: Log,
) -> list[RemoteFile]:
    """Download ``chosen`` (``config.json`` first and checked when asked); the files moved now.

    The option checks run before the bulk download, so a wrong model fails after one small
    file.
    """
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
    for item in first:
        one(item)
        assert opts.check_config is not None
        opts.check_config(dest / item.path)
    if opts.check_files is not None:
        opts.check_files([f.path for f in chosen])
    rest = [f for f in chosen if f not in first]
    _parallel(one, rest, opts.workers)
    return downloaded


def _check_complete(chosen: list[RemoteFile], uri: StorageUri, dest: Path
                    ) -> list[dict[str, Any]]:
    """``{"path", "bytes"}`` of every chosen file; a missing or cut file is an error.

    Raises:
        SourceError: A file is missing, or its size differs from the listing's (the cut
            file is removed, so the re-run fetches it again).
    """
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
    return files


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
