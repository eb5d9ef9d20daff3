"""The shared workspace layout and the all-or-nothing way steps write into it.

Layout (the seed's ``/workspace``)::

    /workspace/dataset/                 dataset files + .kfp-finetune.json (completion manifest)
    /workspace/model/                   base model files + .kfp-finetune.json
    /workspace/output/checkpoints/      torchtune output_dir: epoch_N/, logs/, torchtune_config.yaml
    /workspace/output/<name>/           the exported fine-tuned model
    /workspace/.staging/                work in progress, never read as a result

A step downloads or writes into ``.staging``, writes its manifest last, then renames the whole
folder into place; a folder without a manifest is never taken as finished work.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.errors import WorkspaceError
from kfp_finetune.storage.ownership import (
    MANIFEST,
    WORKSPACE_MARKER,
    check_workspace_path,
    ensure_owned,
    marker_content,
    refuse_foreign,
    remove_owned,
)

WORKSPACE_MOUNT = "/workspace"
LOCK_FILE = ".kfp-finetune.lock"
# Errors of a full or read-only volume: translated into a WorkspaceError that names the path.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace (the PVC mount on a cluster, a folder locally)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path, adopt: bool = True) -> Workspace:
        """The workspace at ``root``, created if needed.

        An empty (or new) folder is adopted: the marker file ``.kfp-finetune-workspace.json``
        is written into it (unless ``adopt`` is False: check only). A non-empty folder that
        is not a workspace is refused.

        Raises:
            WorkspaceError: ``root`` is empty, the filesystem root, a folder kfp-finetune did
                not create, or cannot be created or written.
        """
        path = check_workspace_path(root)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(
                f"workspace {str(path)!r} cannot be created ({exc.strerror}); mount the volume "
                "there or pass a writable folder with --workspace."
            ) from None
        if not os.access(path, os.W_OK):
            raise WorkspaceError(
                f"workspace {str(path)!r} is not writable; mount the volume read-write or pass a "
                "writable folder with --workspace."
            )
        refuse_foreign(path)
        if adopt and not (path / WORKSPACE_MARKER).is_file():
            write_json_atomic(path / WORKSPACE_MARKER, marker_content())
        return cls(path)

    @property
    def dataset_dir(self) -> Path:
        """Folder of the dataset files."""
        return self.root / "dataset"

    @property
    def model_dir(self) -> Path:
        """Folder of the base model."""
        return self.root / "model"

    @property
    def output_dir(self) -> Path:
        """Folder of every output (the seed's ``/workspace/output``)."""
        return self.root / "output"

    @property
    def checkpoints_dir(self) -> Path:
        """Torchtune's ``output_dir``."""
        return self.output_dir / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        """Caches (``datasets`` arrow files) that may be deleted at any time."""
        return self.root / ".cache"

    def staging(self, name: str) -> Path:
        """A new, empty staging folder on the same filesystem as the results.

        Leftovers of the same name (an attempt killed before it could clean up) are removed
        first; only one step writes a given result at a time.
        """
        root = self.root / ".staging"
        for leftover in root.glob(f"{name}-*"):
            if re.fullmatch(re.escape(name) + r"-[0-9a-f]{8}", leftover.name):
                remove_owned(leftover)
        path = root / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The completion manifest of ``folder``, or None when the folder is not complete."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def require_complete(folder: Path, step: str) -> dict[str, Any]:
    """The completion manifest of ``folder``.

    Raises:
        WorkspaceError: The step that fills ``folder`` has not finished.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        raise WorkspaceError(
            f"{str(folder)!r} has no finished {step} output; run the {step} step first (on a "
            "cluster: check that every task mounts the same workspace volume)."
        )
    return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old file or the whole new one.

    Raises:
        WorkspaceError: The volume is full or read-only (the temporary file is removed).
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with disk_errors(path, f"writing {path.name}"):
        try:
            tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def install(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into ``staging`` last, then swap it into ``final``.

    The previous content of ``final`` (if any) is removed only after the new one is in place,
    and only when its manifest proves that kfp-finetune wrote it.

    Raises:
        WorkspaceError: ``final`` holds something kfp-finetune did not write, or the volume
            is full or read-only; ``final`` is left as it was.
    """
    ensure_owned(final)
    write_json_atomic(staging / MANIFEST, manifest)
    old = None
    with disk_errors(final, f"installing {final.name}"):
        if final.exists():
            old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
    if old is not None:
        remove_owned(old)


@contextmanager
def staged(ws: Workspace, name: str) -> Iterator[Path]:
    """A staging folder that is removed if the block fails (or if it was not installed)."""
    path = ws.staging(name)
    try:
        yield path
    finally:
        if path.exists():
            remove_owned(path)


def list_files(folder: Path) -> list[dict[str, Any]]:
    """Relative path and size of every file under ``folder``, except our own dot files."""
    entries = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            entries.append({"path": rel.as_posix(), "bytes": path.stat().st_size})
    return entries


# --------------------------------------------------------------------------- disk space


def _human(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} bytes" if unit == "bytes" else f"{value:.1f} {unit} ({n} bytes)"
        value /= 1024
    return f"{n} bytes"  # pragma: no cover


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (what ``disk_usage`` can measure)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: str | Path) -> int:
    """Bytes free for writing on the filesystem that holds ``path`` (or would hold it)."""
    return shutil.disk_usage(_existing(Path(path))).free


