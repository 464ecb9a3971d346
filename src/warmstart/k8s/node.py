"""The node-local operations the Kubernetes node agent drives.

The Kubernetes side never checkpoints anything itself: it decides *what* and *when*, then asks
the node agent daemon on the same node (issue 5) through :class:`NodeOperations`. Tests use an
in-memory implementation; production uses :class:`UnixSocketNodeOperations`.

What the real adapter calls — the daemon's HTTP API on a unix socket
(default ``/run/warmstart/agent.sock``, shared with the DaemonSet pod by a hostPath):

``GET /v1/node``
    -> ``{"arch", "gpu_model", "driver_version", "gpu_count", "kernel"}`` (:class:`NodeFacts`).
``POST /v1/operations``
    body ``{"type": "checkpoint", "container_id", "snapshot", "store", "wait_ready"}`` or
    ``{"type": "restore", "container_id", "snapshot", "store"}`` or
    ``{"type": "cold-start", "container_id", "reason"}``
    -> ``202 {"id", "state"}``; ``container_id`` is the CRI id without the ``containerd://``
    prefix. ``cold-start`` writes the placeholder's ``cold-start`` file (see
    :mod:`warmstart.k8s.contract`); ``restore`` writes ``restore-started`` before it begins.
``GET /v1/operations/{id}``
    -> ``{"id", "state": "pending|running|succeeded|failed", "error", "result": {...}}`` where
    ``result`` carries :class:`OperationReport`'s fields (``snapshot_id``, ``size_bytes``,
    ``timings`` {phase: seconds}, ``gpu_model``, ``driver_version``).
Errors are ``{"error": "<one line>", "hint": "..."}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from warmstart.errors import EnvironmentProblem, WarmstartError


@dataclass(frozen=True)
class NodeFacts:
    arch: str
    gpu_model: str
    driver_version: str
    gpu_count: int = 0
    kernel: str = ""


@dataclass
class OperationReport:
    id: str
    ok: bool
    error: str | None = None
    snapshot_id: str | None = None
    size_bytes: int | None = None
    #: phase name -> seconds (dump, upload, download, restore, gpu-restore...)
    timings: dict[str, float] = field(default_factory=dict)
    gpu_model: str | None = None
    driver_version: str | None = None
    seconds: float = 0.0


class NodeOperations(Protocol):
    """What the k8s node agent needs from the node-local operation daemon."""

    def compatibility(self) -> NodeFacts:
        """Facts of this node that decide which snapshots it can restore."""
        ...

    def checkpoint_container(
        self, container_id: str, snapshot: str, store: str, wait_ready: bool
    ) -> OperationReport:
        """Checkpoint a running container into ``store`` under the key ``snapshot``.

        With ``wait_ready`` it first waits for the worker's ``ready-for-snapshot`` file.
        Blocks until done; failures come back as ``ok=False`` with a one-line ``error``.
        """
        ...

    def restore_container(
        self, placeholder_container_id: str, snapshot: str, store: str
    ) -> OperationReport:
        """Restore snapshot ``snapshot`` of ``store`` into a container running the placeholder."""
        ...

    def cold_start(self, placeholder_container_id: str, reason: str) -> None:
        """Tell the placeholder to exec the original command (write ``cold-start``)."""
        ...


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class UnixSocketNodeOperations:
    """:class:`NodeOperations` over the node agent daemon's unix-socket HTTP API."""

    def __init__(self, socket_path: str = "/run/warmstart/agent.sock", *,
                 poll_interval: float = 0.2, timeout: float = 3600.0) -> None:
        self.socket_path = socket_path
        self.poll_interval = poll_interval
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        conn = _UnixHTTPConnection(self.socket_path, timeout=30.0)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            raise EnvironmentProblem(
                f"cannot reach the warmstart node daemon at {self.socket_path} ({exc})",
                hint="is the agent container running on this node?",
            ) from None
        finally:
            conn.close()
        try:
            doc = json.loads(data or b"{}")
        except ValueError:
            doc = {"error": data[:200].decode(errors="replace")}
        if resp.status >= 400:
            raise WarmstartError(f"node daemon: {doc.get('error', resp.reason)}",
                                 hint=doc.get("hint"))
        return doc

    def _run(self, body: dict[str, Any]) -> OperationReport:
        started = time.monotonic()
        op = self._call("POST", "/v1/operations", body)
        op_id = str(op["id"])
        while op.get("state") not in ("succeeded", "failed"):
            if time.monotonic() - started > self.timeout:
                return OperationReport(id=op_id, ok=False, error="operation timed out",
                                       seconds=time.monotonic() - started)
            time.sleep(self.poll_interval)
            op = self._call("GET", f"/v1/operations/{op_id}")
        result = op.get("result") or {}
        return OperationReport(
            id=op_id,
            ok=op["state"] == "succeeded",
            error=op.get("error"),
            snapshot_id=result.get("snapshot_id"),
            size_bytes=result.get("size_bytes"),
            timings={str(k): float(v) for k, v in (result.get("timings") or {}).items()},
            gpu_model=result.get("gpu_model"),
            driver_version=result.get("driver_version"),
            seconds=time.monotonic() - started,
        )

    def compatibility(self) -> NodeFacts:
        doc = self._call("GET", "/v1/node")
        return NodeFacts(arch=doc["arch"], gpu_model=doc.get("gpu_model") or "none",
                         driver_version=doc.get("driver_version") or "none",
                         gpu_count=int(doc.get("gpu_count") or 0),
                         kernel=doc.get("kernel") or "")

    def checkpoint_container(self, container_id: str, snapshot: str, store: str,
                             wait_ready: bool) -> OperationReport:
        return self._run({"type": "checkpoint", "container_id": container_id,
                          "snapshot": snapshot, "store": store, "wait_ready": wait_ready})

    def restore_container(self, placeholder_container_id: str, snapshot: str,
                          store: str) -> OperationReport:
        return self._run({"type": "restore", "container_id": placeholder_container_id,
                          "snapshot": snapshot, "store": store})

    def cold_start(self, placeholder_container_id: str, reason: str) -> None:
        self._call("POST", "/v1/operations", {"type": "cold-start",
                                              "container_id": placeholder_container_id,
                                              "reason": reason})


def strip_runtime_prefix(container_id: str) -> str:
    """``containerd://abc`` -> ``abc`` (pod status carries the runtime prefix)."""
    return container_id.split("://", 1)[-1]
