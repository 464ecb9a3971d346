"""The warmstart controller: decides which snapshots should exist; never moves a byte.

* A ``Snapshot`` that names a source (``spec.source.podName`` or a label ``selector``) is
  *bound*: the controller picks the pod, labels the Snapshot ``warmstart.dev/node=<node>`` and
  sets ``status.node``/``sourcePod``. The agent on that node claims it and checkpoints locally.
* An opted-in pod that should be snapshotted — ``checkpoint: when-ready``, or a
  ``restore: latest`` pod that cold-started because nothing compatible existed — gets a
  Snapshot named ``<workload>-<compat hash>`` unless its workload already has one for that
  compatibility class. The deterministic name makes a second create a harmless 409, so one
  class is snapshotted once however many pods cold-start at the same time.

The controller is off the restore path entirely: agents pick snapshots themselves, so a
scale-out of many pods costs the controller nothing but a few pod events.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.rest import ApiException
from prometheus_client import CollectorRegistry, Counter, start_http_server
from pydantic import ValidationError

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
from warmstart.k8s.nodeagent import running_container, target_container
from warmstart.k8s.resources import (
    Compat,
    Phase,
    RestoreStatus,
    SnapshotSpec,
    Source,
    new_snapshot,
    snapshot_name_for,
    spec_of,
    status_of,
)
from warmstart.k8s.settings import ControllerSettings

log = logging.getLogger(__name__)


@dataclass
class ControllerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self.created = Counter("warmstart_controller_snapshots_created",
                               "Snapshots the controller created", ["trigger"],
                               registry=self.registry)
        self.bound = Counter("warmstart_controller_snapshots_bound",
                             "Snapshots bound to a source pod", registry=self.registry)


def _labels_match(labels: dict[str, str], match: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in match.items())


def wants_snapshot(pod: Obj) -> bool:
    """Should this pod be the source of its class's snapshot (if the class has none)?"""
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    mode = ann.get(contract.ANN_CHECKPOINT)
    if mode == contract.CHECKPOINT_WHEN_READY:
        return True
    if mode == contract.CHECKPOINT_NEVER or contract.ANN_RESTORE not in ann:
        return False
    raw = ann.get(contract.ANN_RESTORE_STATUS)
    if not raw:
        return False
    try:
        rs = RestoreStatus.model_validate_json(raw)
    except ValueError:
        return False
    return rs.result == "cold-start" and rs.reason == "no-compatible-snapshot"


