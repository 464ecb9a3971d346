"""The node agent against the fake API server: restore decisions, claims, failures."""

from __future__ import annotations

import json

from k8s_fake.cluster import FakeNodeOps, StoredSnapshot, wait_for
from k8s_fake.system import A100, H100, kube_for, running_system

from warmstart.k8s import contract
from warmstart.k8s.nodeagent import NodeAgent
from warmstart.k8s.resources import Compat, status_of
from warmstart.k8s.settings import AgentSettings

IMAGE = "registry.example/llm@sha256:aaa"


def _ready_snapshot(sys_, name="llm-snap", facts=H100, image=IMAGE, node="gpu-x"):
    """A Ready snapshot in the API and on shared storage, as if taken earlier."""
    compat = Compat(arch=facts.arch, gpu_model=facts.gpu_model,
                    driver_version=facts.driver_version, image_digest="sha256:aaa")
    obj = sys_.server.create("snapshots", {
        "metadata": {"name": name, "namespace": "default",
                     "labels": {contract.LABEL_WORKLOAD: "llm"}},
        "spec": {"source": {"podName": "gone"}, "workload": "llm"}})
    key = f"default.{name}"
    sys_.server.mutate("snapshots", "default", name, lambda o: o.update(status={
        "phase": "Ready", "node": node, "storeKey": key, "compatKey": compat.key(),
        "gpuModel": facts.gpu_model, "driverVersion": facts.driver_version,
        "completedAt": "2026-01-01T00:00:00Z"}))
    sys_.cluster.store.snapshots[key] = StoredSnapshot(
        key, node, facts.gpu_model, facts.driver_version, facts.arch, image, 1)
    return obj


def _rs(sys_, pod):
    raw = sys_.server.get("pods", "default", pod)["metadata"]["annotations"].get(
        contract.ANN_RESTORE_STATUS)
    return json.loads(raw) if raw else None


def test_named_restore_restores_and_records_compat_key():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        sys_.add_agent("n1", H100)
        sys_.cluster.add_pod("p", "n1", annotations={contract.ANN_RESTORE: "llm-snap"})
        assert wait_for(lambda: (_rs(sys_, "p") or {}).get("result") == "restored")
        assert sys_.cluster.started["p"] == "restored"
        assert sys_.ops["n1"].calls.count("restore default.llm-snap") == 1
        ann = sys_.server.get("pods", "default", "p")["metadata"]["annotations"]
        assert ann[contract.ANN_COMPAT_KEY].startswith("x86_64|NVIDIA H100")
        # only this node's pods are watched
        pod_watches = [q for m, p, q, ua in sys_.server.requests
                       if ua == "warmstart-agent/n1" and p == "/api/v1/pods"]
        assert pod_watches and all(q["fieldSelector"] == ["spec.nodeName=n1"]
                                   for q in pod_watches)


def test_incompatible_named_snapshot_cold_starts_without_restoring():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        sys_.add_agent("old", A100)
        sys_.cluster.add_pod("p", "old", annotations={contract.ANN_RESTORE: "llm-snap"})
        assert wait_for(lambda: _rs(sys_, "p") is not None)
        rs = _rs(sys_, "p")
        assert rs["result"] == "cold-start" and rs["reason"] == "no-compatible-snapshot"
        assert "gpu_model" in rs["message"]
        assert not any(c.startswith("restore") for c in sys_.ops["old"].calls)
        assert wait_for(lambda: sys_.cluster.started.get("p") == "cold")


def test_other_image_digest_is_incompatible():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        sys_.add_agent("n1", H100)
        sys_.cluster.add_pod("p", "n1", annotations={contract.ANN_RESTORE: "latest"},
                             image_id="registry.example/llm@sha256:bbb")
        assert wait_for(lambda: _rs(sys_, "p") is not None)
        assert _rs(sys_, "p")["reason"] == "no-compatible-snapshot"
        assert sys_.cluster.store.restores == []


def test_missing_snapshot_cold_starts():
    with running_system() as sys_:
        sys_.add_agent("n1", H100)
        sys_.cluster.add_pod("p", "n1", annotations={contract.ANN_RESTORE: "nope"})
        assert wait_for(lambda: _rs(sys_, "p") is not None)
        assert "does not exist" in _rs(sys_, "p")["message"]
        assert wait_for(lambda: sys_.cluster.started.get("p") == "cold")


def test_failed_restore_falls_back_to_cold_start():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        sys_.add_agent("n1", H100, fail_restore=True)
        sys_.cluster.add_pod("p", "n1", annotations={contract.ANN_RESTORE: "latest"})
        assert wait_for(lambda: (_rs(sys_, "p") or {}).get("result") == "cold-start")
        rs = _rs(sys_, "p")
        assert rs["reason"] == "restore-failed" and "injected" in rs["message"]
        assert wait_for(lambda: sys_.cluster.started.get("p") == "cold")


def test_interrupted_restore_is_cold_started_after_agent_restart():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        sys_.cluster.add_pod("p", "n1", annotations={
            contract.ANN_RESTORE: "latest",
            contract.ANN_RESTORE_STATUS: json.dumps({"result": "restoring"})})
        sys_.add_agent("n1", H100)
        assert wait_for(lambda: (_rs(sys_, "p") or {}).get("result") == "cold-start")
        assert _rs(sys_, "p")["reason"] == "interrupted"
        assert sys_.cluster.store.restores == []


def test_pod_not_annotated_is_left_alone_but_gets_compat_key():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        sys_.add_agent("n1", H100)
        sys_.cluster.add_pod("p", "n1")
        assert wait_for(lambda: contract.ANN_COMPAT_KEY in sys_.server.get(
            "pods", "default", "p")["metadata"]["annotations"])
        assert _rs(sys_, "p") is None and sys_.ops["n1"].cold_starts == []


