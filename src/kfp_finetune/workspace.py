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

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kfp_finetune.errors import WorkspaceError

WORKSPACE_MOUNT = "/workspace"
MANIFEST = ".kfp-finetune.json"


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace (the PVC mount on a cluster, a folder locally)."""

    root: Path

    @classmethod
    def at(cls, root: str | Path) -> Workspace:
        """The workspace at ``root``, created if needed.

        Raises:
            WorkspaceError: ``root`` cannot be created or written.
        """
        path = Path(root).expanduser().resolve()
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
        """A new, empty staging folder on the same filesystem as the results."""
        path = self.root / ".staging" / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        return path


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The completion manifest of ``folder``, or None when the folder is not complete."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see either the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def install(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into ``staging`` last, then swap it into ``final``.

    The previous content of ``final`` (if any) is removed only after the new one is in place.
    """
    write_json_atomic(staging / MANIFEST, manifest)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}-old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(ws: Workspace, name: str) -> Iterator[Path]:
    """A staging folder that is removed if the block fails (or if it was not installed)."""
    path = ws.staging(name)
    try:
        yield path
    finally:
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)


def list_files(folder: Path) -> list[dict[str, Any]]:
    """Relative path and size of every file under ``folder``, except our own dot files."""
    entries = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            entries.append({"path": rel.as_posix(), "bytes": path.stat().st_size})
    return entries
