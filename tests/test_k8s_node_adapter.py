"""UnixSocketNodeOperations speaks the documented daemon API (a fake daemon on a socket)."""

from __future__ import annotations

import json
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from warmstart.errors import EnvironmentProblem, WarmstartError
from warmstart.k8s.node import UnixSocketNodeOperations, strip_runtime_prefix


class _Daemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _serve(path: Path, *, fail_checkpoint: bool = False):
    ops: dict[str, dict] = {}
    bodies: list[dict] = []

    class H(BaseHTTPRequestHandler):
        def log_message(self, *_a):
            pass

        def address_string(self):
            return "unix"

        def _json(self, code, doc):
            data = json.dumps(doc).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/v1/node":
                return self._json(200, {"arch": "x86_64", "gpu_model": "NVIDIA H100",
                                        "driver_version": "580.65.06", "gpu_count": 8})
            op_id = self.path.rsplit("/", 1)[-1]
            op = ops.get(op_id)
            if op is None:
                return self._json(404, {"error": f"no operation {op_id}"})
            op["polls"] += 1
            if op["polls"] < 2:  # running on the first poll, done on the next
                return self._json(200, {"id": op_id, "state": "running"})
            if op["type"] == "checkpoint" and fail_checkpoint:
                return self._json(200, {"id": op_id, "state": "failed",
                                        "error": "criu dump failed: see /var/log/x"})
            return self._json(200, {"id": op_id, "state": "succeeded", "result": {
                "snapshot_id": "abc", "size_bytes": 123, "timings": {"dump": 1.5},
                "gpu_model": "NVIDIA H100", "driver_version": "580.65.06"}})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            if body.get("container_id") == "bad":
                return self._json(400, {"error": "no container bad", "hint": "check the id"})
            op_id = str(len(ops) + 1)
            ops[op_id] = {"type": body["type"], "polls": 0}
            return self._json(202, {"id": op_id, "state": "pending"})

    srv = _Daemon(str(path), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, bodies


@pytest.fixture
def sock(tmp_path):
    return tmp_path / "agent.sock"


def test_checkpoint_restore_and_facts_round_trip(sock):
    srv, bodies = _serve(sock)
    try:
        ops = UnixSocketNodeOperations(str(sock), poll_interval=0.01)
        facts = ops.compatibility()
        assert (facts.gpu_model, facts.driver_version, facts.gpu_count) == (
            "NVIDIA H100", "580.65.06", 8)
        rep = ops.checkpoint_container("c1", "ns.snap", "file:///s", True)
        assert rep.ok and rep.snapshot_id == "abc" and rep.size_bytes == 123
        assert rep.timings == {"dump": 1.5}
        rep = ops.restore_container("c2", "ns.snap", "file:///s")
        assert rep.ok
        ops.cold_start("c3", "no compatible snapshot")
        assert bodies == [
            {"type": "checkpoint", "container_id": "c1", "snapshot": "ns.snap",
             "store": "file:///s", "wait_ready": True},
            {"type": "restore", "container_id": "c2", "snapshot": "ns.snap",
             "store": "file:///s"},
            {"type": "cold-start", "container_id": "c3", "reason": "no compatible snapshot"},
        ]
    finally:
        srv.shutdown()
        srv.server_close()


def test_failed_operation_is_a_report_not_an_exception(sock):
    srv, _ = _serve(sock, fail_checkpoint=True)
    try:
        rep = UnixSocketNodeOperations(str(sock), poll_interval=0.01).checkpoint_container(
            "c1", "s", "file:///s", False)
        assert not rep.ok and rep.error.startswith("criu dump failed")
    finally:
        srv.shutdown()
        srv.server_close()


def test_daemon_errors_are_one_line_warmstart_errors(sock):
    srv, _ = _serve(sock)
    try:
        with pytest.raises(WarmstartError) as exc:
            UnixSocketNodeOperations(str(sock)).restore_container("bad", "s", "file:///s")
        assert str(exc.value) == "node daemon: no container bad — check the id"
    finally:
        srv.shutdown()
        srv.server_close()


def test_missing_daemon_is_an_environment_problem(sock):
    with pytest.raises(EnvironmentProblem) as exc:
        UnixSocketNodeOperations(str(sock)).compatibility()
    assert "cannot reach the warmstart node daemon" in str(exc.value)


def test_strip_runtime_prefix():
    assert strip_runtime_prefix("containerd://abc") == "abc"
    assert strip_runtime_prefix("abc") == "abc"
