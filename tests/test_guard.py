"""The checkpoint guard: resumes the tree when warmstart dies, never after ``done``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from _support import wait_for

from warmstart.snapshot.guard import Guard, reap

SRC = Path(__file__).resolve().parents[1] / "src"


def _stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


@pytest.fixture
def stopped_tree() -> Iterator[tuple[int, int]]:
    """A shell with a child, both stopped: (root, child)."""
    sh = subprocess.Popen(["sh", "-c", "sleep 300 & wait"], start_new_session=True)
    child = wait_for(lambda: psutil.Process(sh.pid).children(), what="the child")[0].pid
    os.killpg(sh.pid, signal.SIGSTOP)
    wait_for(lambda: _stopped(sh.pid) and _stopped(child), what="the tree stopped")
    yield sh.pid, child
    os.killpg(sh.pid, signal.SIGKILL)
    sh.wait()


def test_end_of_file_without_done_resumes_the_whole_tree(stopped_tree) -> None:
    root, child = stopped_tree
    guard = Guard.start([root], [])  # the child was not listed: found as a descendant
    assert guard.popen.stdin is not None
    guard.popen.stdin.close()  # warmstart is gone
    assert guard.popen.wait(30) == 0
    assert not _stopped(root) and not _stopped(child)


def test_the_guard_waits_for_criu_before_acting(stopped_tree) -> None:
    root, _ = stopped_tree
    criu = subprocess.Popen(["sleep", "1"])
    guard = Guard.start([root], [])
    guard.criu_started(criu.pid)
    assert guard.popen.stdin is not None
    guard.popen.stdin.close()
    time.sleep(0.5)
    assert _stopped(root)  # "CRIU" is still running
    criu.wait()
    assert guard.popen.wait(30) == 0
    assert not _stopped(root)


def test_after_done_the_guard_never_acts_and_is_reaped_later(stopped_tree) -> None:
    root, child = stopped_tree
    guard = Guard.start([root], [])
    t0 = time.monotonic()
    guard.done()
    assert time.monotonic() - t0 < 0.5  # does not wait for the guard's exit
    assert guard.popen.returncode is None  # not reaped yet: it had no time to read "done"
    # it exits on its own; the next guard's start reaps it
    wait_for(
        lambda: psutil.Process(guard.popen.pid).status() == psutil.STATUS_ZOMBIE,
        30,
        what="its exit",
    )
    Guard.start([root], []).done()
    assert guard.popen.returncode == 0
    assert not psutil.pid_exists(guard.popen.pid)
    time.sleep(0.2)
    assert _stopped(root) and _stopped(child)


def test_done_before_the_guard_has_even_started_still_counts(stopped_tree) -> None:
    root, _ = stopped_tree
    guards = [Guard.start([root], []) for _ in range(5)]
    for g in guards:
        g.done()  # right away: each guard reads it long after its pipe closed
    wait_for(
        lambda: reap() or all(g.popen.returncode is not None for g in guards), 30, what="the guards"
    )
    assert [g.popen.returncode for g in guards] == [0] * 5
    assert _stopped(root)


def test_the_watch_imports_nothing_heavy() -> None:
    """Every checkpoint starts a guard: until it must act it loads only os and sys."""
    cmd = Guard.command([1], [])
    assert "-S" in cmd
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], input="done\n", capture_output=True,
                          text=True, timeout=30, check=True)  # fmt: skip
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "os" in imported
    assert not imported & {"warmstart", "psutil", "argparse", "subprocess", "typing", "site"}, (
        imported
    )


def test_run_as_a_module_it_recovers_in_process(stopped_tree) -> None:
    root, child = stopped_tree
    guard = subprocess.Popen([sys.executable, "-m", "warmstart.snapshot.guard", "--pids", str(root)],
                             stdin=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)})  # fmt: skip
    assert guard.stdin is not None
    guard.stdin.close()
    assert guard.wait(30) == 0
    assert not _stopped(root) and not _stopped(child)
