"""What every storage backend shares: file listings, the backend protocol and retries.

The backends (``storage.hf``, ``storage.s3``, ``storage.local``) and the fetch loop
(``storage.fetch``) all import from here, so none of them imports another.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from kfp_finetune.errors import SourceError
from kfp_finetune.storage.credentials import redact

Log = Callable[[str], None]
T = TypeVar("T")


def quiet(*_: Any) -> None:
    """A log that drops every line."""
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


def digest(items: Iterable[Any]) -> str:
    """A short, stable digest of JSON-serialisable items (used as a version)."""
    data = json.dumps(list(items), sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:32]
