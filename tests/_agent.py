"""A `warmstart agent` process on a temporary socket, for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from _support import wait_for

from warmstart.agent.client import AgentClient

SRC = Path(__file__).resolve().parents[1] / "src"


class Agent:
    def __init__(self, tmp: Path, runc_root: Path) -> None:
        self.socket = tmp / "agent.sock"
        self.state = tmp / "agent-state"
        self.store = tmp / "store"
        self.runc_root = runc_root
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.metrics_port = 0

    def start(self, runtime: str = "runc", **extra_env: str) -> None:
        self.socket.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])), **extra_env)
        with socket_port() as port:
            self.metrics_port = port
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmstart", "agent", "--socket", str(self.socket),
             "--state-dir", str(self.state), "--store", str(self.store), "--runtime", runtime,
             "--runc-root", str(self.runc_root), "--metrics-port", str(self.metrics_port),
             "--metrics-addr", "127.0.0.1"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log.read_text()[-2000:]}")
            try:
                with AgentClient(self.socket) as c:
                    return c.call("GET", "/healthz")["ok"]
            except Exception:
                return False

        wait_for(up, 30, 0.1, "the agent to listen")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self) -> AgentClient:
        return AgentClient(self.socket)

    def run(self, body: dict, timeout: float = 120) -> dict:
        with self.client() as c:
            op = c.submit({"runtime": "runc", **body})
            return c.wait(op["id"], timeout=timeout)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


class socket_port:
    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        return self.s.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.s.close()
