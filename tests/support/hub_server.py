"""A minimal Hugging Face Hub-compatible server for tests and benchmarks (127.0.0.1 only).

It serves what ``huggingface_hub`` (2.x) uses to download a repository: ``repo_info``
(``/api/{models,datasets}/{repo}[/revision/{rev}]``), the tree listing
(``/api/.../tree/{rev}[/{path}]``), ``paths-info`` and ``HEAD``/``GET`` on
``/[datasets/]{repo}/resolve/{rev}/{path}`` with ETag, ``X-Repo-Commit``, ``Content-Length`` and
``Range`` support. Errors carry ``X-Error-Code`` as the Hub's do, so the real client raises
``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError`` and
``GatedRepoError``.

Faults for tests: a file's ``GET`` can fail with an HTTP status a number of times, be cut
after N bytes (connection closed mid-file), or stall after N bytes until released. Every
request is recorded, so tests can assert that a re-run sends no request for file content.

Why not an existing package: ``olah`` is a caching mirror that needs the real Hub upstream;
``hf-local-hub`` (PyPI) is a client for a separate server binary. Neither can inject faults.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

CHUNK = 1 << 20


@dataclass
class Blob:
    """One file's content (in memory or on disk) and its ids."""

    data: bytes | Path
    size: int
    oid: str

    @classmethod
    def of(cls, data: bytes | Path) -> Blob:
        if isinstance(data, Path):
            size = data.stat().st_size
            h = hashlib.sha1(f"blob {size}\0".encode())
            with data.open("rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    h.update(chunk)
            return cls(data, size, h.hexdigest())
        return cls(data, len(data), hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest())

    def read(self, start: int, end: int) -> Any:
        """Yield the bytes [start, end)."""
        if isinstance(self.data, bytes):
            yield self.data[start:end]
            return
        with self.data.open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk


@dataclass
class Repo:
    """A repository: commits (sha -> files) and refs (branch or tag -> sha)."""

    repo_type: str
    repo_id: str
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False


@dataclass
class Request:
    """One request as the server saw it."""

    method: str
    path: str
    range: str | None
    authorized: bool
    status: int = 0


class HubServer:
    """The server; use as a context manager (starts on 127.0.0.1, port chosen by the OS)."""

    def __init__(self, tokens: tuple[str, ...] = ()) -> None:
        self.tokens = set(tokens)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[Request] = []
        self.fail_get: dict[str, list[int]] = {}
        self.cut_get: dict[str, list[int]] = {}
        self.stall_get: dict[str, tuple[int, threading.Event]] = {}
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content ---------------------------------------------------------------------------
    def add_commit(
        self,
        repo_type: str,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        branch: str = "main",
        tags: tuple[str, ...] = (),
        gated: bool = False,
        private: bool = False,
    ) -> str:
        """Add (or extend) a repository with a new commit on ``branch``; return its sha."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_type, repo_id))
        repo.gated = repo.gated or gated
        repo.private = repo.private or private
        self._counter += 1
        blobs = {path: Blob.of(data) for path, data in files.items()}
        sha = hashlib.sha1(
            f"{repo_id}:{self._counter}:{sorted((p, b.oid) for p, b in blobs.items())}".encode()
        ).hexdigest()
        repo.commits[sha] = blobs
        repo.refs[branch] = sha
        for tag in tags:
            repo.refs[tag] = sha
        return sha

    # -- faults and records ----------------------------------------------------------------
    def fail(self, path: str, status: int = 500, times: int = 1) -> None:
        """Answer the next ``times`` GETs of ``path`` (repo file path) with ``status``."""
        self.fail_get[path] = [status, times]

    def cut(self, path: str, after: int, times: int = 1) -> None:
        """Close the connection after ``after`` bytes of the next ``times`` GETs of ``path``."""
        self.cut_get[path] = [after, times]

    def stall(self, path: str, after: int) -> threading.Event:
        """Send ``after`` bytes of ``path`` then wait until the returned event is set."""
        event = threading.Event()
        self.stall_get[path] = (after, event)
        return event

    def content_requests(self, path: str | None = None) -> list[Request]:
        """HEAD and GET requests on ``/resolve/`` (optionally for one file path)."""
        with self._lock:
            reqs = [r for r in self.requests if "/resolve/" in r.path]
        if path is not None:
            reqs = [r for r in reqs if r.path.endswith("/" + path)]
        return reqs

    def reset_requests(self) -> None:
        """Forget the recorded requests."""
        with self._lock:
            self.requests.clear()

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:<port>``)."""
        assert self._httpd is not None
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Start serving in a daemon thread."""
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port (bounded in time)."""
        for _, event in self.stall_get.values():
            event.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        return None

    # -- helpers ---------------------------------------------------------------------------
    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in self.hub.tokens

    def _record(self, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append(Request(
                self.command, urlsplit(self.path).path, self.headers.get("Range"),
                self._authorized(), status,
            ))

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _repo(self, repo_type: str, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._authorized()):
            self._error(401 if not self._authorized() else 404, "RepoNotFound",
                        "Repository not found")
            return None
        return repo

    def _commit(self, repo: Repo, rev: str) -> str | None:
        rev = unquote(rev)
        if rev in repo.commits:
            return rev
        if rev in repo.refs:
            return repo.refs[rev]
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    # -- routes ----------------------------------------------------------------------------
    def do_HEAD(self) -> None:  # noqa: N802 - stdlib name
        self._route()

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self._route()

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        self._route()

    def _route(self) -> None:
        try:
            parts = urlsplit(self.path)
            segs = parts.path.strip("/").split("/")
            if segs[0] == "api" and len(segs) >= 4 and segs[1] in ("models", "datasets"):
                self._api(segs[1][:-1], f"{segs[2]}/{segs[3]}", segs[4:], parts.query)
                return
            repo_type = "model"
            if segs[0] == "datasets":
                repo_type, segs = "dataset", segs[1:]
            if len(segs) >= 5 and segs[2] == "resolve":
                self._resolve(repo_type, f"{segs[0]}/{segs[1]}", segs[3],
                              unquote("/".join(segs[4:])))
                return
            self._error(404, None, f"no route for {parts.path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _api(self, repo_type: str, repo_id: str, rest: list[str], query: str) -> None:
        if self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode()
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        if not rest or rest[0] == "revision":
            sha = self._commit(repo, rest[1] if len(rest) > 1 else "main")
            if sha is None:
                return
            info = {
                "id": repo_id, "sha": sha, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.commits[sha])],
                "tags": [], "downloads": 0, "likes": 0,
            }
            self._send(200, json.dumps(info).encode())
            return
        if rest[0] == "tree" and len(rest) >= 2:
            sha = self._commit(repo, rest[1])
            if sha is None:
                return
            prefix = unquote("/".join(rest[2:]))
            recursive = parse_qs(query).get("recursive", ["false"])[0].lower() == "true"
            entries = self._tree(repo.commits[sha], prefix, recursive)
            if entries is None:
                self._error(404, "EntryNotFound", f"{prefix} does not exist on {rest[1]}")
                return
            self._send(200, json.dumps(entries).encode())
            return
        if rest[0] == "paths-info" and len(rest) >= 2 and self.command == "POST":
            sha = self._commit(repo, rest[1])
            if sha is None:
                return
            files = repo.commits[sha]
            out = []
            for path in parse_qs(body).get("paths", []):
                path = path.strip("/")
                if path in files:
                    out.append(_file_entry(path, files[path]))
                elif any(p.startswith(path + "/") for p in files):
                    out.append(_dir_entry(path))
            self._send(200, json.dumps(out).encode())
            return
        self._error(404, None, "unknown api route")

    @staticmethod
    def _tree(files: dict[str, Blob], prefix: str, recursive: bool) -> list[dict] | None:
        base = f"{prefix}/" if prefix else ""
        under = {p: b for p, b in files.items() if p.startswith(base)}
        if prefix and not under:
            return None
        out: list[dict] = []
        dirs: set[str] = set()
        for path, blob in sorted(under.items()):
            rel = path[len(base):]
            if "/" in rel:
                parts = rel.split("/")
                for i in range(1, len(parts) if recursive else 2):
                    dirs.add(base + "/".join(parts[:i]))
                if not recursive:
                    continue
            out.append(_file_entry(path, blob))
        out.extend(_dir_entry(d) for d in sorted(dirs))
        return out

    def _resolve(self, repo_type: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_type, repo_id)
        if repo is None:
            return
        sha = self._commit(repo, rev)
        if sha is None:
            return
        if repo.gated and not self._authorized():
            status = 403 if self.headers.get("Authorization") else 401
            self._error(status, "GatedRepo",
                        f"Access to {repo_type} {repo_id} is restricted. You must have access "
                        "to it and be authenticated to access it. Please log in.")
            return
        blob = repo.commits[sha].get(path)
        if blob is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on {rev}",)
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{blob.oid}"', "Accept-Ranges": "bytes"}
        if self.command == "HEAD":
            self._record(200)
            self.send_response(200)
            self.send_header("Content-Length", str(blob.size))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return
        fail = self.hub.fail_get.get(path)
        if fail and fail[1] > 0:
            fail[1] -= 1
            self._error(fail[0], None, "injected failure")
            return
        start, end = 0, blob.size
        status = 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else blob.size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        self._record(status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        limit = None
        cut = self.hub.cut_get.get(path)
        if cut and cut[1] > 0:
            cut[1] -= 1
            limit = cut[0]
        stall = self.hub.stall_get.pop(path, None)
        if stall is not None:
            limit = stall[0]
        sent = 0
        for chunk in blob.read(start, end):
            if limit is not None and sent + len(chunk) >= limit:
                self.wfile.write(chunk[: limit - sent])
                self.wfile.flush()
                if stall is not None:
                    self.hub.stalled.set()
                    stall[1].wait(timeout=30)
                self.close_connection = True
                time.sleep(0.01)
                return
            self.wfile.write(chunk)
            sent += len(chunk)


def _file_entry(path: str, blob: Blob) -> dict[str, Any]:
    return {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}


def _dir_entry(path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0,
            "path": path}
