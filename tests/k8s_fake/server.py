"""An in-process HTTP server that speaks the Kubernetes API subset warmstart uses.

Resources: core/v1 pods and warmstart.dev/v1alpha1 snapshots (with a status subresource).
Verbs: list (labelSelector, fieldSelector), get, create (409 AlreadyExists), replace (PUT, 409
Conflict on a stale ``metadata.resourceVersion``), patch (JSON patch, merge and
strategic-merge for maps), delete, and watch (chunked JSON lines from a resourceVersion;
an ``ERROR`` event with code 410 when that version was compacted away).

Tests also reach the store directly (``create``, ``mutate``, ``get``) to play kubelet and
scheduler, and inject faults with ``fail_next``.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

Obj = dict[str, Any]

_ROUTES = [
    (re.compile(r"^/api/v1/pods$"), "pods", False),
    (re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods(?:/(?P<name>[^/]+)(?P<sub>/status)?)?$"),
     "pods", False),
    (re.compile(r"^/apis/warmstart\.dev/v1alpha1/snapshots$"), "snapshots", True),
    (re.compile(r"^/apis/warmstart\.dev/v1alpha1/namespaces/(?P<ns>[^/]+)/snapshots"
                r"(?:/(?P<name>[^/]+)(?P<sub>/status)?)?$"), "snapshots", True),
]
_KINDS = {"pods": ("v1", "Pod"), "snapshots": ("warmstart.dev/v1alpha1", "Snapshot")}


def _route(path: str) -> tuple[str, dict[str, str | None]]:
    for rx, resource, _namespaced in _ROUTES:
        m = rx.match(path)
        if m:
            return resource, m.groupdict()
    raise ApiError(404, "NotFound", f"no route {path}")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> Obj:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (also what strategic merge does for plain maps)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            result.pop(k, None)
        else:
            result[k] = merge_patch(result.get(k), v)
    return result


def json_patch(doc: Obj, ops: list[Obj]) -> Obj:
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[int(p)] if isinstance(parent, list) else parent.setdefault(p, {})
        last = parts[-1]
        if op["op"] in ("add", "replace"):
            parent[last] = op["value"]
        elif op["op"] == "remove":
            parent.pop(last, None)
        elif op["op"] == "test":
            if parent.get(last) != op["value"]:
                raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        else:
            raise ApiError(400, "BadRequest", f"unsupported op {op['op']}")
    return doc


def _label_match(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _field_match(obj: Obj, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        neg = "!=" in term
        k, v = term.split("!=" if neg else "=", 1)
        cur: Any = obj
        for part in k.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if (str(cur or "") == v) == neg:
            return False
    return True


@dataclass
class _Event:
    rv: int
    resource: str
    type: str
    obj: Obj


@dataclass
class _Fault:
    method: str
    pattern: str
    code: int
    remaining: int


@dataclass
class Store:
    objects: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    rv: int = 100
    #: Watches from a resourceVersion older than this get 410 Gone.
    oldest_rv: int = 0
    cond: threading.Condition = field(default_factory=threading.Condition)


class FakeApiServer:
    def __init__(self) -> None:
        self.store = Store()
        #: (method, path, query, User-Agent) of every request
        self.requests: list[tuple[str, str, dict[str, list[str]], str]] = []
        self.faults: list[_Fault] = []
        self._closing = False
        self.stats = {"conflicts": 0, "gone": 0, "watches": 0}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: Any) -> None:
                pass

            def _dispatch(self, method: str) -> None:
                server._handle(self, method)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_PUT(self) -> None:
                self._dispatch("PUT")

            def do_PATCH(self) -> None:
                self._dispatch("PATCH")

            def do_DELETE(self) -> None:
                self._dispatch("DELETE")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # --- lifecycle -------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._closing = True
        with self.store.cond:
            self.store.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    # --- direct access for tests -----------------------------------------------------
    def _bump(self, resource: str, type_: str, obj: Obj) -> None:
        st = self.store
        st.rv += 1
        obj["metadata"]["resourceVersion"] = str(st.rv)
        st.events.append(_Event(st.rv, resource, type_, copy.deepcopy(obj)))
        st.cond.notify_all()

    def create(self, resource: str, obj: Obj) -> Obj:
        with self.store.cond:
            return copy.deepcopy(self._create(resource, obj["metadata"]["namespace"], obj))

    def get(self, resource: str, namespace: str, name: str) -> Obj | None:
        with self.store.cond:
            obj = self.store.objects.get((resource, namespace, name))
            return copy.deepcopy(obj) if obj else None

    def list(self, resource: str) -> list[Obj]:
        with self.store.cond:
            return [copy.deepcopy(o) for (r, _, _), o in sorted(self.store.objects.items())
                    if r == resource]

    def mutate(self, resource: str, namespace: str, name: str,
               fn: Callable[[Obj], None]) -> Obj:
        """Change an object in place (kubelet/scheduler role), as one new resourceVersion."""
        with self.store.cond:
            obj = self.store.objects[(resource, namespace, name)]
            fn(obj)
            self._bump(resource, "MODIFIED", obj)
            return copy.deepcopy(obj)

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.store.cond:
            obj = self.store.objects.pop((resource, namespace, name))
            self._bump(resource, "DELETED", obj)

    def compact(self) -> None:
        """Forget the event history: every watch from an older version gets 410 Gone."""
        with self.store.cond:
            self.store.oldest_rv = self.store.rv
            self.store.events.clear()

    def fail_next(self, method: str, pattern: str, code: int, times: int = 1) -> None:
        """The next ``times`` requests of ``method`` whose path matches ``pattern`` fail."""
        with self.store.cond:
            self.faults.append(_Fault(method, pattern, code, times))

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p, _, _ in self.requests if m == method and re.search(pattern, p))

    # --- HTTP ------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, code: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        query = parse_qs(parts.query)
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        self.requests.append((method, parts.path, query, h.headers.get("User-Agent", "")))
        try:
            with self.store.cond:
                for fault in self.faults:
                    if fault.method == method and re.search(fault.pattern, parts.path) \
                            and fault.remaining > 0:
                        fault.remaining -= 1
                        if fault.code == 409:
                            self.stats["conflicts"] += 1
                        raise ApiError(fault.code, "Injected", f"injected {fault.code}")
            resource, groups = _route(parts.path)
            ns, name, sub = groups.get("ns"), groups.get("name"), groups.get("sub")
            if method == "GET" and name is None and query.get("watch", ["false"])[0].lower() in (
                    "true", "1"):
                self._watch(h, resource, ns, query)
                return
            body = json.loads(raw) if raw else None
            code, out = self._rest(method, resource, ns, name, bool(sub), query, body,
                                   h.headers.get("Content-Type", ""))
            self._send(h, code, out)
        except ApiError as err:
            self._send(h, err.code, err.status())

    def _rest(self, method: str, resource: str, ns: str | None, name: str | None,
              status_sub: bool, query: dict[str, list[str]], body: Any,
              ctype: str) -> tuple[int, Obj]:
        st = self.store
        with st.cond:
            if method == "GET" and name is None:
                items = [copy.deepcopy(o) for (r, n, _), o in sorted(st.objects.items())
                         if r == resource and (ns is None or n == ns)
                         and self._selected(o, query)]
                api_version, kind = _KINDS[resource]
                return 200, {"apiVersion": api_version, "kind": f"{kind}List",
                             "metadata": {"resourceVersion": str(st.rv)}, "items": items}
            if method == "POST":
                assert ns is not None
                return 201, copy.deepcopy(self._create(resource, ns, body))
            assert ns is not None and name is not None
            key = (resource, ns, name)
            cur = st.objects.get(key)
            if cur is None:
                raise ApiError(404, "NotFound", f'{resource} "{name}" not found')
            if method == "GET":
                return 200, copy.deepcopy(cur)
            if method == "DELETE":
                del st.objects[key]
                self._bump(resource, "DELETED", cur)
                return 200, copy.deepcopy(cur)
            if method == "PUT":
                want = (body.get("metadata") or {}).get("resourceVersion")
                if want and want != cur["metadata"]["resourceVersion"]:
                    self.stats["conflicts"] += 1
                    raise ApiError(409, "Conflict",
                                   f'Operation cannot be fulfilled on {resource} "{name}": '
                                   "the object has been modified; please apply your changes "
                                   "to the latest version and try again")
                new = self._updated(resource, cur, body, status_sub)
            elif method == "PATCH":
                if isinstance(body, list):
                    patched = json_patch(cur, body)
                else:
                    patched = merge_patch(cur, body)
                new = self._updated(resource, cur, patched, status_sub)
            else:
                raise ApiError(405, "MethodNotAllowed", method)
            st.objects[key] = new
            self._bump(resource, "MODIFIED", new)
            return 200, copy.deepcopy(new)

    def _updated(self, resource: str, cur: Obj, body: Obj, status_sub: bool) -> Obj:
        new = copy.deepcopy(cur)
        if status_sub:
            new["status"] = copy.deepcopy(body.get("status") or {})
            return new
        meta = dict(body.get("metadata") or {})
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion"):
            meta[fixed] = cur["metadata"].get(fixed)
        new["metadata"] = meta
        new["spec"] = copy.deepcopy(body.get("spec", cur.get("spec")))
        if resource == "pods":  # no status subresource semantics needed for pods here
            new["status"] = copy.deepcopy(body.get("status", cur.get("status")))
        if new.get("spec") != cur.get("spec"):
            meta["generation"] = int(cur["metadata"].get("generation", 1)) + 1
        return new

    def _create(self, resource: str, ns: str, body: Obj) -> Obj:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        meta["namespace"] = ns
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise ApiError(422, "Invalid", "metadata.name: Required value")
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        key = (resource, ns, meta["name"])
        if key in self.store.objects:
            raise ApiError(409, "AlreadyExists", f'{resource} "{meta["name"]}" already exists')
        api_version, kind = _KINDS[resource]
        obj.setdefault("apiVersion", api_version)
        obj.setdefault("kind", kind)
        meta["uid"] = str(uuid.uuid4())
        meta["generation"] = 1
        meta["creationTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if resource == "snapshots":
            obj.pop("status", None)  # status subresource: create ignores status
        self.store.objects[key] = obj
        self._bump(resource, "ADDED", obj)
        return obj

    @staticmethod
    def _selected(obj: Obj, query: dict[str, list[str]]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        for sel in query.get("labelSelector", []):
            if not _label_match(labels, sel):
                return False
        for sel in query.get("fieldSelector", []):
            if not _field_match(obj, sel):
                return False
        return True

    def _watch(self, h: BaseHTTPRequestHandler, resource: str, ns: str | None,
               query: dict[str, list[str]]) -> None:
        self.stats["watches"] += 1
        timeout = float(query.get("timeoutSeconds", ["30"])[0])
        since = int(query.get("resourceVersion", ["0"])[0] or 0)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()

        def chunk(ev: Obj) -> None:
            data = (json.dumps(ev) + "\n").encode()
            h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            h.wfile.flush()

        deadline = time.monotonic() + timeout
        st = self.store
        try:
            with st.cond:
                if since and since < st.oldest_rv:
                    self.stats["gone"] += 1
                    chunk({"type": "ERROR", "object": ApiError(
                        410, "Expired", f"too old resource version: {since} "
                        f"({st.oldest_rv})").status()})
                    h.wfile.write(b"0\r\n\r\n")
                    return
                pos = 0
                while not self._closing:
                    pending = [e for e in st.events[pos:] if e.rv > since]
                    pos = len(st.events)
                    for e in pending:
                        if e.resource != resource:
                            continue
                        o = e.obj
                        if ns is not None and o["metadata"].get("namespace") != ns:
                            continue
                        if not self._selected(o, query):
                            continue
                        chunk({"type": e.type, "object": o})
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    if pos > len(st.events):  # compacted while watching: restart from 0
                        pos = 0
                    st.cond.wait(min(left, 0.5))
            h.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
