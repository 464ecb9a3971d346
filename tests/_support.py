"""Helpers shared by the tests: running workloads and waiting on them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

WORKLOADS = Path(__file__).parent / "workloads"


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass
class Tree:
    """Handle on a running tests/workloads/tree.py."""

    state: Path
    popen: subprocess.Popen | None
    pid: int

    def status(self) -> dict:
        for _ in range(50):
            try:
                return json.loads((self.state / "status.json").read_bytes().rstrip(b" \0"))
            except (ValueError, FileNotFoundError):
                time.sleep(0.01)
        raise AssertionError("no readable status.json")

    def counter(self) -> int:
        return self.status()["counter"]

    def started(self) -> bool:
        try:
            return json.loads((self.state / "status.json").read_bytes().rstrip(b" \0"))["counter"] > 2
        except (ValueError, OSError, KeyError):
            return False

    def wait_progress(self, timeout: float = 20.0) -> dict:
        start = self.counter()
        return wait_for(lambda: (s := self.status())["counter"] > start + 2 and s, timeout, what="progress")

    def digests(self) -> dict:
        before = self.counter()
        (self.state / "verify").touch()
        wait_for(lambda: not (self.state / "verify").exists() and self.counter() > before + 1, what="verify")
        return self.status()["digests"]

    def alive(self, pid: int | None = None) -> bool:
        try:
            return psutil.Process(pid or self.pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
        except psutil.NoSuchProcess:
            return False

    def kill(self) -> None:
        from warmstart.host.process import kill_tree

        kill_tree(self.pid)
        if self.popen is not None:
            self.popen.wait(timeout=10)


def assert_continues(tree: Tree, pid: int, before: dict) -> None:
    """The restored copy of ``tree`` (``pid``) runs on with the digests it had ``before``; then it is killed."""
    from warmstart.host.process import kill_tree

    try:
        back = Tree(tree.state, None, pid)
        back.wait_progress()
        assert back.digests() == before
    finally:
        kill_tree(pid)


def start_tree(state: Path, mem_mib: int = 16, zero_mib: int = 0, scatter_runs: int = 0) -> Tree:
    state.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        [sys.executable, str(WORKLOADS / "tree.py"), str(state), str(mem_mib), str(zero_mib), str(scatter_runs)],
        stdin=subprocess.DEVNULL,
        stdout=open(state / "stdout", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tree = Tree(state, popen, popen.pid)
    wait_for(tree.started, 120, what="workload start")
    return tree


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def warmstart_cmd() -> list[str]:
    exe = shutil.which("warmstart", path=str(Path(sys.executable).parent)) or shutil.which("warmstart")
    return [exe] if exe else [sys.executable, "-m", "warmstart"]
