"""CRI-O discovery against a stand-in for CRI-O's inspect API, with real runc containers.

Debian has no cri-o package, so no real CRI-O daemon runs here. A small HTTP server on a
unix socket answers ``GET /containers/ID`` with the JSON of CRI-O's ``types.ContainerInfo``
(pkg/types/types.go: name, pid, image, image_ref, created_time, labels, annotations,
crio_annotations, log_path, root, sandbox, ip_addresses) and 404 for an unknown id, as
CRI-O's server/inspect.go does. The containers behind it are real runc containers; the
finder must resolve their PID, namespaces and rootfs from /proc.
"""

from __future__ import annotations

import json
import os
import socketserver
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from _agent import SRC, Agent
from _containers import COUNTER, PLACEHOLDER_ARGS, PLACEHOLDER_ENV, build_base, run_container
from _support import wait_for

from warmstart.errors import EnvironmentProblem, NotFoundError, UsageError
from warmstart.runtime.discovery import CrioRuntime, detect_runtime, parse_crio_info

FULL_ID = "3f9a2b" + "0" * 58  # CRI-O ids are 64 hex digits


class FakeCrio:
    """CRI-O's inspect endpoint on a unix socket, serving what ``containers`` holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.containers: dict[str, dict] = {}
        self.requests: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                fake.requests.append(self.path)
                cid = self.path.removeprefix("/containers/")
                doc = fake.containers.get(cid) if self.path.startswith("/containers/") else None
                if doc is None:
                    body, status, ctype = f"can't find the container with id {cid}\n".encode(), 404, "text/plain"
                else:
                    body, status, ctype = json.dumps(doc).encode(), 200, "application/json"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

            def address_string(self) -> str:  # a unix peer has no (host, port)
                return "crio-client"

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, cid: str, pid: int, *, root: str = "", image: str = "quay.io/acme/worker:1",
            annotations: dict | None = None) -> None:
        self.containers[cid] = {
            "name": f"k8s_worker_{cid[:6]}", "pid": pid, "image": image,
            "image_ref": "quay.io/acme/worker@sha256:" + "a" * 64, "created_time": 1764110000000000000,
            "labels": {"io.kubernetes.pod.name": "worker-0", "io.kubernetes.pod.namespace": "default",
                       "io.kubernetes.container.name": "worker"},
            "annotations": annotations or {}, "crio_annotations": {},
            "log_path": f"/var/log/pods/default_worker-0/worker/{cid[:6]}.log",
            "root": root, "sandbox": "b" * 64, "ip_addresses": ["10.244.1.7"],
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def crio(tmp_path: Path):
    fake = FakeCrio(tmp_path / "crio.sock")
    yield fake
    fake.close()


def test_parse_crio_info_reads_the_container_info_shape() -> None:
    doc = {"name": "k8s_w", "pid": 4242, "image": "", "image_ref": "quay.io/x@sha256:ab",
           "labels": {"io.kubernetes.pod.name": "p"}, "annotations": {"a": "1"},
           "root": "/var/lib/containers/storage/overlay/abc/merged", "sandbox": "sb",
           "ip_addresses": ["10.0.0.3", "fd00::3"]}
    info = parse_crio_info(doc)
    assert info["pid"] == 4242 and info["image"] == "quay.io/x@sha256:ab"  # image_ref when no image
    assert info["annotations"] == {"a": "1", "io.kubernetes.pod.name": "p"}
    assert info["root"].endswith("/merged") and info["ips"] == ["10.0.0.3", "fd00::3"]
    # CRI-O before 1.18 had one ip_address and no root
    old = parse_crio_info({"pid": 7, "image": "i", "ip_address": "10.0.0.9"})
    assert old["ips"] == ["10.0.0.9"] and old["root"] == "" and old["annotations"] == {}


def test_crio_errors_are_clear(crio: FakeCrio, tmp_path: Path) -> None:
    rt = CrioRuntime(crio.path)
    with pytest.raises(NotFoundError, match="no CRI-O container 'nope'"):
        rt.get("nope")
    assert crio.requests == ["/containers/nope"]
    crio.add("stopped", 0)
    with pytest.raises(UsageError, match="is not running"):
        rt.get("stopped")
    with pytest.raises(EnvironmentProblem, match=f"cannot reach CRI-O at {tmp_path / 'none.sock'}"):
        CrioRuntime(tmp_path / "none.sock").get("x")
    with pytest.raises(UsageError, match="invalid container id"):
        rt.get("../etc")


def test_auto_detection_follows_the_sockets(crio: FakeCrio, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WARMSTART_CRIO_SOCKET", str(crio.path))
    assert detect_runtime() == "crio"
    monkeypatch.setenv("WARMSTART_CRIO_SOCKET", str(tmp_path / "absent.sock"))
    monkeypatch.setenv("WARMSTART_CONTAINERD_SOCKET", str(crio.path))  # any socket that exists
    assert detect_runtime() == "containerd"
    monkeypatch.setenv("WARMSTART_CONTAINERD_SOCKET", str(tmp_path / "absent2.sock"))
    assert detect_runtime() == "runc"


# -- with real runc containers -----------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("image") / "rootfs")


@pytest.fixture
def runc_containers(tmp_path: Path, base: Path):
    runc_root = tmp_path / "runc"
    runc_root.mkdir()
    made = []

    def container(cid: str, args: list[str], **kw):
        c = run_container(cid, base, tmp_path / "bundles", runc_root, args, **kw)
        made.append(c)
        return c

    yield container, runc_root
    for c in made:
        c.destroy()


def _ns(pid: int, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.parametrize("reported_root", ["api", "none", "wrong"])
def test_the_finder_resolves_a_real_container(crio: FakeCrio, runc_containers,
                                              reported_root: str) -> None:
    container, _root = runc_containers
    c = container("w", ["sh", "-c", COUNTER])
    wait_for(lambda: (c.rootfs / "data/counter").exists(), 20)
    root = {"api": str(c.rootfs), "none": "", "wrong": "/var/lib/containers/storage/overlay/x/merged"}
    crio.add(FULL_ID, c.pid, root=root[reported_root])
    found = CrioRuntime(crio.path).get(FULL_ID)
    assert found.runtime == "crio" and found.pid == c.pid
    # the rootfs is the overlay the container sees as /, whatever CRI-O said (mountinfo)
    assert found.rootfs == c.rootfs
    assert found.proc.overlay_upperdir == str(c.upper)
    for ns in ("mnt", "net", "pid", "uts", "ipc"):
        assert found.proc.namespaces[ns].inode == _ns(c.pid, ns)
    # the test image's annotation is not visible through CRI-O: the image name is the identity
    assert found.image == "quay.io/acme/worker:1"
    assert found.annotations["io.kubernetes.pod.name"] == "worker-0"
    assert found.describe()["overlay_upperdir"] == str(c.upper)


@pytest.mark.root
@pytest.mark.runc
@pytest.mark.criu
@pytest.mark.slow
def test_checkpoint_and_restore_through_the_agent_with_crio(crio: FakeCrio, runc_containers,
                                                            tmp_path: Path) -> None:
    """`warmstart checkpoint --container ID --agent` with the agent on --runtime auto, which
    finds the CRI-O socket; containers are found through CRI-O only."""
    container, _runc_root = runc_containers
    orig = container("orig", ["sh", "-c", COUNTER])
    wait_for(lambda: (orig.rootfs / "data/counter").exists(), 20)
    crio.add(FULL_ID, orig.pid, root=str(orig.rootfs))
    agent = Agent(tmp_path, tmp_path / "no-runc-root")
    agent.start(runtime="auto", WARMSTART_CRIO_SOCKET=str(crio.path))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "warmstart", "checkpoint", "--container", f"cri-o://{FULL_ID}",
             "--name", "crio-snap", "--agent", str(agent.socket), "--json"],
            capture_output=True, text=True, timeout=180, check=False, env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["name"] == "crio-snap"
        assert f"/containers/{FULL_ID}" in crio.requests
        with agent.client() as c:
            op = c.operations()[-1]
        assert op["container_id"] == FULL_ID and op["result"]["image"] == "quay.io/acme/worker:1"

        ph = container("ph", PLACEHOLDER_ARGS + ["sh", "-c", "sleep 1000"], env=PLACEHOLDER_ENV)
        wait_for(lambda: (ph.rootfs / "run/warmstart/placeholder-waiting").exists(), 20)
        ph_id = "c" * 64
        crio.add(ph_id, ph.pid)  # no root reported: found from /proc
        proc = subprocess.run(
            [sys.executable, "-m", "warmstart", "restore", "crio-snap", "--into", ph_id,
             "--agent", str(agent.socket), "--json"],
            capture_output=True, text=True, timeout=180, check=False, env=env)
        assert proc.returncode == 0, proc.stderr
        pid = json.loads(proc.stdout)["pid"]
        counter = lambda: int((ph.rootfs / "data/counter").read_text().strip() or 0)
        first = counter()
        wait_for(lambda: counter() > first + 3, 20, what="the restored counter to advance")
        assert _ns(pid, "net") == _ns(ph.pid, "net")
    finally:
        agent.stop()
