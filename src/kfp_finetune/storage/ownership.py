"""What kfp-finetune may treat as its own: which folders are workspaces, what may be deleted.

Two rules keep a user's files safe:

* a folder becomes a workspace only when it is empty (a fresh volume) or already one: it
  carries the marker file :data:`WORKSPACE_MARKER`, or an older version's layout with its
  manifests; any other non-empty folder (a home directory, a project folder, the current
  directory reached through an empty ``--workspace ''``) is refused with its path named;
* a file or folder is removed or replaced only when a proof says that kfp-finetune wrote it:
  its completion manifest (or the fine-tune step's run record), or its place in the
  workspace's own ``.staging``/``.cache`` areas. Anything else in the way is refused.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kfp_finetune.errors import WorkspaceError

MANIFEST = ".kfp-finetune.json"
WORKSPACE_MARKER = ".kfp-finetune-workspace.json"
# Folders that only kfp-finetune writes: everything under them is its own by place.
OWN_AREAS = (".staging", ".cache")
# Entries of a workspace's root that an older version (without the marker) wrote.
_LAYOUT = {"dataset", "model", "output", ".staging", ".cache", ".kfp-local-outputs"}
# Entries a fresh volume may hold before anything is written (ext4's lost+found).
_FRESH_VOLUME = {"lost+found"}


def check_workspace_path(value: object, what: str = "workspace") -> Path:
    """The absolute path of a workspace argument, refusing values that name no folder.

    Args:
        value: The value given (``--workspace``, ``workspace=``, ``workspace_path``).
        what: The argument's name, for the message.

    Raises:
        WorkspaceError: The value is empty, not a path, or the filesystem root.
    """
    if not isinstance(value, (str, os.PathLike)) or not str(os.fspath(value)).strip():
        raise WorkspaceError(
            f"{what}={value!r} names no folder (an empty path would mean the current directory,"
            " whose files kfp-finetune must never replace); pass the folder to use as the "
            "workspace volume, e.g. --workspace ./kfp-finetune-workspace (on a cluster: "
            "/workspace)."
        )
    text = str(os.fspath(value))
    if "\0" in text:
        raise WorkspaceError(f"{what}={text!r} contains a NUL character; pass a plain path.")
    path = Path(text).expanduser().resolve()
    if path == Path(path.anchor):
        raise WorkspaceError(
            f"{what}={text!r} resolves to the filesystem root {str(path)!r}; pass a folder of "
            "its own, e.g. --workspace ./kfp-finetune-workspace (on a cluster: /workspace)."
        )
    return path


def _has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def _older_workspace(root: Path, names: set[str]) -> bool:
    """Whether ``root`` holds only an older version's layout, with at least one manifest.

    A layout of only our own dot folders (an attempt killed before anything was finished)
    counts too; a bare ``model/`` or ``dataset/`` without a manifest does not.
    """
    if not names <= _LAYOUT:
        return False
    if all(name.startswith(".") for name in names):
        return True
    folders = [root / "dataset", root / "model", root / "output" / "checkpoints"]
    if (root / "output").is_dir():
        folders += [p for p in (root / "output").iterdir() if p.is_dir()]
    return any(_has_manifest(f) for f in folders)


def adoptable(root: Path) -> bool:
    """Whether ``root`` may be used as a workspace without its marker being there yet.

    True for an empty folder (or one with only ``lost+found`` or our own lock/marker files)
    and for an older version's workspace.
    """
    names = {p.name for p in root.iterdir()} - _FRESH_VOLUME
    # Our own lock and marker files (and a marker being written by a parallel step).
    names = {n for n in names if not n.lstrip(".").startswith("kfp-finetune")}
    return not names or _older_workspace(root, names)


def refuse_foreign(root: Path) -> None:
    """Refuse ``root`` as a workspace unless it is one (marker) or may become one.

    Raises:
        WorkspaceError: ``root`` is a non-empty folder kfp-finetune did not create.
    """
    if (root / WORKSPACE_MARKER).is_file() or adoptable(root):
        return
    shown = sorted(p.name for p in root.iterdir())[:8]
    raise WorkspaceError(
        f"workspace {str(root)!r} is a non-empty folder that kfp-finetune did not create (it "
        f"holds {', '.join(shown)}{', ...' if len(shown) == 8 else ''} and no "
        f"{WORKSPACE_MARKER}); a workspace's model/, dataset/ and output/ are replaced by the "
        "steps, so a folder of yours is never used as one. Pass a new or empty folder with "
        "--workspace DIR (API: workspace=...), or the folder of an earlier kfp-finetune run."
    )


def marker_content() -> dict[str, object]:
    """What the workspace marker records."""
    from kfp_finetune.version import __version__

    return {"created_by": "kfp-finetune", "version": __version__, "layout": 1}


def in_own_area(path: Path) -> bool:
    """Whether ``path`` lies in a workspace's ``.staging`` or ``.cache`` folder.

    The folder counts only where its parent carries the workspace marker, so a user's
    ``~/.cache`` is never taken for ours.
    """
    path = Path(os.path.abspath(path))
    return any(
        area.name in OWN_AREAS and (area.parent / WORKSPACE_MARKER).is_file()
        for area in (path, *path.parents)
    )


def owned(path: Path, proofs: tuple[str, ...] = (MANIFEST,)) -> bool:
    """Whether kfp-finetune can prove it wrote ``path`` (so it may remove or replace it).

    Proof is one of: ``path`` does not exist; it lies in the workspace's ``.staging`` or
    ``.cache`` folder (:func:`in_own_area`); it is a folder holding one of ``proofs`` (its
    completion manifest by default); it is an empty folder.
    """
    if not os.path.lexists(path):
        return True
    if in_own_area(path):
        return True
    if path.is_dir() and not path.is_symlink():
        return any((path / proof).is_file() for proof in proofs) or not any(path.iterdir())
    return False


def ensure_owned(path: Path, proofs: tuple[str, ...] = (MANIFEST,), action: str = "replace"
                 ) -> None:
    """Refuse to go on when ``path`` exists and kfp-finetune cannot prove it wrote it.

    Raises:
        WorkspaceError: Naming the path, why it is kept and how to go on.
    """
    if owned(path, proofs):
        return
    raise WorkspaceError(
        f"{str(path)!r} exists but kfp-finetune did not write it (it has no {proofs[0]}); "
        f"it would {action} it, so nothing was changed. Move it elsewhere (it may be your own "
        "data or model), or use another workspace (--workspace DIR)."
    )


def remove_owned(path: Path, proofs: tuple[str, ...] = (MANIFEST,)) -> None:
    """Delete ``path`` (file or folder) only when :func:`owned` proves it is ours.

    The single way the project deletes anything in a workspace.

    Raises:
        WorkspaceError: ``path`` is not provably ours (nothing is deleted).
    """
    ensure_owned(path, proofs, "delete")
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)
