"""A watchdog that resumes the original tree if warmstart dies mid-checkpoint.

During a checkpoint the tree is frozen by CRIU and left *stopped* after the
dump (``--leave-stopped``), so that it cannot run past the moment it was
snapshotted while the snapshot is being published. If warmstart were killed
in that window, the tree would stay stopped (and its GPU state locked). The
guard is a separate process, in a session of its own, that reads a pipe from
warmstart:

* ``criu PID`` — CRIU is running as PID (wait for it before acting);
* ``done``     — the checkpoint completed; exit quietly;
* end of file without ``done`` — warmstart is gone: wait for CRIU to exit,
  roll the GPU state back, SIGCONT every process of the tree.

Run as ``python -m warmstart.snapshot.guard --pids 1,2 --cuda-pids 1``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass


def _wait_gone(pid: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def recover(pids: list[int], cuda_pids: list[int], criu_pid: int | None) -> None:
    if criu_pid:
        _wait_gone(criu_pid)
    if cuda_pids:
        try:
            from warmstart.gpu.driver import load_driver
            from warmstart.gpu.session import GpuCheckpointSession

            GpuCheckpointSession(load_driver(), cuda_pids).rollback()
        except Exception as exc:  # noqa: BLE001 - best effort, keep resuming the tree
            print(f"warmstart guard: GPU rollback failed: {exc}", file=sys.stderr)
    from warmstart.host.process import continue_pids

    continue_pids(pids)  # with descendants forked since the tree was listed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="warmstart-guard")
    ap.add_argument("--pids", required=True)
    ap.add_argument("--cuda-pids", default="")
    args = ap.parse_args(argv)
    pids = [int(p) for p in args.pids.split(",") if p]
    cuda = [int(p) for p in args.cuda_pids.split(",") if p]
    criu_pid: int | None = None
    for line in sys.stdin:
        word, _, value = line.strip().partition(" ")
        if word == "done":
            return 0
        if word == "criu":
            criu_pid = int(value)
    recover(pids, cuda, criu_pid)
    return 0


@dataclass
class Guard:
    """warmstart's end of the pipe."""

    popen: subprocess.Popen[str]

    @classmethod
    def start(cls, pids: list[int], cuda_pids: list[int]) -> Guard:
        popen = subprocess.Popen(
            [
                sys.executable, "-m", "warmstart.snapshot.guard",
                "--pids", ",".join(map(str, pids)),
                "--cuda-pids", ",".join(map(str, cuda_pids)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )  # fmt: skip
        return cls(popen)

    def _say(self, line: str) -> None:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(line + "\n")
            self.popen.stdin.flush()
        except BrokenPipeError:
            pass

    def criu_started(self, pid: int) -> None:
        self._say(f"criu {pid}")

    def done(self) -> None:
        """The checkpoint is over (either way): the guard must not act."""
        self._say("done")
        if self.popen.stdin:
            self.popen.stdin.close()
        self.popen.wait()


if __name__ == "__main__":
    raise SystemExit(main())
