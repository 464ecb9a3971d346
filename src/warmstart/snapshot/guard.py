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

Every checkpoint starts one, so the watch is cheap: this file runs as a script
(``python -s -S -P guard.py --pids 1,2 --cuda-pids 1``) that imports nothing but
``os`` and ``sys`` until it has to act. Only then does it become
``python -m warmstart.snapshot.guard --recover ...`` (warmstart's environment,
what the recovery needs: psutil, the CUDA driver). warmstart does not wait for
it to exit after ``done``: once that line is in the pipe the guard can only
read it and exit, and the next guard's start (or ``done``) reaps it.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing's own costs the watch more than the rest of its start
if TYPE_CHECKING:
    import subprocess


def _wait_gone(pid: int, timeout: float = 600.0) -> None:
    import time

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


def _parse(argv: list[str]) -> dict[str, str]:
    """``--name value`` pairs and bare ``--flag``s (argparse costs more than the whole watch)."""
    known = {"--pids": True, "--cuda-pids": True, "--criu-pid": True, "--recover": False}
    out: dict[str, str] = {}
    i = 0
    while i < len(argv):
        arg, value = argv[i], None
        if "=" in arg:
            arg, value = arg.split("=", 1)
        if arg not in known:
            raise SystemExit(f"warmstart-guard: unknown argument {argv[i]!r}")
        if known[arg] and value is None:
            i += 1
            if i == len(argv):
                raise SystemExit(f"warmstart-guard: {arg} needs a value")
            value = argv[i]
        out[arg] = value if value is not None else ""
        i += 1
    if "--pids" not in out:
        raise SystemExit("warmstart-guard: --pids is required")
    return out


def _ints(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    pids, cuda = _ints(args["--pids"]), _ints(args.get("--cuda-pids", ""))
    criu_pid = int(args["--criu-pid"]) if args.get("--criu-pid") else None
    if "--recover" in args:
        recover(pids, cuda, criu_pid)
        return 0
    for line in sys.stdin:
        word, _, value = line.strip().partition(" ")
        if word == "done":
            return 0
        if word == "criu":
            criu_pid = int(value)
    # warmstart is gone. Wait for CRIU here (it may still be dumping), then act.
    if criu_pid:
        _wait_gone(criu_pid)
    if "warmstart" in sys.modules:  # run with -m: warmstart's environment is here already
        recover(pids, cuda, None)
        return 0
    cmd = [sys.executable, "-m", "warmstart.snapshot.guard", "--recover", "--pids", args["--pids"],
           "--cuda-pids", args.get("--cuda-pids", "")]  # fmt: skip
    try:
        os.execv(sys.executable, cmd)
    except OSError as exc:  # no Python to recover with: resume what we know of the tree
        print(f"warmstart guard: cannot run the recovery ({exc}); sending SIGCONT", file=sys.stderr)
        import signal

        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    return 0


#: Guards told ``done`` that may not have exited yet.
_exited: list[subprocess.Popen[str]] = []


def reap() -> None:
    """Reap the guards told ``done`` that have exited since (never waits)."""
    _exited[:] = [p for p in _exited if p.poll() is None]


class Guard:
    """warmstart's end of the pipe."""

    def __init__(self, popen: subprocess.Popen[str]) -> None:
        self.popen = popen

    @staticmethod
    def command(pids: list[int], cuda_pids: list[int]) -> list[str]:
        args = ["--pids", ",".join(map(str, pids)), "--cuda-pids", ",".join(map(str, cuda_pids))]
        script = os.path.abspath(__file__)
        if script.endswith(".py") and os.path.isfile(script):
            # no site-packages, no script directory on sys.path: the watch imports only os and sys
            return [sys.executable, "-s", "-S", "-P", script, *args]
        return [sys.executable, "-m", "warmstart.snapshot.guard", *args]

    @classmethod
    def start(cls, pids: list[int], cuda_pids: list[int]) -> Guard:
        import subprocess

        reap()
        popen = subprocess.Popen(
            cls.command(pids, cuda_pids),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            text=True,
        )
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
        """The checkpoint is over (either way): the guard must not act.

        ``done`` is in the pipe before it closes, so the guard reads it before
        any end of file and exits without acting, whether or not warmstart is
        still there. Its exit is not waited for: it is reaped by a later
        :meth:`start` or :meth:`done` (or by init once warmstart exits)."""
        self._say("done")
        if self.popen.stdin:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass
        _exited.append(self.popen)
        reap()


if __name__ == "__main__":
    raise SystemExit(main())
