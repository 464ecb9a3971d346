"""Dying processes: a checkpoint kills its original without waiting; a restore waits."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from warmstart.host.process import exiting, kill_tree, wait_exits


def test_a_killed_child_is_exiting_until_reaped_and_wait_exits_reaps_it() -> None:
    child = subprocess.Popen(["sleep", "100"])
    try:
        assert not exiting(child.pid)
        t0 = time.monotonic()
        wait_exits([child.pid], timeout=2)  # a live process is not waited for
        assert time.monotonic() - t0 < 0.5
        os.kill(child.pid, signal.SIGSTOP)
        kill_tree(child.pid, wait=False)
        deadline = time.monotonic() + 5
        while not exiting(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exiting(child.pid)  # a zombie of ours, not reaped yet
        wait_exits([child.pid], timeout=5)
        assert not exiting(child.pid)
        assert not os.path.exists(f"/proc/{child.pid}")  # reaped: the PID is free
    finally:
        if child.poll() is None and os.path.exists(f"/proc/{child.pid}"):
            child.kill()
        try:
            child.wait(5)
        except ChildProcessError:
            pass


def test_a_pid_that_never_existed_is_not_exiting() -> None:
    assert not exiting(4_000_000)  # above pid_max's ceiling
    wait_exits([4_000_000], timeout=1)
