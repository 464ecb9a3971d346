"""The node agent's Kubernetes side: one per node (the ``snapshot-agent`` DaemonSet).

It watches only its own node's opted-in pods (``fieldSelector=spec.nodeName=<node>``) and the
Snapshot objects bound to its node (``labelSelector=warmstart.dev/node=<node>``), and performs
every checkpoint and restore locally through :class:`~warmstart.k8s.node.NodeOperations`.
Nothing on the restore path goes through the controller: an agent picks the newest Ready
snapshot compatible with *its* node (GPU model, driver, arch) and the pod's image digest, so
agents on different nodes restore in parallel and independently.

A Snapshot is claimed by a status update carrying the resourceVersion the agent read
(``Pending -> Checkpointing``, ``claimedBy``); a 409 means someone else moved it, so no
snapshot is ever taken twice.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from warmstart.k8s import contract
from warmstart.k8s.kube import (
    Informer,
    Kube,
    Obj,
    WorkQueue,
    api_client,
    is_conflict,
    key_of,
    run_until_stopped,
    split_key,
)
from warmstart.k8s.node import (
    NodeFacts,
    NodeOperations,
    OperationReport,
    UnixSocketNodeOperations,
    strip_runtime_prefix,
)
from warmstart.k8s.resources import (
    Compat,
    Phase,
    PhaseTimingStatus,
    RestoreStatus,
    SnapshotStatus,
    image_digest,
    now,
    snapshot_compat,
    spec_of,
    status_of,
)
from warmstart.k8s.settings import AgentSettings

log = logging.getLogger(__name__)


@dataclass
class AgentMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.restores = Counter("warmstart_agent_restores", "Restore decisions by result",
                                ["result", "reason"], registry=r)
        self.restore_seconds = Histogram(
            "warmstart_agent_restore_seconds", "Time to restore a pod from a snapshot",
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300), registry=r)
        self.checkpoints = Counter("warmstart_agent_checkpoints", "Checkpoints by result",
                                   ["result"], registry=r)


def target_container(pod: Obj) -> str | None:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    if ann.get(contract.ANN_CONTAINER):
        return str(ann[contract.ANN_CONTAINER])
    containers = (pod.get("spec") or {}).get("containers") or []
    return containers[0]["name"] if containers else None


def running_container(pod: Obj, name: str | None) -> dict[str, Any] | None:
    """The status of container ``name`` if it runs and has an id, else None."""
    status = pod.get("status") or {}
    if status.get("phase") != "Running":
        return None
    for cs in status.get("containerStatuses") or []:
        if cs.get("name") == name and "running" in (cs.get("state") or {}) \
                and cs.get("containerID"):
            return cs
    return None


class NodeAgent:
    def __init__(self, kube: Kube, ops: NodeOperations, settings: AgentSettings, *,
                 metrics: AgentMetrics | None = None) -> None:
        self.kube = kube
        self.ops = ops
        self.settings = settings
        self.node = settings.node_name
        self.metrics = metrics or AgentMetrics()
        self._facts: NodeFacts | None = None
        self._inflight: set[str] = set()
        #: uids of pods/snapshots this process already finished with; the informer cache can
        #: still show our own earlier write ("restoring", "Checkpointing") for a moment.
        self._handled: set[str] = set()
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.pods = Informer(
            f"pods@{self.node}", kube.core.list_pod_for_all_namespaces, self._on_pod,
            stop=self.stop, field_selector=f"spec.nodeName={self.node}",
            label_selector=contract.LABEL_WORKLOAD, watch_timeout=settings.watch_timeout)
        self.snapshots = Informer(
            f"snapshots@{self.node}", self._list_snapshots, self._on_snapshot, stop=self.stop,
            label_selector=f"{contract.LABEL_NODE}={self.node}",
            watch_timeout=settings.watch_timeout)
        self.pod_queue = WorkQueue(self.reconcile_pod, workers=settings.max_parallel,
                                   stop=self.stop, name=f"restore@{self.node}")
        self.snap_queue = WorkQueue(self.reconcile_snapshot, workers=2, stop=self.stop,
                                    name=f"checkpoint@{self.node}")

    def _list_snapshots(self, **kw: Any) -> Any:
        return self.kube.custom.list_cluster_custom_object(
            contract.GROUP, contract.VERSION, contract.PLURAL, **kw)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.pod_queue.start()
        self.snap_queue.start()
        self.pods.start()
        self.snapshots.start()

    def facts(self) -> NodeFacts:
        if self._facts is None:
            self._facts = self.ops.compatibility()
        return self._facts

    def _on_pod(self, kind: str, pod: Obj) -> None:
        if kind == "DELETED":
            with self._lock:
                self._handled.discard(pod["metadata"].get("uid", ""))
        else:
            self.pod_queue.add(key_of(pod))

    def _on_snapshot(self, kind: str, snap: Obj) -> None:
        if kind == "DELETED":
            with self._lock:
                self._handled.discard(snap["metadata"].get("uid", ""))
        else:
            self.snap_queue.add(key_of(snap))

    def _begin(self, key: str, uid: str) -> bool:
        """Mark ``key`` in flight; False if it is already, or was finished by this process."""
        with self._lock:
            if key in self._inflight or uid in self._handled:
                return False
            self._inflight.add(key)
            return True

    def _end(self, key: str, uid: str, finished: bool = True) -> None:
        with self._lock:
            self._inflight.discard(key)
            if finished:
                self._handled.add(uid)

    def compat_of(self, cs: dict[str, Any]) -> Compat:
        f = self.facts()
        return Compat(arch=f.arch, gpu_model=f.gpu_model, driver_version=f.driver_version,
                      image_digest=image_digest(str(cs.get("imageID") or cs.get("image", ""))))

    # --- restore ---------------------------------------------------------------------
    def reconcile_pod(self, key: str) -> float | None:
        pod = self.pods.get(key)
        if pod is None:
            return None
        cs = running_container(pod, target_container(pod))
        if cs is None:
            return None  # a later pod event (container started) brings it back
        ns, name = split_key(key)
        meta = pod["metadata"]
        ann = meta.get("annotations") or {}
        compat = self.compat_of(cs)
        cid = strip_runtime_prefix(cs["containerID"])
        patch: dict[str, str | None] = {}
        if ann.get(contract.ANN_COMPAT_KEY) != compat.key():
            patch[contract.ANN_COMPAT_KEY] = compat.key()
        wanted = ann.get(contract.ANN_RESTORE)
        if not wanted:
            if patch:
                self.kube.annotate_pod(ns, name, patch)
            return None
        done = ann.get(contract.ANN_RESTORE_STATUS)
        try:
            prior = RestoreStatus.model_validate_json(done) if done else None
        except ValueError:
            prior = None  # unreadable (hand-edited): decide afresh
        if prior is not None and prior.result in ("restored", "cold-start"):
            if patch:
                self.kube.annotate_pod(ns, name, patch)
            return None
        uid = meta.get("uid", key)
        if not self._begin(key, uid):
            return None
        try:
            if prior is not None and prior.result == "restoring":
                self._cold_start(ns, name, cid, patch, "interrupted",
                                 "the restore was interrupted (agent restarted)")
                return None
            return self._restore(ns, name, str(wanted), meta, cid, compat, patch)
        finally:
            self._end(key, uid)

    def _pick(self, ns: str, workload: str | None, wanted: str,
              compat: Compat) -> tuple[Obj | None, str, str]:
        """(snapshot, reason code, message): the snapshot to restore, or why there is none."""
        if wanted == contract.RESTORE_LATEST:
            if not workload:
                return None, "no-compatible-snapshot", "pod has no workload label"
            doc = self.kube.list_snapshots(
                ns, label_selector=f"{contract.LABEL_WORKLOAD}={workload}")
            best: tuple[str, Obj] | None = None
            for snap in doc.get("items") or []:
                st = status_of(snap)
                sc = snapshot_compat(st)
                if st.phase != Phase.READY or sc is None or sc.mismatch(compat):
                    continue
                stamp = st.completed_at or ""
                if best is None or stamp > best[0]:
                    best = (stamp, snap)
            if best is None:
                return None, "no-compatible-snapshot", (
                    f"no Ready snapshot of workload {workload!r} matches this node "
                    f"({compat.gpu_model}, driver {compat.driver_version}, "
                    f"{compat.image_digest[:19]})")
            return best[1], "", ""
        try:
            snap = self.kube.get_snapshot(ns, wanted)
        except ApiException as exc:
            if exc.status == 404:
                return None, "no-compatible-snapshot", f"snapshot {wanted!r} does not exist"
            raise
        st = status_of(snap)
        if st.phase != Phase.READY:
            return None, "snapshot-not-ready", f"snapshot {wanted!r} is {st.phase.value}"
        sc = snapshot_compat(st)
        why = sc.mismatch(compat) if sc else "snapshot records no compatibility facts"
        if why:
            return None, "no-compatible-snapshot", f"snapshot {wanted!r} does not fit: {why}"
        return snap, "", ""

    def _restore(self, ns: str, name: str, wanted: str, meta: Obj, cid: str, compat: Compat,
                 patch: dict[str, str | None]) -> float | None:
        workload = (meta.get("labels") or {}).get(contract.LABEL_WORKLOAD)
        snap, reason, message = self._pick(ns, workload, wanted, compat)
        if snap is None:
            self._cold_start(ns, name, cid, patch, reason, message)
            return None
        snap_name = snap["metadata"]["name"]
        st, spec = status_of(snap), spec_of(snap)
        self.kube.annotate_pod(ns, name, {**patch, contract.ANN_RESTORE_STATUS: RestoreStatus(
            result="restoring", snapshot=snap_name, node=self.node).model_dump_json()})
        log.info("restoring %s/%s from snapshot %s", ns, name, snap_name)
        report = self.ops.restore_container(cid, st.store_key or f"{ns}.{snap_name}",
                                            spec.store or self.settings.default_store)
        if not report.ok:
            self._cold_start(ns, name, cid, {}, "restore-failed",
                             f"restore of {snap_name!r} failed: {report.error}",
                             snapshot=snap_name)
            return None
        self.metrics.restores.labels("restored", "").inc()
        self.metrics.restore_seconds.observe(report.seconds)
        self.kube.annotate_pod(ns, name, {contract.ANN_RESTORE_STATUS: RestoreStatus(
            result="restored", snapshot=snap_name, node=self.node,
            seconds=round(report.seconds, 3)).model_dump_json()})
        return None

    def _cold_start(self, ns: str, name: str, cid: str, patch: dict[str, str | None],
                    reason: str, message: str, snapshot: str | None = None) -> None:
        log.info("cold start of %s/%s: %s", ns, name, message)
        try:
            self.ops.cold_start(cid, message)
        # the placeholder's own deadline still cold-starts the pod
        except Exception as exc:  # noqa: BLE001
            log.warning("could not signal cold start to %s/%s (%s)", ns, name, exc)
        self.metrics.restores.labels("cold-start", reason).inc()
        self.kube.annotate_pod(ns, name, {**patch, contract.ANN_RESTORE_STATUS: RestoreStatus(
            result="cold-start", reason=reason, message=message, snapshot=snapshot,
            node=self.node).model_dump_json()})

    # --- checkpoint ------------------------------------------------------------------
    def reconcile_snapshot(self, key: str) -> float | None:
        snap = self.snapshots.get(key)
        if snap is None:
            return None
        st = status_of(snap)
        uid = snap["metadata"].get("uid", key)
        if st.node != self.node:
            return None
        if st.phase == Phase.CHECKPOINTING and st.claimed_by == self.node:
            if self._begin(key, uid):  # claimed before this process started: attempt lost
                try:
                    self._finish(key, lambda s: self._failed(
                        s, "Interrupted", "the agent restarted mid-checkpoint")
                        if s.phase == Phase.CHECKPOINTING else None)
                finally:
                    self._end(key, uid)
            return None
        if st.phase != Phase.PENDING or st.claimed_by:
            return None
        ns, _name = split_key(key)
        pod = self.pods.get(f"{ns}/{st.source_pod}")
        cs = running_container(pod, st.container) if pod else None
        if cs is None:
            return 1.0  # the controller bound a pod that is not running yet
        if not self._begin(key, uid):
            return None
        retry: float | None = None
        try:
            retry = self._checkpoint(snap, st, pod, cs)
            return retry
        finally:
            self._end(key, uid, finished=retry is None)

    def _checkpoint(self, snap: Obj, st: SnapshotStatus, pod: Obj | None,
                    cs: dict[str, Any]) -> float | None:
        ns, name = snap["metadata"]["namespace"], snap["metadata"]["name"]
        spec = spec_of(snap)
        st.phase = Phase.CHECKPOINTING
        st.claimed_by = self.node
        st.started_at = now()
        st.store_key = f"{ns}.{name}"
        st.image_digest = image_digest(str(cs.get("imageID") or ""))
        st.set_condition("Claimed", True, "AgentClaimed", f"agent on {self.node}")
        claim = {**snap, "status": st.wire()}
        try:
            self.kube.replace_snapshot_status(claim)  # carries the resourceVersion we read
        except ApiException as exc:
            if is_conflict(exc):
                log.info("snapshot %s/%s changed under us; re-reading", ns, name)
                return 0.2
            raise
        log.info("checkpointing %s/%s from pod %s", ns, name, st.source_pod)
        store = spec.store or self.settings.default_store
        try:
            report = self.ops.checkpoint_container(
                strip_runtime_prefix(cs["containerID"]), st.store_key, store,
                spec.options.wait_ready)
        except Exception as exc:  # noqa: BLE001 (any daemon failure fails the snapshot)
            report = OperationReport(id="", ok=False, error=str(exc))
        self.metrics.checkpoints.labels("ok" if report.ok else "failed").inc()
        compat = self.compat_of(cs)
        facts = self.facts()

        def done(s: SnapshotStatus) -> None:
            if not report.ok:
                self._failed(s, "CheckpointFailed", report.error or "unknown error")
                return
            s.phase = Phase.READY
            s.snapshot_id = report.snapshot_id
            s.size_bytes = report.size_bytes
            s.gpu_model = report.gpu_model or facts.gpu_model
            s.driver_version = report.driver_version or facts.driver_version
            s.arch = facts.arch
            s.compat_key = Compat(arch=facts.arch, gpu_model=s.gpu_model,
                                  driver_version=s.driver_version,
                                  image_digest=compat.image_digest).key()
            s.timings = [PhaseTimingStatus(name=k, seconds=round(v, 3))
                         for k, v in report.timings.items()]
            s.completed_at = now()
            s.set_condition("Ready", True, "CheckpointComplete", f"{report.seconds:.1f}s")

        self._finish(f"{ns}/{name}", done)
        return None

    @staticmethod
    def _failed(s: SnapshotStatus, reason: str, message: str) -> None:
        s.phase = Phase.FAILED
        s.failure_reason = reason
        s.message = message
        s.completed_at = now()
        s.set_condition("Ready", False, reason, message)

    def _finish(self, key: str, change: Any, attempts: int = 8) -> None:
        """Apply ``change`` to the freshest status; retry on 409 (we own it after the claim)."""
        ns, name = split_key(key)
        for _ in range(attempts):
            snap = self.kube.get_snapshot(ns, name)
            st = status_of(snap)
            change(st)
            try:
                self.kube.replace_snapshot_status({**snap, "status": st.wire()})
                return
            except ApiException as exc:
                if not is_conflict(exc):
                    raise
                time.sleep(0.05)
        raise RuntimeError(f"could not update snapshot {key} after {attempts} conflicts")


def run(settings: AgentSettings | None = None, *, ops: NodeOperations | None = None,
        host: str | None = None, kubeconfig: str | None = None,
        stop: threading.Event | None = None) -> None:
    """Entry point of ``warmstart agent`` (the k8s side): blocks until SIGTERM or ``stop``."""
    settings = settings or AgentSettings.from_env()
    kube = Kube(api_client(host=host, kubeconfig=kubeconfig))
    agent = NodeAgent(kube, ops or UnixSocketNodeOperations(settings.socket_path), settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=agent.metrics.registry)
    run_until_stopped(agent.stop, stop, agent.start)
