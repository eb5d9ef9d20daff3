"""A stand-in for the Kubeflow Model Registry's REST API on 127.0.0.1.

It answers the ``/api/model_registry/v1alpha3`` endpoints that ``model_registry.ModelRegistry``
calls to register a model and read it back (list and find registered models, create a
registered model, find and create model versions, upsert and find model artifacts). Request
bodies are validated with the client package's own generated OpenAPI models (``mr_openapi``),
and answers are built to the same schemas, so a body the real server's schema refuses is
refused here too (HTTP 400). Rules of the real server kept here (api/openapi/model-registry.yaml
in kubeflow/model-registry): a find that matches nothing is 404; a registered model name is
unique (409), and so is a version name within its registered model. It keeps what was created
in memory and records every call. Test controls: ``token`` (a bearer token every call must
carry, else 401), ``refuse`` (answer 503 to everything), ``hang`` (never answer until the test
ends), ``fail_once`` (answer 500 once to the first call matching (method, path regex)).
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from kfp_finetune.steps.register_model import api_prefix

# The prefix the installed client calls (v1alpha3 up to model-registry 0.3.14, v1 after).
PREFIX = api_prefix()


@dataclass
class Call:
    """One request: method, path (without the prefix), query, JSON body and headers."""

    method: str
    path: str
    query: dict[str, str]
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class FakeModelRegistry:
    """``with FakeModelRegistry() as mr: ModelRegistry(mr.url, ...)``; ``mr.calls``."""

    def __init__(self, token: str | None = None) -> None:
        self.calls: list[Call] = []
        self.token = token
        self.refuse = False
        self.hang = threading.Event()  # set: calls wait until the test ends
        self.fail_once: tuple[str, str] | None = None
        self.models: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, dict[str, Any]] = {}
        self.artifacts: dict[str, dict[str, Any]] = {}
        self._ids = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self, method: str) -> None:
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                call = Call(method, parsed.path.removeprefix(PREFIX),
                            {k: v[-1] for k, v in parse_qs(parsed.query).items()},
                            json.loads(body) if body else None,
                            {k.lower(): v for k, v in self.headers.items()})
                if fake.hang.is_set():
                    fake._closing.wait(30)
                    return
                with fake._lock:
                    fake.calls.append(call)
                    status, payload = fake.answer(call)
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

            def do_PATCH(self) -> None:  # noqa: N802
                self._handle("PATCH")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeModelRegistry:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ helpers for tests

    def version_of(self, model: str, version: str) -> dict[str, Any] | None:
        rm = next((m for m in self.models.values() if m["name"] == model), None)
        return rm and next((v for v in self.versions.values() if v["name"] == version
                            and v["registeredModelId"] == rm["id"]), None)

    def artifacts_of(self, version_id: str) -> list[dict[str, Any]]:
        return [a for a in self.artifacts.values() if a["_parent"] == version_id]

    @staticmethod
    def plain(props: dict[str, Any]) -> dict[str, Any]:
        """Custom properties as plain values (``{"k": {"string_value": "v", ...}}`` -> v)."""
        out = {}
        for key, meta in props.items():
            kind = meta["metadataType"][len("Metadata"):-len("Value")].lower()
            value = meta[f"{kind}_value"]
            out[key] = int(value) if kind == "int" else value
        return out

    # ------------------------------------------------------------------ routing

    def _new(self, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        self._ids += 1
        now = str(int(time.time() * 1000))
        return dict(body, id=str(self._ids), createTimeSinceEpoch=now,
                    lastUpdateTimeSinceEpoch=now, **extra)

    @staticmethod
    def _error(status: int, message: str) -> tuple[int, dict[str, str]]:
        return status, {"code": str(status), "message": message}

    @staticmethod
    def _out(entity: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in entity.items() if not k.startswith("_")}

    def answer(self, call: Call) -> tuple[int, Any]:  # noqa: C901 - one branch per endpoint
        """Answer one call with ``(status, JSON)``."""
        from mr_openapi import models
        from pydantic import ValidationError

        if self.token and call.headers.get("authorization") != f"Bearer {self.token}":
            return self._error(401, "missing or invalid bearer token")
        if self.refuse:
            return self._error(503, "service unavailable")
        if self.fail_once and call.method == self.fail_once[0] and re.fullmatch(
                self.fail_once[1], call.path):
            self.fail_once = None
            return self._error(500, "internal error")
        q, path = call.query, call.path
        try:
            if call.method == "GET" and path == "/registered_models":
                items = [self._out(m) for m in self.models.values()]
                size = int(q.get("pageSize") or len(items) or 1)
                return 200, {"items": items[:size], "nextPageToken": "", "pageSize": size,
                             "size": len(items[:size])}
            if call.method == "GET" and path == "/registered_model":
                found = [m for m in self.models.values() if m["name"] == q.get("name")]
                return (200, self._out(found[0])) if found else self._error(404, "not found")
            if call.method == "POST" and path == "/registered_models":
                body = models.RegisteredModelCreate.from_dict(call.json).to_dict()
                if any(m["name"] == body["name"] for m in self.models.values()):
                    return self._error(409, f"registered model {body['name']} exists")
                rm = self._new(body, state="LIVE")
                models.RegisteredModel.from_dict(rm)  # the answer fits the schema
                self.models[rm["id"]] = rm
                return 201, rm
            if call.method == "GET" and path == "/model_version":
                found = [v for v in self.versions.values() if v["name"] == q.get("name")
                         and v["registeredModelId"] == q.get("parentResourceId")]
                return (200, self._out(found[0])) if found else self._error(404, "not found")
            if call.method == "POST" and path == "/model_versions":
                body = models.ModelVersionCreate.from_dict(call.json).to_dict()
                if body["registeredModelId"] not in self.models:
                    return self._error(404, "registered model not found")
                if any(v["name"] == body["name"] and v["registeredModelId"] ==
                       body["registeredModelId"] for v in self.versions.values()):
                    return self._error(409, f"version {body['name']} exists")
                mv = self._new(body, state="LIVE")
                models.ModelVersion.from_dict(mv)
                self.versions[mv["id"]] = mv
                return 201, mv
            m = re.fullmatch(r"/model_versions/([^/]+)/artifacts", path)
            if call.method == "POST" and m:
                if m[1] not in self.versions:
                    return self._error(404, "model version not found")
                body = models.Artifact.from_dict(call.json).actual_instance.to_dict()
                if body.get("artifactType") != "model-artifact":
                    return self._error(400, "only model artifacts here")
                same = [a for a in self.artifacts_of(m[1]) if a.get("name") == body.get("name")]
                art = dict(same[0], **body) if same else self._new(body, _parent=m[1],
                                                                    state="LIVE")
                models.ModelArtifact.from_dict(self._out(art))
                self.artifacts[art["id"]] = art
                return (200 if same else 201), self._out(art)
            if call.method == "GET" and m:
                items = [self._out(a) for a in self.artifacts_of(m[1])]
                return 200, {"items": items, "nextPageToken": "", "pageSize": len(items),
                             "size": len(items)}
            if call.method == "GET" and path == "/model_artifact":
                found = [a for a in self.artifacts.values() if a.get("name") == q.get("name")
                         and a["_parent"] == q.get("parentResourceId")]
                return (200, self._out(found[0])) if found else self._error(404, "not found")
        except (ValidationError, ValueError, TypeError, KeyError) as exc:
            return self._error(400, f"invalid body: {exc}")
        return self._error(404, f"no fake for {call.method} {call.path}")