class Controller:
    def __init__(self, kube: Kube, settings: ControllerSettings | None = None, *,
                 metrics: ControllerMetrics | None = None) -> None:
        self.kube = kube
        self.settings = settings or ControllerSettings()
        self.metrics = metrics or ControllerMetrics()
        self.stop = threading.Event()
        ns = self.settings.namespace
        core, custom = kube.core, kube.custom
        if ns:
            def list_pods(**kw: Any) -> Any:
                return core.list_namespaced_pod(ns, **kw)

            def list_snaps(**kw: Any) -> Any:
                return custom.list_namespaced_custom_object(
                    contract.GROUP, contract.VERSION, ns, contract.PLURAL, **kw)
        else:
            list_pods = core.list_pod_for_all_namespaces

            def list_snaps(**kw: Any) -> Any:
                return custom.list_cluster_custom_object(
                    contract.GROUP, contract.VERSION, contract.PLURAL, **kw)
        timeout = self.settings.watch_timeout
        self.pods = Informer("pods", list_pods, self._on_pod, stop=self.stop,
                             label_selector=contract.LABEL_WORKLOAD, watch_timeout=timeout)
        self.snapshots = Informer("snapshots", list_snaps, self._on_snapshot, stop=self.stop,
                                  watch_timeout=timeout)
        self.queue = WorkQueue(self.reconcile, workers=self.settings.workers, stop=self.stop,
                               name="controller")

    def start(self) -> None:
        self.queue.start()
        self.snapshots.start()
        self.pods.start()

    # events only enqueue keys; "pod:" and "snap:" keep the two kinds apart
    def _on_pod(self, kind: str, pod: Obj) -> None:
        if kind == "DELETED":
            return
        self.queue.add("pod:" + key_of(pod))
        ns = pod["metadata"].get("namespace")
        for snap in self.snapshots.items():  # unbound selector snapshots may now bind
            if snap["metadata"].get("namespace") == ns and not status_of(snap).node:
                self.queue.add("snap:" + key_of(snap))

    def _on_snapshot(self, kind: str, snap: Obj) -> None:
        if kind != "DELETED":
            self.queue.add("snap:" + key_of(snap))
            return
        # a deleted snapshot (e.g. a Failed one removed by an operator) may be owed again
        meta = snap["metadata"]
        workload = (meta.get("labels") or {}).get(contract.LABEL_WORKLOAD)
        for pod in self.pods.items():
            pm = pod["metadata"]
            if pm.get("namespace") == meta.get("namespace") and \
                    (pm.get("labels") or {}).get(contract.LABEL_WORKLOAD) == workload:
                self.queue.add("pod:" + key_of(pod))

    def reconcile(self, item: str) -> float | None:
        kind, _, key = item.partition(":")
        return self.reconcile_pod(key) if kind == "pod" else self.reconcile_snapshot(key)

    # --- pods -> Snapshot objects ---------------------------------------------------
    def reconcile_pod(self, key: str) -> float | None:
        pod = self.pods.get(key)
        if pod is None or not wants_snapshot(pod):
            return None
        meta = pod["metadata"]
        ann = meta.get("annotations") or {}
        compat = Compat.from_key(ann.get(contract.ANN_COMPAT_KEY, ""))
        if compat is None:
            return None  # the node agent has not looked at the pod yet
        workload = meta["labels"][contract.LABEL_WORKLOAD]
        ns = meta["namespace"]
        name = snapshot_name_for(workload, compat)
        for snap in self.snapshots.items():
            m = snap["metadata"]
            if m.get("namespace") != ns:
                continue
            if m["name"] == name:
                return None
            st = status_of(snap)
            if (m.get("labels") or {}).get(contract.LABEL_WORKLOAD) == workload and \
                    st.compat_key == compat.key() and st.phase != Phase.FAILED:
                return None  # a user-made snapshot already covers this class
        trigger = "checkpoint" if ann.get(contract.ANN_CHECKPOINT) == \
            contract.CHECKPOINT_WHEN_READY else "cold-start"
        spec = SnapshotSpec(source=Source(pod_name=meta["name"],
                                          container=target_container(pod)),
                            workload=workload)
        body = new_snapshot(name, ns, spec, labels={
            contract.LABEL_WORKLOAD: workload, contract.LABEL_COMPAT: compat.short(),
            contract.LABEL_MANAGED_BY: contract.MANAGER})
        try:
            self.kube.create_snapshot(body)
        except ApiException as exc:
            if is_conflict(exc):  # AlreadyExists: someone (us, a moment ago) made it
                return None
            raise
        self.metrics.created.labels(trigger).inc()
        log.info("created snapshot %s/%s from pod %s (%s)", ns, name, meta["name"], trigger)
        return None

    # --- binding ---------------------------------------------------------------------
    def _source_pod(self, ns: str, spec: SnapshotSpec) -> tuple[Obj | None, str]:
        src = spec.source
        if src.pod_name:
            pod = self.pods.get(f"{ns}/{src.pod_name}")
            if pod is None:
                try:
                    pod = self.kube.get_pod(ns, src.pod_name)
                except ApiException as exc:
                    if exc.status == 404:
                        return None, f"pod {src.pod_name!r} not found"
                    raise
            return pod, ""
        if src.selector is None or not src.selector.match_labels:
            return None, "spec.source names neither podName nor selector.matchLabels"
        pods = [p for p in self.pods.items() if p["metadata"].get("namespace") == ns
                and _labels_match(p["metadata"].get("labels") or {},
                                  src.selector.match_labels)
                and running_container(p, src.container or target_container(p))]
        if not pods:
            return None, "no running pod matches the selector"
        pods.sort(key=lambda p: p["metadata"].get("creationTimestamp", ""))
        return pods[0], ""

    def reconcile_snapshot(self, key: str) -> float | None:
        snap = self.snapshots.get(key)
        if snap is None:
            return None
        st = status_of(snap)
        if st.node or st.phase != Phase.PENDING:
            return None
        ns, _name = split_key(key)
        try:
            spec = spec_of(snap)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            message = f"spec.{where}: {first['msg']}"
            return self._set_status(snap, lambda s: self._invalid(s, message))
        pod, why = self._source_pod(ns, spec)
        container = spec.source.container or (target_container(pod) if pod else None)
        if pod is None or not (pod.get("spec") or {}).get("nodeName") or \
                running_container(pod, container) is None:
            why = why or f"pod {pod['metadata']['name']!r} is not running yet"
            return self._set_status(snap, lambda s: s.set_condition(
                "SourceBound", False, "WaitingForPod", why))
        node = pod["spec"]["nodeName"]
        workload = spec.workload or (pod["metadata"].get("labels") or {}).get(
            contract.LABEL_WORKLOAD, "")
        labels = dict(snap["metadata"].get("labels") or {})
        if labels.get(contract.LABEL_NODE) != node or (
                workload and labels.get(contract.LABEL_WORKLOAD) != workload):
            labels[contract.LABEL_NODE] = node
            if workload:
                labels[contract.LABEL_WORKLOAD] = workload
            try:
                snap = self.kube.replace_snapshot(
                    {**snap, "metadata": {**snap["metadata"], "labels": labels}})
            except ApiException as exc:
                if is_conflict(exc):
                    return 0.2
                raise

        def bind(s: Any) -> None:
            s.node, s.source_pod, s.container = node, pod["metadata"]["name"], container
            s.set_condition("SourceBound", True, "PodSelected",
                            f"pod {pod['metadata']['name']} on {node}")

        self.metrics.bound.inc()
        return self._set_status(snap, bind)

    @staticmethod
    def _invalid(s: Any, message: str) -> None:
        s.phase = Phase.FAILED
        s.failure_reason = "InvalidSpec"
        s.message = message

    def _set_status(self, snap: Obj, change: Any) -> float | None:
        st = status_of(snap)
        before = json.dumps(st.wire(), sort_keys=True)
        change(st)
        if json.dumps(st.wire(), sort_keys=True) == before:
            return None
        try:
            self.kube.replace_snapshot_status({**snap, "status": st.wire()})
        except ApiException as exc:
            if is_conflict(exc):
                return 0.2  # re-read from the cache and try again
            if exc.status == 404:
                return None
            raise
        return None


def run(settings: ControllerSettings | None = None, *, host: str | None = None,
        kubeconfig: str | None = None, stop: threading.Event | None = None) -> None:
    """Entry point of ``warmstart controller``: blocks until SIGTERM or ``stop``."""
    settings = settings or ControllerSettings.from_env()
    ctl = Controller(Kube(api_client(host=host, kubeconfig=kubeconfig)), settings)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=ctl.metrics.registry)
    run_until_stopped(ctl.stop, stop, ctl.start)
