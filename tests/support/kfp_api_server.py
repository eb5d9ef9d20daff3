"""A stand-in for the KFP API server on 127.0.0.1 that records the calls it receives.

It answers the v2beta1 REST endpoints that ``kfp.Client`` uses to upload pipelines and
versions, report the backend's release (healthz), find and create experiments, start runs,
create recurring runs and read a run's state, with the JSON shapes of ``kfp_server_api``; it
keeps what was created in memory so a second submission sees the first one's pipeline. Nothing
is executed.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PREFIX = "/apis/v2beta1"
NOW = "2025-01-01T00:00:00Z"


@dataclass
class Call:
    """One request: method, path, query, and the JSON body or the uploaded files."""

    method: str
    path: str
    query: dict[str, str]
    json: Any = None
    files: dict[str, bytes] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names


@dataclass
class State:
    """What the fake server holds."""

    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    recurring_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # States a GET of a run reports, one per GET; the last one repeats.
    run_states: list[str] = field(default_factory=lambda: ["SUCCEEDED"])
    # What healthz reports as the backend's release (the API server's TAG_NAME; "unknown"
    # when unset, as backend/src/apiserver/main.go newHealthzResponse does).
    tag_name: str = "2.17.0"


def _filter_name(query: dict[str, str]) -> str | None:
    if "filter" not in query:
        return None
    predicates = json.loads(query["filter"]).get("predicates", [])
    for pred in predicates:
        if pred.get("key") in ("display_name", "name"):
            return pred.get("string_value", pred.get("stringValue"))
    return None


class FakeKfpApi:
    """The server: ``with FakeKfpApi() as api: kfp.Client(host=api.url)``; ``api.calls``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.state = State()
        self._lock = threading.Lock()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _handle(self, method: str) -> None:
                parsed = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                call = Call(method, parsed.path, query,
                            headers={k.lower(): v for k, v in self.headers.items()})
                ctype = self.headers.get("Content-Type", "")
                if ctype.startswith("multipart/form-data"):
                    msg = message_from_bytes(
                        b"Content-Type: " + ctype.encode() + b"\r\n\r\n" + body)
                    for part in msg.get_payload():
                        name = part.get_param("name", header="content-disposition")
                        call.files[str(name)] = part.get_payload(decode=True)
                elif body:
                    call.json = json.loads(body)
                with api._lock:
                    api.calls.append(call)
                    status, payload = api.route(call)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234``."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKfpApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def find(self, method: str, path_re: str) -> list[Call]:
        """The recorded calls whose method matches and whose path matches the regex."""
        return [c for c in self.calls if c.method == method and re.fullmatch(path_re, c.path)]

    # ------------------------------------------------------------------ routing

    def _new_version(self, pipeline_id: str, name: str, spec: bytes) -> dict[str, Any]:
        import yaml

        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "display_name": name,
            "created_at": NOW,
            "pipeline_spec": next(yaml.safe_load_all(spec)),
        }
        # Newest first, as "created_at desc" asks.
        self.state.versions.setdefault(pipeline_id, []).insert(0, version)
        return version

    def route(self, call: Call) -> tuple[int, Any]:  # noqa: C901 - one branch per endpoint
        """Answer one call with ``(status, JSON)``."""
        s, q, path = self.state, call.query, call.path
        if not path.startswith(PREFIX):
            return 404, {"error": f"unknown path {path}"}
        path = path[len(PREFIX):]
        if call.method == "GET" and path == "/healthz":
            # The JSON of backend/src/apiserver/main.go healthzResponse (2.17.0).
            return 200, {"commit_sha": "0123abc", "tag_name": s.tag_name, "multi_user": False,
                         "pipeline_store": "database"}
        if call.method == "GET" and path == "/pipelines":
            name = _filter_name(q)
            found = [p for p in s.pipelines.values() if name is None or p["display_name"] == name]
            return 200, ({"pipelines": found, "total_size": len(found)} if found else {})
        if call.method == "POST" and path == "/pipelines/upload":
            pid = str(uuid.uuid4())
            pipeline = {"pipeline_id": pid, "display_name": q.get("name"),
                        "description": q.get("description"), "created_at": NOW}
            s.pipelines[pid] = pipeline
            self._new_version(pid, str(q.get("name")), call.files["uploadfile"])
            return 200, pipeline
        if call.method == "POST" and path == "/pipelines/upload_version":
            pid = q.get("pipelineid", "")
            if pid not in s.pipelines:
                return 404, {"error": f"pipeline {pid} not found"}
            version = self._new_version(pid, str(q.get("name")), call.files["uploadfile"])
            return 200, {k: v for k, v in version.items() if k != "pipeline_spec"}
        m = re.fullmatch(r"/pipelines/([^/]+)/versions", path)
        if call.method == "GET" and m:
            name = _filter_name(q)
            found = [{k: v for k, v in ver.items() if k != "pipeline_spec"}
                     for ver in s.versions.get(m.group(1), [])
                     if name is None or ver["display_name"] == name]
            size = int(q.get("page_size") or 0) or len(found)
            return 200, ({"pipeline_versions": found[:size], "total_size": len(found)}
                         if found else {})
        if call.method == "GET" and path == "/experiments":
            name = _filter_name(q)
            found = [e for e in s.experiments.values()
                     if name is None or e["display_name"] == name]
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if call.method == "POST" and path == "/experiments":
            exp = dict(call.json, experiment_id=str(uuid.uuid4()), created_at=NOW)
            s.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if call.method == "POST" and path == "/runs":
            run = dict(call.json, run_id=str(uuid.uuid4()), state="PENDING", created_at=NOW)
            s.runs[run["run_id"]] = run
            return 200, run
        m = re.fullmatch(r"/runs/([^/:]+)", path)
        if call.method == "GET" and m:
            if m.group(1) not in s.runs:
                return 404, {"error": "run not found"}
            state = s.run_states.pop(0) if len(s.run_states) > 1 else s.run_states[0]
            s.runs[m.group(1)]["state"] = state
            return 200, s.runs[m.group(1)]
        if call.method == "POST" and path == "/recurringruns":
            rr = dict(call.json, recurring_run_id=str(uuid.uuid4()), status="ENABLED",
                      created_at=NOW)
            s.recurring_runs[rr["recurring_run_id"]] = rr
            return 200, rr
        return 404, {"error": f"no fake for {call.method} {call.path}"}


