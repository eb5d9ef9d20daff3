"""Content fingerprints: what went into a step, decided from bytes, not from names.

The initializers record the sha256 of every file they install, together with the file's
stat (size, mtime, ctime) at the time it was hashed. A later check re-hashes a file only when
its stat differs, so a re-run's "already done" check costs one ``stat`` per file, yet an
in-place edit or a swapped file (even one whose mtime was restored: its ctime changes) is
noticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def hashed_records(folder: Path, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``files`` (``{"path", "bytes"}`` relative to ``folder``) with sha256 and stat added.

    Files are hashed in parallel threads (hashlib releases the GIL on large buffers), so
    the shards of a large model cost about one read of the biggest shard per core.
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(entry: dict[str, Any]) -> dict[str, Any]:
        path = folder / entry["path"]
        st = path.stat()
        return {**entry, "sha256": sha256_file(path), "stat": _stat_key(st)}

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(files), os.cpu_count() or 1))) as pool:
        return list(pool.map(one, files))


def current_sha256(path: Path, record: dict[str, Any] | None) -> str:
    """The sha256 of ``path``, taken from ``record`` when the file's stat still matches it."""
    st = path.stat()
    if record and record.get("sha256") and record.get("stat") == _stat_key(st):
        return str(record["sha256"])
    return sha256_file(path)


def records_intact(folder: Path, records: list[dict[str, Any]]) -> bool:
    """Whether every recorded file is still in ``folder`` with its size (and content).

    Records of an older manifest, without a sha256, are checked by size only.
    """
    try:
        for record in records:
            path = folder / record["path"]
            if path.stat().st_size != record["bytes"]:
                return False
            if record.get("sha256") and current_sha256(path, record) != record["sha256"]:
                return False
    except (OSError, KeyError, TypeError):
        return False
    return True


def folder_content(folder: Path, records: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """sha256 of every visible file under ``folder`` (relative path -> hex).

    Args:
        folder: The folder (dot files and dot folders are left out: manifests, caches).
        records: Cached hashes (a manifest's ``files``), used where the stat still matches.
    """
    cached = {r.get("path"): r for r in records or [] if isinstance(r, dict)}
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            out[rel.as_posix()] = current_sha256(path, cached.get(rel.as_posix()))
    return out


def digest_of(data: Any) -> str:
    """A short, stable sha256 of JSON-serialisable ``data``."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def folder_digest(folder: Path, manifest: dict[str, Any] | None) -> str:
    """Digest of the content of ``folder``, with ``manifest``'s hashes as the cache."""
    records = (manifest or {}).get("files")
    return digest_of(folder_content(folder, records if isinstance(records, list) else None))


def dataset_cache(cache_root: Path, dataset_dir: Path, manifest: dict[str, Any] | None) -> Path:
    """The ``datasets`` cache folder for the current content of ``dataset_dir``.

    ``datasets`` keys its cache of a local data file by the file's mtime alone
    (``datasets/data_files.py::_get_single_origin_metadata``: "for local we simply check
    mtime"), so a file replaced with its mtime kept would be read from a stale cache. The
    folder is therefore named after the content; caches of other content are removed.
    """
    from kfp_finetune.storage.ownership import remove_owned

    key = folder_digest(dataset_dir, manifest)
    if cache_root.is_dir():
        for other in cache_root.iterdir():
            if other.name != key:
                remove_owned(other)
    return cache_root / key
