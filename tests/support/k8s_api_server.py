"""A stand-in for the Kubernetes API on 127.0.0.1: pods and their logs, events, Secrets, PVCs,
and namespaced custom objects (get, create, replace).

It answers the core/v1 REST paths that ``kubernetes.client.CoreV1Api`` calls for listing pods by
label, reading a container's log (``follow=true`` streams it with chunked encoding until the
test marks the pod finished, as the API server does when the container ends), listing events by
``involvedObject.name``, creating/deleting Secrets, deleting PVCs, and the
``kubernetes.client.CustomObjectsApi`` calls for namespaced custom objects (GET, POST: 409 when
the name exists, PUT: 409 unless ``metadata.resourceVersion`` is the stored one, as the API
server's optimistic concurrency does; ``crds`` lists the served group/version/plural, 404
otherwise). It records every call with its body. Nothing runs.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

NS = r"/api/v1/namespaces/(?P<ns>[^/]+)"
CUSTOM = r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<ns>[^/]+)/(?P<plural>[^/]+)"


@dataclass
class Call:
    """One request: method, path, query and raw body."""

    method: str
    path: str
    query: dict[str, str]
    body: bytes = b""


@dataclass
class Pod:
    """A pod of a KFP run: its executor node, phase and log lines."""

    name: str
    namespace: str
    run_id: str
    node_name: str
    phase: str = "Running"
    lines: list[str] = field(default_factory=list)
    done: bool = False
    events: list[dict[str, Any]] = field(default_factory=list)

    def manifest(self) -> dict[str, Any]:
        return {"metadata": {"name": self.name, "namespace": self.namespace,
                             "labels": {"pipeline/runid": self.run_id},
                             "annotations": {"workflows.argoproj.io/node-name": self.node_name}},
                "spec": {"containers": [{"name": "main", "image": "x"}]},
                "status": {"phase": self.phase}}


class FakeK8sApi:
    """``with FakeK8sApi() as k8s: Configuration(host=k8s.url)``; ``k8s.calls``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.pods: dict[str, Pod] = {}
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.pvcs: set[tuple[str, str]] = set()
        self.crds: set[tuple[str, str, str]] = {("serving.kserve.io", "v1beta1",
                                                 "inferenceservices")}
        self.objects: dict[tuple[str, ...], dict[str, Any]] = {}
        self.deny = False  # answer 403 to custom-object calls
        self.changed = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self, method: str) -> None:
                parsed = urlparse(self.path)
                query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                call = Call(method, parsed.path, query, self.rfile.read(length) if length else b"")
                with api.changed:
                    api.calls.append(call)
                m = re.fullmatch(NS + r"/pods/(?P<pod>[^/]+)/log", parsed.path)
                # kubernetes.client sends follow=True; the API server parses it as a bool.
                if method == "GET" and m and query.get("follow", "").lower() == "true":
                    return api._stream_log(self, m["pod"])
                status, payload = api.route(call)
                data = payload.encode() if isinstance(payload, str) else json.dumps(
                    payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str)
                                 else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._handle("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._handle("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._handle("DELETE")

            def do_PUT(self) -> None:  # noqa: N802
                self._handle("PUT")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeK8sApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish_all()
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ test controls

    def add_pod(self, pod: Pod) -> Pod:
        with self.changed:
            self.pods[pod.name] = pod
            self.changed.notify_all()
        return pod

    def log(self, pod: str, *lines: str) -> None:
        with self.changed:
            self.pods[pod].lines.extend(lines)
            self.changed.notify_all()

    def finish(self, pod: str, phase: str = "Succeeded") -> None:
        with self.changed:
            self.pods[pod].phase, self.pods[pod].done = phase, True
            self.changed.notify_all()

    def finish_all(self) -> None:
        for name in list(self.pods):
            self.finish(name, self.pods[name].phase)

    def find(self, method: str, path_re: str) -> list[Call]:
        return [c for c in self.calls if c.method == method and re.fullmatch(path_re, c.path)]

    # ------------------------------------------------------------------ routing

    def _stream_log(self, handler: BaseHTTPRequestHandler, name: str) -> None:
        if name not in self.pods:
            data = b'{"kind": "Status", "code": 404}'
            handler.send_response(404)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        sent = 0
        while True:
            with self.changed:
                pod = self.pods[name]
                self.changed.wait_for(
                    lambda pod=pod, sent=sent: len(pod.lines) > sent or pod.done, timeout=30)
                new, done = pod.lines[sent:], pod.done
            for line in new:
                data = (line + "\n").encode()
                handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                handler.wfile.flush()
            sent += len(new)
            if done and sent == len(self.pods[name].lines):
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()
                return

    def _custom(self, call: Call, m: re.Match[str]) -> tuple[int, Any]:
        status = {"kind": "Status", "apiVersion": "v1", "status": "Failure"}
        if (m["group"], m["version"], m["plural"]) not in self.crds:
            return 404, dict(status, code=404, reason="NotFound")
        if self.deny:
            return 403, dict(status, code=403, reason="Forbidden")
        base = (m["group"], m["version"], m["ns"], m["plural"])
        name = m["name"]
        if call.method == "GET" and name:
            found = self.objects.get((*base, name))
            return (200, found) if found else (404, dict(status, code=404, reason="NotFound"))
        body = json.loads(call.body)
        if call.method == "POST" and not name:
            key = (*base, body["metadata"]["name"])
            if key in self.objects:
                return 409, dict(status, code=409, reason="AlreadyExists")
            body["metadata"].update(namespace=m["ns"], resourceVersion="1")
            self.objects[key] = body
            return 201, body
        if call.method == "PUT" and name and (*base, name) in self.objects:
            held = self.objects[(*base, name)]["metadata"]["resourceVersion"]
            if body["metadata"].get("resourceVersion") != held:
                return 409, dict(status, code=409, reason="Conflict")
            body["metadata"].update(namespace=m["ns"], resourceVersion=str(int(held) + 1))
            self.objects[(*base, name)] = body
            return 200, body
        return 404, dict(status, code=404, reason="NotFound")

    def route(self, call: Call) -> tuple[int, Any]:  # noqa: C901 - one branch per endpoint
        if m := re.fullmatch(CUSTOM + r"(/(?P<name>[^/]+))?", call.path):
            return self._custom(call, m)
        not_found = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                     "reason": "NotFound"}
        ok = {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        path, q = call.path, call.query
        if call.method == "GET" and (m := re.fullmatch(NS + r"/pods", path)):
            key, _, value = q.get("labelSelector", "").partition("=")
            items = [p.manifest() for p in self.pods.values() if p.namespace == m["ns"]
                     and key == "pipeline/runid" and p.run_id == value]
            return 200, {"kind": "PodList", "apiVersion": "v1", "items": items}
        if call.method == "GET" and (m := re.fullmatch(NS + r"/pods/(?P<pod>[^/]+)/log", path)):
            pod = self.pods.get(m["pod"])
            return (200, "".join(line + "\n" for line in pod.lines)) if pod else (404, not_found)
        if call.method == "GET" and (m := re.fullmatch(NS + r"/events", path)):
            name = q.get("fieldSelector", "").partition("involvedObject.name=")[2]
            pod = self.pods.get(name)
            return 200, {"kind": "EventList", "apiVersion": "v1",
                         "items": list(pod.events) if pod else []}
        if call.method == "POST" and (m := re.fullmatch(NS + r"/secrets", path)):
            body = json.loads(call.body)
            key = (m["ns"], body["metadata"]["name"])
            if key in self.secrets:
                return 409, dict(not_found, code=409, reason="AlreadyExists")
            self.secrets[key] = body
            return 201, {k: v for k, v in body.items() if k not in ("data", "stringData")}
        if call.method == "DELETE" and (m := re.fullmatch(NS + r"/secrets/(?P<name>[^/]+)", path)):
            found = self.secrets.pop((m["ns"], m["name"]), None)
            return (200, ok) if found else (404, not_found)
        m = re.fullmatch(NS + r"/persistentvolumeclaims/(?P<name>[^/]+)", path)
        if call.method == "DELETE" and m:
            if (m["ns"], m["name"]) not in self.pvcs:
                return 404, not_found
            self.pvcs.discard((m["ns"], m["name"]))
            return 200, {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                         "metadata": {"name": m["name"], "namespace": m["ns"]}}
        return 404, dict(not_found, message=f"no fake for {call.method} {path}")
