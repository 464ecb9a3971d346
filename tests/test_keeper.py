"""The lazy-restore keeper (host/keeper.py) alone: no CRIU; any descriptor stands in for a uffd."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from _support import wait_for
from warmstart.errors import CriuError
from warmstart.host.keeper import Keeper

SRC = Path(__file__).resolve().parent.parent / "src"

#: Starts a keeper of descriptor argv[2] for PID argv[1], drops its own copy,
#: prints the keeper's PID, optionally releases it, then waits to be killed.
HELPER = """
import os, sys, time
from warmstart.host.keeper import Keeper
pid, fd, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
keeper = Keeper.start([fd], [pid])
os.close(fd)
if mode == "release":
    keeper.release()
print(keeper.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "60"])
    yield p
    p.kill()
    p.wait()


def _eof(fd: int) -> bool:
    """Whether the read end ``fd`` of an empty pipe says end of file (no writer left)."""
    return bool(select.select([fd], [], [], 0)[0]) and os.read(fd, 1) == b""


def _helper(sleeper: subprocess.Popen[bytes], mode: str) -> tuple[subprocess.Popen[str], int, int]:
    """A helper whose keeper holds a fresh pipe's write end: the helper, the read end, the keeper's PID."""
    r, w = os.pipe()
    helper = subprocess.Popen(
        [sys.executable, "-c", HELPER, str(sleeper.pid), str(w), mode],
        pass_fds=[w],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    os.close(w)
    assert helper.stdout is not None
    keeper_pid = int(helper.stdout.readline())
    return helper, r, keeper_pid


def test_a_killed_owner_makes_the_keeper_kill_the_tasks(sleeper: subprocess.Popen[bytes]) -> None:
    helper, r, keeper_pid = _helper(sleeper, "keep")
    try:
        assert os.getsid(keeper_pid) == keeper_pid  # its own session: a Ctrl-C does not reach it
        assert not _eof(r)  # the keeper holds the descriptor its owner closed
        helper.kill()
        helper.wait()
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
        wait_for(lambda: _eof(r), 5, what="the keeper to drop its copy")
    finally:
        helper.kill()
        helper.wait()
        os.close(r)


def test_a_released_keeper_leaves_the_tasks_running(sleeper: subprocess.Popen[bytes]) -> None:
    helper, r, _ = _helper(sleeper, "release")
    try:
        assert _eof(r)  # released: its copy is closed
        helper.kill()
        helper.wait()
        with pytest.raises(subprocess.TimeoutExpired):
            sleeper.wait(timeout=0.5)
    finally:
        helper.kill()
        helper.wait()
        os.close(r)


def test_release_and_abort_are_idempotent_and_reap_the_child(sleeper: subprocess.Popen[bytes]) -> None:
    keeper = Keeper.start([], [sleeper.pid])
    keeper.release()
    keeper.release()
    keeper.abort()  # after release: nothing left to do
    assert keeper._child.returncode == 0
    assert sleeper.poll() is None
    with Keeper.start([], [sleeper.pid]) as keeper:
        pass  # left without release: abort, the tasks die
    assert keeper._child.returncode is not None
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    keeper.abort()


def test_a_closed_descriptor_is_refused() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(CriuError, match="not open"):
        Keeper.start([r], [])
