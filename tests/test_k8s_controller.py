"""The controller: binding Snapshots to source pods, and creating one per class."""

from __future__ import annotations

import json

import pytest
from k8s_fake.cluster import wait_for
from k8s_fake.system import H100, running_system

from warmstart.k8s import contract
from warmstart.k8s.controller import wants_snapshot


def _status(sys_, name):
    return (sys_.server.get("snapshots", "default", name) or {}).get("status") or {}


def _cond(st, type_):
    return next((c for c in st.get("conditions", []) if c["type"] == type_), None)


def test_selector_snapshot_waits_for_a_pod_then_binds_and_is_taken():
    with running_system() as sys_:
        sys_.start_controller()
        sys_.add_agent("n1", H100)
        sys_.server.create("snapshots", {
            "metadata": {"name": "manual", "namespace": "default"},
            "spec": {"source": {"selector": {"matchLabels": {"app": "llm"}},
                                "container": "worker"},
                     "options": {"waitReady": False}}})
        assert wait_for(lambda: _cond(_status(sys_, "manual"), "SourceBound") is not None)
        cond = _cond(_status(sys_, "manual"), "SourceBound")
        assert cond["status"] == "False" and cond["reason"] == "WaitingForPod"
        sys_.cluster.add_pod("llm-0", "n1")
        assert wait_for(lambda: _status(sys_, "manual").get("phase") == "Ready")
        st = _status(sys_, "manual")
        assert st["node"] == "n1" and st["sourcePod"] == "llm-0"
        assert st["gpuModel"] == H100.gpu_model and st["driverVersion"] == H100.driver_version
        assert st["imageDigest"] == "sha256:aaa" and st["sizeBytes"] > 0
        labels = sys_.server.get("snapshots", "default", "manual")["metadata"]["labels"]
        assert labels[contract.LABEL_NODE] == "n1" and labels[contract.LABEL_WORKLOAD] == "llm"
        assert _cond(st, "SourceBound")["status"] == "True"


def test_checkpoint_annotation_creates_one_snapshot_per_class():
    with running_system() as sys_:
        sys_.start_controller()
        sys_.add_agent("n1", H100)
        sys_.add_agent("n2", H100)
        ann = {contract.ANN_CHECKPOINT: contract.CHECKPOINT_WHEN_READY}
        for i, node in enumerate(["n1", "n2", "n1"]):
            sys_.cluster.add_pod(f"llm-{i}", node, annotations=ann)
            sys_.cluster.set_ready(f"llm-{i}", how="cold")
        assert wait_for(lambda: any(s.get("status", {}).get("phase") == "Ready"
                                    for s in sys_.cluster.snapshots()))
        snaps = sys_.cluster.snapshots()
        assert len(snaps) == 1 and snaps[0]["metadata"]["name"].startswith("llm-")
        assert len(sys_.cluster.store.checkpoints) == 1


def test_failed_snapshot_is_not_retried_automatically():
    with running_system() as sys_:
        sys_.cluster.add_pod("src", "n1", annotations={
            contract.ANN_CHECKPOINT: contract.CHECKPOINT_WHEN_READY})
        sys_.server.mutate("pods", "default", "src", lambda o: o["status"][
            "containerStatuses"][0].update(containerID="containerd://ghost-cid"))
        sys_.start_controller()
        sys_.add_agent("n1", H100)
        assert wait_for(lambda: [s.get("status", {}).get("phase")
                                 for s in sys_.cluster.snapshots()] == ["Failed"])
        sys_.server.mutate("pods", "default", "src", lambda o: o["metadata"][
            "annotations"].update(poke="1"))  # more pod events do not make a second one
        wait_for(lambda: False, timeout=0.5)
        assert len(sys_.cluster.snapshots()) == 1
        # the operator fixes the pod and deletes the Failed snapshot: a new one is taken
        (failed,) = sys_.cluster.snapshots()
        sys_.server.mutate("pods", "default", "src", lambda o: o["status"][
            "containerStatuses"][0].update(containerID="containerd://src-cid"))
        sys_.cluster.set_ready("src", how="cold")
        sys_.server.delete("snapshots", "default", failed["metadata"]["name"])
        assert wait_for(lambda: [s.get("status", {}).get("phase")
                                 for s in sys_.cluster.snapshots()] == ["Ready"])
        assert sys_.cluster.snapshots()[0]["metadata"]["uid"] != failed["metadata"]["uid"]


def test_pod_name_source_that_does_not_exist_waits_with_reason():
    with running_system() as sys_:
        sys_.start_controller()
        sys_.server.create("snapshots", {
            "metadata": {"name": "s", "namespace": "default"},
            "spec": {"source": {"podName": "ghost"}}})
        assert wait_for(lambda: _cond(_status(sys_, "s"), "SourceBound") is not None)
        assert "not found" in _cond(_status(sys_, "s"), "SourceBound")["message"]
        assert _status(sys_, "s")["phase"] == "Pending"


def test_invalid_spec_fails_with_one_line_message():
    with running_system() as sys_:
        sys_.start_controller()
        sys_.server.create("snapshots", {
            "metadata": {"name": "bad", "namespace": "default"},
            "spec": {"source": {"podName": 7, "selector": "x"}}})
        assert wait_for(lambda: _status(sys_, "bad").get("phase") == "Failed")
        st = _status(sys_, "bad")
        assert st["failureReason"] == "InvalidSpec" and "\n" not in st["message"]
        assert st["message"].startswith("spec.source.")


@pytest.mark.parametrize("ann,expected", [
    ({contract.ANN_CHECKPOINT: "when-ready"}, True),
    ({contract.ANN_RESTORE: "latest"}, False),
    ({contract.ANN_RESTORE: "latest", contract.ANN_RESTORE_STATUS: json.dumps(
        {"result": "cold-start", "reason": "no-compatible-snapshot"})}, True),
    ({contract.ANN_RESTORE: "latest", contract.ANN_CHECKPOINT: "never",
      contract.ANN_RESTORE_STATUS: json.dumps(
          {"result": "cold-start", "reason": "no-compatible-snapshot"})}, False),
    ({contract.ANN_RESTORE: "latest", contract.ANN_RESTORE_STATUS: json.dumps(
        {"result": "cold-start", "reason": "restore-failed"})}, False),
    ({contract.ANN_RESTORE: "latest", contract.ANN_RESTORE_STATUS: "{not json"}, False),
])
def test_which_pods_get_snapshotted(ann, expected):
    assert wants_snapshot({"metadata": {"annotations": ann}}) is expected
