from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from _store_support import file_url, s3_endpoint, s3_url, store_url  # noqa: F401  (store fixtures)
from _support import Tree, _children, start_tree


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


def _runc_ok() -> str | None:
    import shutil

    if os.geteuid() != 0:
        return "needs root"
    for tool in ("runc", "busybox", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (scripts/setup.sh installs it)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    checked = False
    runc_reason: str | None = None
    runc_checked = False
    for item in items:
        if "criu" in item.keywords:
            if not checked:
                reason, checked = _criu_ok(), True
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"CRIU unavailable: {reason}"))
        if "runc" in item.keywords:
            if not runc_checked:
                runc_reason, runc_checked = _runc_ok(), True
            if runc_reason:
                item.add_marker(pytest.mark.skip(reason=f"runc unavailable: {runc_reason}"))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def tree_factory(tmp_path: Path) -> Iterator:
    made: list[Tree] = []

    def make(mem_mib: int = 16, name: str = "tree", zero_mib: int = 0, scatter_runs: int = 0) -> Tree:
        t = start_tree(tmp_path / name, mem_mib, zero_mib, scatter_runs)
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


