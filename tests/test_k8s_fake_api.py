"""The fake API server behaves like the real one where warmstart depends on it.

These drive the fake with the official client, so a fake that drifted from the client's
expectations (paths, chunked watch framing, Status bodies) fails here first.
"""

from __future__ import annotations

import threading
import time

import pytest
from k8s_fake import FakeApiServer
from kubernetes.client.rest import ApiException

from warmstart.k8s import contract
from warmstart.k8s.kube import Informer, Kube, api_client


def _pod(name: str, node: str, labels: dict[str, str] | None = None) -> dict:
    return {"metadata": {"name": name, "namespace": "default", "labels": labels or {}},
            "spec": {"nodeName": node, "containers": [{"name": "w", "image": "x"}]},
            "status": {"phase": "Pending"}}


def _snap(name: str) -> dict:
    return {"apiVersion": contract.API_VERSION, "kind": "Snapshot",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"source": {"podName": "p"}}}


@pytest.fixture
def server():
    with FakeApiServer() as srv:
        yield srv


@pytest.fixture
def kube(server):
    return Kube(api_client(host=server.url))


def test_create_get_and_already_exists(server, kube):
    kube.create_snapshot(_snap("a"))
    got = kube.get_snapshot("default", "a")
    assert got["spec"]["source"]["podName"] == "p"
    with pytest.raises(ApiException) as exc:
        kube.create_snapshot(_snap("a"))
    assert exc.value.status == 409
    with pytest.raises(ApiException) as exc:
        kube.get_snapshot("default", "missing")
    assert exc.value.status == 404


def test_replace_status_with_stale_resource_version_conflicts(server, kube):
    first = kube.create_snapshot(_snap("a"))
    ok = kube.replace_snapshot_status({**first, "status": {"phase": "Checkpointing"}})
    assert ok["status"]["phase"] == "Checkpointing"
    assert int(ok["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    with pytest.raises(ApiException) as exc:  # second writer still holds the old version
        kube.replace_snapshot_status({**first, "status": {"phase": "Failed"}})
    assert exc.value.status == 409
    assert kube.get_snapshot("default", "a")["status"]["phase"] == "Checkpointing"


def test_main_resource_update_ignores_status(server, kube):
    first = kube.create_snapshot(_snap("a"))
    first = kube.replace_snapshot_status({**first, "status": {"phase": "Ready"}})
    upd = kube.replace_snapshot({**first, "metadata": {**first["metadata"], "labels": {"x": "1"}},
                                 "status": {"phase": "Failed"}})
    assert upd["metadata"]["labels"] == {"x": "1"}
    assert upd["status"]["phase"] == "Ready"


def test_field_and_label_selectors(server, kube):
    server.create("pods", _pod("a", "n1", {contract.LABEL_WORKLOAD: "w"}))
    server.create("pods", _pod("b", "n2", {contract.LABEL_WORKLOAD: "w"}))
    server.create("pods", _pod("c", "n1"))
    names = [p["metadata"]["name"] for p in kube.list_pods(
        field_selector="spec.nodeName=n1", label_selector=contract.LABEL_WORKLOAD)["items"]]
    assert names == ["a"]


def test_strategic_merge_patch_of_annotations(server, kube):
    server.create("pods", _pod("a", "n1"))
    kube.annotate_pod("default", "a", {"k1": "v1"})
    kube.annotate_pod("default", "a", {"k2": "v2"})
    kube.annotate_pod("default", "a", {"k1": None})
    assert server.get("pods", "default", "a")["metadata"]["annotations"] == {"k2": "v2"}


def _collect(server, kube, *, selector=None):
    seen: list[tuple[str, str]] = []
    stop = threading.Event()
    inf = Informer("t", kube.core.list_pod_for_all_namespaces,
                   lambda kind, o: seen.append((kind, o["metadata"]["name"])),
                   stop=stop, field_selector=selector, watch_timeout=2, backoff=0.05)
    inf.start()
    assert inf.synced.wait(5)
    return inf, seen, stop


def _wait(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_informer_watch_stream_sees_changes_in_order(server, kube):
    server.create("pods", _pod("a", "n1"))
    inf, seen, stop = _collect(server, kube, selector="spec.nodeName=n1")
    try:
        server.create("pods", _pod("b", "n1"))
        server.create("pods", _pod("other", "n2"))
        server.mutate("pods", "default", "b", lambda o: o["status"].update(phase="Running"))
        server.delete("pods", "default", "a")
        assert _wait(lambda: ("DELETED", "a") in seen)
        assert ("ADDED", "b") in seen and ("MODIFIED", "b") in seen
        assert all(name != "other" for _, name in seen)
        assert inf.get("default/b")["status"]["phase"] == "Running"
        assert inf.get("default/a") is None
    finally:
        stop.set()


def test_informer_relists_after_410_gone(server, kube):
    inf, _seen, stop = _collect(server, kube, selector="spec.nodeName=n1")
    try:
        assert inf.relists == 1
        server.create("pods", _pod("late", "n1"))  # the running watch delivers it
        assert _wait(lambda: inf.get("default/late") is not None)
        # a change outside the selector, then compaction: the informer's version is gone
        server.create("pods", _pod("unseen", "n2"))
        server.compact()
        before = server.stats["gone"]
        assert _wait(lambda: server.stats["gone"] > before, timeout=6)
        server.create("pods", _pod("after", "n1"))
        assert _wait(lambda: inf.get("default/after") is not None)
        assert inf.relists >= 2
        assert inf.get("default/unseen") is None
    finally:
        stop.set()


def test_watch_from_current_version_survives_compaction(server, kube):
    inf, _seen, stop = _collect(server, kube)
    try:
        server.compact()  # nothing newer than the informer's version was dropped
        server.create("pods", _pod("x", "n1"))
        assert _wait(lambda: inf.get("default/x") is not None)
        assert server.stats["gone"] == 0 and inf.relists == 1
    finally:
        stop.set()