def tree_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.exists() else 0


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes under ``path`` when the volume has less free.

    Args:
        path: Where the bytes will be written (it need not exist yet).
        needed: Bytes the step is about to write.
        what: What is written, for the message (e.g. ``"the model hf://org/repo"``).

    Raises:
        WorkspaceError: Not enough space; the message names the path, the bytes needed and
            the bytes available, and how to fix it.
    """
    if needed <= 0:
        return
    available = free_bytes(path)
    if available < needed:
        raise WorkspaceError(
            f"not enough space for {what} in {str(path)!r}: {_human(needed)} needed, "
            f"{_human(available)} available. Free space on the workspace volume or make it "
            "larger (pipeline parameter workspace_pvc_size; locally: another --workspace), then "
            "re-run; nothing was marked complete."
        )


def disk_error(exc: BaseException, path: str | Path, what: str) -> WorkspaceError | None:
    """The WorkspaceError for a full or read-only volume, or None for any other error.

    Args:
        exc: The exception raised while writing.
        path: Where the step was writing.
        what: What it was writing, for the message.
    """
    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    where = str(path)  # the folder written to (an OSError may name the source file instead)
    if exc.errno in _NO_SPACE:
        try:
            available = _human(free_bytes(path))
        except OSError:
            available = "unknown"
        return WorkspaceError(
            f"no space left on the workspace volume while {what} ({where!r}; "
            f"{available} available). Free space or make the volume larger (pipeline "
            "parameter workspace_pvc_size; locally: another --workspace), then re-run: the "
            "unfinished output is not marked complete and is replaced."
        )
    if exc.errno in _READ_ONLY:
        return WorkspaceError(
            f"the workspace is read-only or not writable while {what} ({where!r}: "
            f"{os.strerror(exc.errno)}); mount the volume read-write (locally: pass a "
            "writable --workspace), then re-run."
        )
    return None


@contextmanager
def disk_errors(path: str | Path, what: str) -> Iterator[None]:
    """Turn ENOSPC/EDQUOT/EROFS/EACCES raised in the block into a WorkspaceError.

    Args:
        path: Where the block writes (named in the message).
        what: What it writes, for the message (``"downloading the model"``).
    """
    try:
        yield
    except OSError as exc:
        translated = disk_error(exc, path, what)
        if translated is None:
            raise
        raise translated from None


# --------------------------------------------------------------------------- run lock


@contextmanager
def workspace_lock(
    root: str | Path, purpose: str = "a run", lock_name: str = LOCK_FILE
) -> Iterator[Path]:
    """Hold the workspace's exclusive lock for the duration of the block.

    The lock is an ``flock`` on ``<root>/<lock_name>``: the kernel releases it when the holder
    exits, even after SIGKILL, so a killed run never leaves a stale lock behind. The file
    records who holds it (pid, host, start time, purpose) for the message of the next comer.

    Args:
        root: Workspace root (created if needed).
        purpose: What holds the lock, e.g. ``"kfp-finetune run --local"``.
        lock_name: Lock file name (one per kind of exclusive work).

    Yields:
        The lock file path.

    Raises:
        WorkspaceError: Another process holds the lock; the message names it and the fix.
    """
    import fcntl

    root = Path(root)
    with disk_errors(root, "creating the workspace lock"):
        root.mkdir(parents=True, exist_ok=True)
        handle = open(root / lock_name, "a+")  # closed in the finally below
    path = root / lock_name
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            who = ", ".join(
                f"{k} {holder[k]}" for k in ("purpose", "pid", "host", "started") if k in holder
            )
            raise WorkspaceError(
                f"workspace {str(root)!r} is in use by another process ({who or 'unknown'}; "
                f"lock {str(path)!r}); two runs on one workspace would overwrite each other's "
                "files. Wait for it to finish, or give this run another workspace "
                "(--workspace DIR)."
            ) from None
        info = {"purpose": purpose, "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(info) + "\n")
            handle.flush()
        except OSError:
            pass  # the lock holds even if its note cannot be written (full volume)
        yield path
    finally:
        handle.close()  # releases the flock
