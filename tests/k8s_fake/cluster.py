"""A simulated cluster for tests: fake API server + in-memory nodes playing kubelet and daemon.

* :class:`SharedStore` — snapshots on shared storage (what every node can read).
* :class:`FakeNodeOps` — one node's :class:`~warmstart.k8s.node.NodeOperations`: checkpoints
  into the shared store, restores from it (refusing, and recording, an incompatible restore),
  and plays the worker: a restored container becomes Ready when the restore finishes, a
  cold-started one after ``cold_start_delay``.
* :class:`SimCluster` — creates pods the way a ReplicaSet + scheduler + kubelet would.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from warmstart.k8s import contract
from warmstart.k8s.node import NodeFacts, OperationReport

from .server import FakeApiServer


@dataclass
class StoredSnapshot:
    key: str
    node: str
    gpu_model: str
    driver_version: str
    arch: str
    image_id: str
    size_bytes: int


@dataclass
class SharedStore:
    snapshots: dict[str, StoredSnapshot] = field(default_factory=dict)
    checkpoints: list[tuple[str, str]] = field(default_factory=list)  # (key, node)
    restores: list[tuple[str, str, str]] = field(default_factory=list)  # (key, node, pod)
    violations: list[str] = field(default_factory=list)
    #: (node, start, end) of every restore, to show that nodes worked in parallel
    intervals: list[tuple[str, float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeNodeOps:
    def __init__(self, cluster: SimCluster, node: str, facts: NodeFacts, *,
                 restore_seconds: float = 0.3, checkpoint_seconds: float = 0.2,
                 cold_start_delay: float = 0.3, fail_restore: bool = False) -> None:
        self.cluster = cluster
        self.node = node
        self.facts = facts
        self.restore_seconds = restore_seconds
        self.checkpoint_seconds = checkpoint_seconds
        self.cold_start_delay = cold_start_delay
        self.fail_restore = fail_restore
        self.cold_starts: list[tuple[str, str]] = []
        self.calls: list[str] = []

    def compatibility(self) -> NodeFacts:
        self.calls.append("compatibility")
        return self.facts

    def checkpoint_container(self, container_id: str, snapshot: str, store: str,
                             wait_ready: bool) -> OperationReport:
        pod = self.cluster.pod_of(container_id)
        self.calls.append(f"checkpoint {snapshot}")
        if pod is None or pod["spec"]["nodeName"] != self.node:
            self.cluster.store.violations.append(
                f"{self.node}: checkpoint of container {container_id} not on this node")
            return OperationReport(id="x", ok=False, error="no such container here")
        if wait_ready:  # the worker writes ready-for-snapshot once it is warm
            deadline = time.monotonic() + 10
            while not self.cluster.is_ready(pod) and time.monotonic() < deadline:
                time.sleep(0.02)
        time.sleep(self.checkpoint_seconds)
        cs = pod["status"]["containerStatuses"][0]
        with self.cluster.store.lock:
            self.cluster.store.checkpoints.append((snapshot, self.node))
            self.cluster.store.snapshots[snapshot] = StoredSnapshot(
                snapshot, self.node, self.facts.gpu_model, self.facts.driver_version,
                self.facts.arch, cs["imageID"], 3 << 30)
        return OperationReport(id=f"ck-{snapshot}", ok=True, snapshot_id=f"id-{snapshot}",
                               size_bytes=3 << 30, timings={"dump": 0.1, "upload": 0.1},
                               gpu_model=self.facts.gpu_model,
                               driver_version=self.facts.driver_version,
                               seconds=self.checkpoint_seconds)

    def restore_container(self, placeholder_container_id: str, snapshot: str,
                          store: str) -> OperationReport:
        self.calls.append(f"restore {snapshot}")
        pod = self.cluster.pod_of(placeholder_container_id)
        start = time.monotonic()
        with self.cluster.store.lock:
            snap = self.cluster.store.snapshots.get(snapshot)
        if pod is None or snap is None:
            return OperationReport(id="r", ok=False, error=f"snapshot {snapshot} not in store")
        image_id = pod["status"]["containerStatuses"][0]["imageID"]
        if (snap.gpu_model, snap.driver_version, snap.arch, snap.image_id) != (
                self.facts.gpu_model, self.facts.driver_version, self.facts.arch, image_id):
            with self.cluster.store.lock:
                self.cluster.store.violations.append(
                    f"{self.node}: restore of {snapshot} ({snap.gpu_model}) onto "
                    f"{self.facts.gpu_model}")
            return OperationReport(id="r", ok=False, error="incompatible")
        time.sleep(self.restore_seconds)
        if self.fail_restore:
            return OperationReport(id="r", ok=False, error="criu: restore failed (injected)")
        end = time.monotonic()
        with self.cluster.store.lock:
            self.cluster.store.restores.append((snapshot, self.node, pod["metadata"]["name"]))
            self.cluster.store.intervals.append((self.node, start, end))
        self.cluster.set_ready(pod["metadata"]["name"], how="restored")
        return OperationReport(id="r", ok=True, snapshot_id=snap.key,
                               timings={"restore": end - start}, seconds=end - start)

    def cold_start(self, placeholder_container_id: str, reason: str) -> None:
        pod = self.cluster.pod_of(placeholder_container_id)
        assert pod is not None
        name = pod["metadata"]["name"]
        self.cold_starts.append((name, reason))
        t = threading.Timer(self.cold_start_delay, self.cluster.set_ready, args=(name,),
                            kwargs={"how": "cold"})
        t.daemon = True
        t.start()


class SimCluster:
    def __init__(self, server: FakeApiServer, namespace: str = "default") -> None:
        self.server = server
        self.ns = namespace
        self.store = SharedStore()
        self.started: dict[str, str] = {}  # pod -> "restored" | "cold"
        self._n = 0

    def add_pod(self, name: str, node: str, *, workload: str = "llm",
                annotations: dict[str, str] | None = None,
                image_id: str = "registry.example/llm@sha256:aaa",
                running: bool = True) -> dict[str, Any]:
        pod = {
            "metadata": {"name": name, "namespace": self.ns,
                         "labels": {contract.LABEL_WORKLOAD: workload, "app": workload},
                         "annotations": dict(annotations or {})},
            "spec": {"nodeName": node, "containers": [{"name": "worker", "image": "llm"}]},
            "status": {"phase": "Pending"},
        }
        self.server.create("pods", pod)
        if running:
            self.run_pod(name, image_id)
        return pod

    def run_pod(self, name: str, image_id: str = "registry.example/llm@sha256:aaa") -> None:
        """The kubelet started the container (the placeholder, for restore pods)."""
        def start(o: dict[str, Any]) -> None:
            o["status"] = {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "False"}], "containerStatuses": [{
                    "name": "worker", "ready": False, "image": "llm", "imageID": image_id,
                    "containerID": f"containerd://{name}-cid", "state": {"running": {}}}]}
        self.server.mutate("pods", self.ns, name, start)

    def pod_of(self, container_id: str) -> dict[str, Any] | None:
        name = container_id.removeprefix("containerd://").removesuffix("-cid")
        return self.server.get("pods", self.ns, name)

    def set_ready(self, name: str, how: str) -> None:
        self.started[name] = how

        def ready(o: dict[str, Any]) -> None:
            o["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
            o["status"]["containerStatuses"][0]["ready"] = True
        self.server.mutate("pods", self.ns, name, ready)

    def is_ready(self, pod: dict[str, Any]) -> bool:
        cur = self.server.get("pods", self.ns, pod["metadata"]["name"])
        return bool(cur) and any(c["type"] == "Ready" and c["status"] == "True"
                                 for c in cur["status"].get("conditions") or [])

    def snapshots(self) -> list[dict[str, Any]]:
        return self.server.list("snapshots")


def wait_for(pred: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return bool(pred())
