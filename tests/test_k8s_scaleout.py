"""Scale-out 1 -> 8 replicas across 4 nodes, one of them with a different GPU.

The first replica cold-starts (no snapshot yet) and is snapshotted once it is checkpoint-ready.
Then 7 more pods land on 4 nodes at once: the agents of the 3 compatible nodes restore in
parallel from shared storage; the incompatible node cold-starts its pods and gets exactly one
snapshot of its own class. The controller does no per-pod work on the restore path.
"""

from __future__ import annotations

import json
import time
from collections import Counter

from k8s_fake.cluster import wait_for
from k8s_fake.system import A100, H100, running_system

from warmstart.k8s import contract

TEMPLATE = {contract.ANN_CHECKPOINT: contract.CHECKPOINT_WHEN_READY,
            contract.ANN_RESTORE: contract.RESTORE_LATEST}
NODES = {"gpu-a": H100, "gpu-b": H100, "gpu-c": H100, "gpu-old": A100}


def _restore_status(server, name):
    pod = server.get("pods", "default", name)
    raw = pod["metadata"]["annotations"].get(contract.ANN_RESTORE_STATUS)
    return json.loads(raw) if raw else None


def test_scale_out_1_to_8_restores_in_parallel_and_never_twice():
    with running_system() as sys_:
        server, cluster = sys_.server, sys_.cluster
        sys_.start_controller()
        for node, facts in NODES.items():
            sys_.add_agent(node, facts, restore_seconds=0.4, max_parallel=4)

        # replica 1: nothing to restore -> cold start -> controller asks for a snapshot
        cluster.add_pod("llm-0", "gpu-a", annotations=TEMPLATE)
        assert wait_for(lambda: any(s.get("status", {}).get("phase") == "Ready"
                                    for s in cluster.snapshots()), timeout=20), \
            cluster.snapshots()
        assert cluster.started["llm-0"] == "cold"
        (first,) = cluster.snapshots()
        assert first["status"]["node"] == "gpu-a"
        assert first["status"]["gpuModel"] == H100.gpu_model

        # scale to 8: the scheduler spreads 7 new pods over 4 nodes, kubelets start them at once
        placement = {f"llm-{i}": list(NODES)[i % 4] for i in range(1, 8)}
        for name, node in placement.items():
            cluster.add_pod(name, node, annotations=TEMPLATE, running=False)
        t0 = time.monotonic()
        for name in placement:
            cluster.run_pod(name)

        all_pods = ["llm-0", *placement]
        assert wait_for(lambda: all(cluster.is_ready({"metadata": {"name": n}})
                                    for n in all_pods), timeout=30), cluster.started
        restore_wall = time.monotonic() - t0

        store = cluster.store
        assert store.violations == []
        # every pod on an H100 node was restored; the A100 pods cold-started
        for name, node in placement.items():
            rs = _restore_status(server, name)
            if node == "gpu-old":
                assert cluster.started[name] == "cold"
                assert rs["result"] == "cold-start" and rs["reason"] == "no-compatible-snapshot"
            else:
                assert cluster.started[name] == "restored", (name, rs)
                assert rs["result"] == "restored" and rs["snapshot"] == first["metadata"]["name"]
        restored_nodes = Counter(node for _, node, _ in store.restores)
        assert restored_nodes == {"gpu-a": 1, "gpu-b": 2, "gpu-c": 2}
        assert "gpu-old" not in restored_nodes

        # agents worked in parallel: restores on different nodes overlapped in time
        overlaps = {(a[0], b[0]) for a in store.intervals for b in store.intervals
                    if a[0] < b[0] and a[1] < b[2] and b[1] < a[2]}
        assert len({n for pair in overlaps for n in pair}) >= 3, store.intervals
        assert restore_wall < 5 * 0.4 + 3  # far below 5 serial restores + overheads

        # the A100 class gets exactly one snapshot, however many of its pods cold-started
        assert wait_for(lambda: sum(1 for s in cluster.snapshots()
                                    if s.get("status", {}).get("phase") == "Ready") == 2,
                        timeout=20), cluster.snapshots()
        snaps = cluster.snapshots()
        assert len(snaps) == 2
        by_gpu = {s["status"]["gpuModel"]: s for s in snaps}
        assert by_gpu[A100.gpu_model]["status"]["node"] == "gpu-old"
        # no snapshot was ever taken twice
        taken = Counter(key for key, _ in store.checkpoints)
        assert all(n == 1 for n in taken.values()) and len(taken) == 2, taken

        # the controller stayed off the restore path: it never touched a pod
        ctl_writes = [(m, p) for m, p, _, ua in server.requests
                      if ua == "warmstart-controller" and m != "GET"]
        assert not any("/pods" in p for _, p in ctl_writes), ctl_writes
        # two snapshots created; a racing second create of the same name is a harmless 409
        reg = sys_.controller.metrics.registry
        created = sum(reg.get_sample_value("warmstart_controller_snapshots_created_total",
                                           {"trigger": t}) or 0 for t in ("checkpoint",
                                                                          "cold-start"))
        assert created == 2
        posts = [p for m, p in ctl_writes if m == "POST"]
        assert 2 <= len(posts) <= 3  # at most one extra, from the second A100 pod