def test_pods_keep_restoring_after_watch_expires_410():
    with running_system() as sys_:
        _ready_snapshot(sys_)
        agent = sys_.add_agent("n1", H100)
        # a change the agent does not watch (another node), then history is compacted:
        # the agent's next watch resumes from a version that is gone
        sys_.cluster.add_pod("elsewhere", "n9", running=False)
        sys_.server.compact()
        assert wait_for(lambda: agent.pods.relists >= 2 and agent.snapshots.relists >= 2,
                        timeout=12)
        assert sys_.server.stats["gone"] >= 2
        sys_.cluster.add_pod("p", "n1", annotations={contract.ANN_RESTORE: "latest"})
        assert wait_for(lambda: (_rs(sys_, "p") or {}).get("result") == "restored")
        assert agent.pods.relists >= 2


def _bound_snapshot(sys_, name, pod, node):
    sys_.server.create("snapshots", {
        "metadata": {"name": name, "namespace": "default",
                     "labels": {contract.LABEL_NODE: node, contract.LABEL_WORKLOAD: "llm"}},
        "spec": {"source": {"podName": pod}, "workload": "llm"}})
    sys_.server.mutate("snapshots", "default", name, lambda o: o.update(status={
        "phase": "Pending", "node": node, "sourcePod": pod, "container": "worker"}))


def test_claim_is_exclusive_even_with_two_agents_for_one_node():
    with running_system() as sys_:
        sys_.cluster.add_pod("src", "n1")
        sys_.cluster.set_ready("src", how="cold")
        # two agents that both believe they run on n1 (e.g. a rollout overlap): both see
        # the Pending snapshot at the same moment; the resourceVersion decides
        for i in range(2):
            sys_.add_agent("n1", H100, name=f"n1-{i}", checkpoint_seconds=0.3)
        for i in range(3):
            _bound_snapshot(sys_, f"s{i}", "src", "n1")
        assert wait_for(lambda: all(
            (sys_.server.get("snapshots", "default", f"s{i}").get("status") or {}).get(
                "phase") == "Ready" for i in range(3)))
        taken = sorted(k for k, _ in sys_.cluster.store.checkpoints)
        assert taken == ["default.s0", "default.s1", "default.s2"]


def test_a_claim_from_a_stale_read_loses_with_409_and_never_checkpoints():
    with running_system() as sys_:
        sys_.cluster.add_pod("src", "n1")
        sys_.cluster.set_ready("src", how="cold")
        _bound_snapshot(sys_, "s1", "src", "n1")
        agents = []
        for name in ("a", "b"):  # not started: we drive the claim by hand
            ops = FakeNodeOps(sys_.cluster, "n1", H100, checkpoint_seconds=0)
            agents.append((NodeAgent(kube_for(sys_.server, name), ops, AgentSettings(
                node_name="n1", metrics_port=0)), ops))
        snap = sys_.server.get("snapshots", "default", "s1")  # both read the same version
        pod = sys_.server.get("pods", "default", "src")
        cs = pod["status"]["containerStatuses"][0]
        (a, _a_ops), (b, b_ops) = agents
        assert a._checkpoint(dict(snap), status_of(snap), pod, cs) is None
        assert b._checkpoint(dict(snap), status_of(snap), pod, cs) == 0.2  # retry later
        assert sys_.server.stats["conflicts"] == 1
        assert [c for c in b_ops.calls if c.startswith("checkpoint")] == []
        assert sys_.cluster.store.checkpoints == [("default.s1", "n1")]
        st = sys_.server.get("snapshots", "default", "s1")["status"]
        assert st["phase"] == "Ready" and st["claimedBy"] == "n1"


def test_claim_conflict_is_retried_and_checkpoints_once():
    with running_system() as sys_:
        sys_.cluster.add_pod("src", "n1")
        sys_.cluster.set_ready("src", how="cold")
        sys_.server.fail_next("PUT", r"/snapshots/s1/status$", 409)
        sys_.add_agent("n1", H100)
        _bound_snapshot(sys_, "s1", "src", "n1")
        assert wait_for(lambda: (sys_.server.get("snapshots", "default", "s1").get("status")
                                 or {}).get("phase") == "Ready")
        st = sys_.server.get("snapshots", "default", "s1")["status"]
        assert st["claimedBy"] == "n1" and st["sizeBytes"] == 3 << 30
        assert st["imageDigest"] == "sha256:aaa"
        assert {t["name"] for t in st["timings"]} == {"dump", "upload"}
        assert sys_.server.stats["conflicts"] == 1
        assert [k for k, _ in sys_.cluster.store.checkpoints] == ["default.s1"]


def test_failed_checkpoint_marks_snapshot_failed_with_reason():
    with running_system() as sys_:
        sys_.cluster.add_pod("src", "n1")
        # the pod is said to be on n1 but the daemon finds no such container
        sys_.server.mutate("pods", "default", "src", lambda o: o["status"][
            "containerStatuses"][0].update(containerID="containerd://ghost-cid"))
        sys_.add_agent("n1", H100)
        _bound_snapshot(sys_, "s1", "src", "n1")
        assert wait_for(lambda: (sys_.server.get("snapshots", "default", "s1").get("status")
                                 or {}).get("phase") == "Failed")
        st = sys_.server.get("snapshots", "default", "s1")["status"]
        assert st["failureReason"] == "CheckpointFailed"
        assert "no such container" in st["message"]
        ready = [c for c in st["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "False"
