"""Dying processes: a checkpoint kills its original without waiting; a restore waits."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from warmstart.host.process import exiting, kill_tree, wait_exits


def _kill_and_reap(child: subprocess.Popen[bytes]) -> None:
    """Kill ``child`` if a test left it alive; reap it unless the test did (wait_exits reaps)."""
    if child.poll() is None and os.path.exists(f"/proc/{child.pid}"):
        child.kill()
    try:
        child.wait(5)
    except ChildProcessError:
        pass


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
        _kill_and_reap(child)


def test_a_pid_that_never_existed_is_not_exiting() -> None:
    assert not exiting(4_000_000)  # above pid_max's ceiling
    wait_exits([4_000_000], timeout=1)


@pytest.mark.skipif(
    os.geteuid() != 0 or (os.cpu_count() or 1) < 2 or not (shutil.which("chrt") and shutil.which("taskset")),
    reason="needs root, two CPUs, chrt and taskset",
)
def test_a_killed_process_that_has_not_run_since_is_exiting_and_waited_for() -> None:
    """SIGKILL wakes a stopped task, but until the scheduler runs it, it is neither
    exiting (PF_EXITING) nor a zombie: a restore right after a checkpoint must still
    wait for its PID. A real-time hog on its CPU keeps it from running meanwhile."""
    victim = subprocess.Popen(["taskset", "-c", "1", "sleep", "100"])
    hog = None
    try:
        comm = Path(f"/proc/{victim.pid}/comm")
        deadline = time.monotonic() + 5
        while not comm.read_text().startswith("sleep") and time.monotonic() < deadline:
            time.sleep(0.01)  # exec'ed from taskset
        os.kill(victim.pid, signal.SIGSTOP)
        hog = subprocess.Popen(["chrt", "-f", "50", "taskset", "-c", "1", sys.executable, "-c",
                                "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 0.6: pass"])  # fmt: skip
        time.sleep(0.15)  # the hog has CPU 1 now
        os.kill(victim.pid, signal.SIGKILL)
        time.sleep(0.01)
        fields = Path(f"/proc/{victim.pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X") or int(fields[6]) & 0x4:
            pytest.skip("the killed task ran anyway (real-time throttling?): nothing to tell")
        assert exiting(victim.pid)  # only its pending SIGKILL says so
        wait_exits([victim.pid], timeout=5)
        assert not os.path.exists(f"/proc/{victim.pid}")  # ran, died and was reaped (ours)
        assert hog.poll() is None or hog.returncode == 0
    finally:
        if hog is not None:
            hog.wait()
        _kill_and_reap(victim)
