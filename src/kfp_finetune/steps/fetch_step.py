"""What the two initializer steps share: fetch a source into the workspace once.

The steps themselves are ``steps.dataset_initializer`` and ``steps.model_initializer``.
Every step validates its parameters before it touches the network or the workspace, finds its
own finished work on a re-run and skips it, and never leaves half-written output that looks
finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.errors import WorkspaceError
from kfp_finetune.storage.base import RetryPolicy, digest
from kfp_finetune.storage.content import hashed_records, records_intact
from kfp_finetune.storage.fetch import fetch, remote_version
from kfp_finetune.storage.ownership import ensure_owned, remove_owned
from kfp_finetune.storage.selection import FetchOptions
from kfp_finetune.storage.uris import StorageUri
from kfp_finetune.storage.workspace import Workspace, install, read_manifest, workspace_lock

Log = Callable[[str], None]


def print_log(message: str) -> None:
    """The steps' default log: one line to stdout, flushed (the KFP task log)."""
    print(message, flush=True)


@dataclass(frozen=True)
class FetchSummary:
    """What an initializer fetched (shown as task outputs in the KFP UI)."""

    source: str
    files: int
    bytes: int
    seconds: float
    skipped: bool
    revision: str = ""

    def ui_metrics(self) -> dict[str, float]:
        """Figures for the KFP UI's Metrics view."""
        rate = self.bytes / 2**20 / self.seconds if self.seconds and not self.skipped else 0.0
        return {"files": self.files, "bytes": self.bytes, "seconds": self.seconds,
                "mib_per_s": round(rate, 2), "skipped": int(self.skipped)}


def fetch_once(
    ws: Workspace,
    uri: StorageUri,
    folder: Path,
    kind: str,
    log: Log,
    options: FetchOptions | None = None,
    retry: RetryPolicy | None = None,
) -> FetchSummary:
    """Fetch ``uri`` into ``folder`` once: skip finished work, resume interrupted work.

    The initializer steps' shared core.

    A folder whose manifest records the same source, options and (remote) version, and whose
    files still have their recorded content, is kept without any request for file content.
    A folder that kfp-finetune did not write (no manifest) is refused, never replaced.
    Otherwise the files go to a staging folder named after the source (so an interrupted run
    resumes there), the manifest is written last and the staging folder replaces ``folder``
    in one rename.
    """
    start = time.monotonic()
    opts = options or FetchOptions(kind=kind)
    policy = retry or RetryPolicy.from_env()
    key = digest([uri.describe(), opts.fingerprint()])
    ensure_owned(folder)  # before any download: a user's own model/ or dataset/ stays
    done = _complete_copy(uri, folder, kind, key, policy, log, start)
    if done is not None:
        return done
    log(f"[{kind}] fetching {uri.describe()} into {folder}")
    staging_root = ws.root / ".staging"
    locks = staging_root / ".locks"
    staging = staging_root / f"{kind}-{key[:16]}"
    # One writer per staging folder; the kernel frees the lock even after SIGKILL.
    with workspace_lock(locks, f"fetching {uri.describe()}", f"{staging.name}.lock"):
        try:
            result = fetch(uri, staging, opts, log=log, retry=policy)
        except BaseException:
            if uri.scheme == "file":
                remove_owned(staging)
            else:
                log(f"[{kind}] download stopped; finished files stay in {staging} and a re-run "
                    "resumes from there.")
            raise
        # Content hashes, cached with each file's stat: re-runs compare content, not names.
        files = hashed_records(staging, result.files)
        seconds = round(time.monotonic() - start, 3)
        total = sum(f["bytes"] for f in result.files)
        install(
            staging,
            folder,
            {"source": uri.describe(), "kind": kind, "scheme": uri.scheme,
             "requested_revision": uri.revision, "revision": result.revision,
             "version": result.version, "fetch_key": key, "options": opts.fingerprint(),
             "files": files, "bytes": total, "seconds": seconds,
             "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        )
    _remove_stale_staging(staging_root, kind)
    rate = total / seconds / 2**20 if seconds > 0 else 0.0
    log(f"[{kind}] fetched {len(result.files)} files, {total} bytes in {seconds:.1f} s "
        f"({result.downloaded} transferred now, {rate:.1f} MiB/s)"
        + (f", revision {result.revision}" if result.revision else ""))
    return FetchSummary(uri.describe(), len(result.files), total, seconds, False,
                        str(result.revision or result.version or ""))


def _remove_stale_staging(staging_root: Path, kind: str) -> None:
    """Remove staging folders of earlier sources of ``kind``.

    A folder that a process fetches into right now (it holds that folder's lock) is kept.
    """
    locks = staging_root / ".locks"
    for stale in staging_root.glob(f"{kind}-*"):
        try:
            with workspace_lock(locks, "removing a stale staging folder", f"{stale.name}.lock"):
                remove_owned(stale)
        except WorkspaceError:
            continue


def _complete_copy(
    uri: StorageUri, folder: Path, kind: str, key: str, policy: RetryPolicy, log: Log,
    start: float,
) -> FetchSummary | None:
    """The summary of a finished copy of ``uri`` in ``folder`` to keep, or None to fetch.

    Kept when the manifest records the same source and options, every file still has its
    recorded size and content, and the source's version (metadata only) is unchanged.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    if manifest.get("source") != uri.describe() or manifest.get("fetch_key") != key:
        log(f"[{kind}] {folder} holds {manifest.get('source')!r}; replacing it with "
            f"{uri.describe()}.")
        return None
    if not _files_intact(folder, manifest):
        log(f"[{kind}] a file in {folder} was changed or removed since it was fetched; "
            "fetching it again.")
        return None
    current = remote_version(uri, kind, policy, log)
    if current is not None and current != manifest.get("version"):
        log(f"[{kind}] {uri.describe()} changed since it was fetched; fetching it again.")
        return None
    files = manifest.get("files", [])
    revision = manifest.get("revision") or manifest.get("version")
    log(f"[{kind}] {uri.describe()} is already complete in {folder} (revision {revision}); "
        "skipping the download.")
    return FetchSummary(uri.describe(), len(files), sum(f["bytes"] for f in files),
                        round(time.monotonic() - start, 3), True, str(revision or ""))


def _files_intact(folder: Path, manifest: dict[str, Any]) -> bool:
    """Whether every file of the manifest is still there with its recorded size and content."""
    files = manifest.get("files", [])
    return isinstance(files, list) and records_intact(folder, files)
