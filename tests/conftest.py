from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

WORKLOADS = Path(__file__).parent / "workloads"


def _criu_ok() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    from warmstart.errors import WarmstartError
    from warmstart.host.criu import find_criu

    try:
        find_criu()
    except WarmstartError as exc:
        return str(exc)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    checked = False
    for item in items:
        if "criu" in item.keywords:
            if not checked:
                reason, checked = _criu_ok(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"CRIU unavailable: {reason}"))


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


def start_tree(state: Path, mem_mib: int = 16) -> Tree:
    state.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        [sys.executable, str(WORKLOADS / "tree.py"), str(state), str(mem_mib)],
        stdin=subprocess.DEVNULL,
        stdout=open(state / "stdout", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tree = Tree(state, popen, popen.pid)
    wait_for(tree.started, 120, what="workload start")
    return tree


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tree_factory(tmp_path: Path) -> Iterator:
    made: list[Tree] = []

    def make(mem_mib: int = 16, name: str = "tree") -> Tree:
        t = start_tree(tmp_path / name, mem_mib)
        made.append(t)
        return t

    yield make
    for t in made:
        for pid in {t.pid, *(p.pid for p in _children(t.pid))}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if t.popen is not None:
            try:
                t.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def warmstart_cmd() -> list[str]:
    exe = shutil.which("warmstart", path=str(Path(sys.executable).parent)) or shutil.which("warmstart")
    return [exe] if exe else [sys.executable, "-m", "warmstart"]
