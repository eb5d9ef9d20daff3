"""The local backend (``file:///absolute/path`` or ``/absolute/path``).

A file or folder on a local or mounted filesystem, copied to a temporary name and renamed
when complete.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kfp_finetune.errors import SourceError
from kfp_finetune.storage.base import Listing, RemoteFile, digest
from kfp_finetune.storage.uris import StorageUri


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