# ---------------------------------------------------------------------------------------------
# Runs as the TrainerClient's cluster backend sees them (test_trainer_client_kfp.py):
# listing and reading runs with their task details as stored (no scripted states), terminating
# and deleting runs, reading a pipeline, listing and deleting recurring runs.


class LiveKfpApi(FakeKfpApi):
    """``FakeKfpApi`` whose runs keep the state and tasks a test gives them (:meth:`set_run`)."""

    def set_run(self, run_id: str, state: str, tasks: dict[str, str] | None = None,
                error: str | None = None) -> None:
        """Set a run's state, its tasks (Argo node display name -> state) and its error."""
        with self._lock:
            run = self.state.runs[run_id]
            run["state"] = state
            run["state_history"] = [{"update_time": NOW, "state": state}]
            run["run_details"] = {"task_details": [
                {"run_id": run_id, "task_id": str(uuid.uuid4()), "display_name": name,
                 "state": task_state} for name, task_state in (tasks or {}).items()]}
            if error:
                run["error"] = {"code": 9, "message": error}

    def route(self, call: Call) -> tuple[int, Any]:
        """Answer the run, pipeline and recurring-run reads; the rest as FakeKfpApi does."""
        s, path = self.state, call.path[len(PREFIX):]
        if call.method == "GET" and path == "/runs":
            name = _filter_name(call.query)
            found = [r for r in s.runs.values() if name is None or r["display_name"] == name]
            return 200, ({"runs": found, "total_size": len(found)} if found else {})
        m = re.fullmatch(r"/runs/([^/:]+)(:terminate)?", path)
        if m and m.group(1) not in s.runs:
            return 404, {"error": "run not found"}
        if call.method == "GET" and m and not m.group(2):
            return 200, s.runs[m.group(1)]
        if call.method == "POST" and m and m.group(2):
            s.runs[m.group(1)]["state"] = "CANCELED"
            return 200, {}
        if call.method == "DELETE" and m and not m.group(2):
            del s.runs[m.group(1)]
            return 200, {}
        m = re.fullmatch(r"/pipelines/([^/]+)", path)
        if call.method == "GET" and m and m.group(1) in s.pipelines:
            return 200, s.pipelines[m.group(1)]
        if call.method == "GET" and path == "/recurringruns":
            found = list(s.recurring_runs.values())
            return 200, ({"recurringRuns": found, "total_size": len(found)} if found else {})
        m = re.fullmatch(r"/recurringruns/([^/]+)", path)
        if call.method == "DELETE" and m:
            return (200, {}) if s.recurring_runs.pop(m.group(1), None) else (404, {})
        return super().route(call)
