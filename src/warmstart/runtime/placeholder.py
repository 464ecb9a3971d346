"""``warmstart placeholder -- CMD...``: the init of a container that waits to be restored into.

It implements the placeholder contract of :mod:`warmstart.k8s.contract`; all files live in
``$SNAPSHOT_CONTROL_DIR``:

* on start it writes ``placeholder-waiting`` (its PID): the agent restores only into a
  container whose init announced itself this way;
* ``cold-start`` (written by the agent, or by the placeholder itself when a deadline
  passes) -> it ``exec``s ``CMD`` (or exits 0 without one): the container cold-starts;
* ``restore-started`` -> it waits up to ``WARMSTART_RESTORE_DEADLINE`` s more;
* ``restore-complete`` -> the restored tree, reparented to the placeholder, is the
  workload now: the placeholder reaps it and exits with its status (``restored-pid`` names
  its root); SIGTERM/SIGINT are forwarded to it.

Standard library only, and no import of the rest of warmstart: it runs inside the
container image, started as ``python3 -m warmstart.runtime.placeholder``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

CONTROL_DIR_ENV = "SNAPSHOT_CONTROL_DIR"
DEFAULT_CONTROL_DIR = "/run/warmstart"
WAITING = "placeholder-waiting"
RESTORED_PID = "restored-pid"
RESTORE_STARTED = "restore-started"
RESTORE_COMPLETE = "restore-complete"
COLD_START = "cold-start"
PLACEHOLDER_DEADLINE_ENV = "WARMSTART_PLACEHOLDER_DEADLINE"
RESTORE_DEADLINE_ENV = "WARMSTART_RESTORE_DEADLINE"
POLL_S = 0.05


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status) if status >= 0 else 1


def _code(raw: int) -> int:
    return raw if raw >= 0 else 128 - raw


class Placeholder:
    def __init__(self, control: Path, command: list[str], *, deadline_s: float,
                 restore_deadline_s: float) -> None:
        self.control = control
        self.command = command
        self.deadline_s = deadline_s
        self.restore_deadline_s = restore_deadline_s
        self.restored_pid: int | None = None
        self.exited: dict[int, int] = {}
        self._pending_signal: int | None = None

    def _write(self, name: str, text: str) -> None:
        tmp = self.control / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.control / name)

    def _has(self, name: str) -> bool:
        return (self.control / name).exists()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited[pid] = _code(_exit_code(status))

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.restored_pid is not None:
            try:
                os.kill(self.restored_pid, signum)
            except ProcessLookupError:
                pass
        else:
            self._pending_signal = signum

    def cold_start(self, reason: str | None = None) -> None:
        if reason is not None and not self._has(COLD_START):
            self._write(COLD_START, reason + "\n")
        (self.control / WAITING).unlink(missing_ok=True)
        if not self.command:
            sys.exit(0)
        os.execvp(self.command[0], self.command)

    def run(self) -> int:
        self.control.mkdir(parents=True, exist_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self._write(WAITING, f"{os.getpid()}\n")
        started = time.monotonic()
        restore_seen: float | None = None
        while True:
            self._reap()
            if self._has(RESTORE_COMPLETE):
                return self._serve_restored()
            if self._pending_signal is not None:
                return 128 + self._pending_signal
            if self._has(COLD_START):
                self.cold_start()
            now = time.monotonic()
            if restore_seen is None and self._has(RESTORE_STARTED):
                restore_seen = now
            if restore_seen is None and now - started > self.deadline_s:
                self.cold_start(f"no restore within {self.deadline_s:g}s")
            if restore_seen is not None and now - restore_seen > self.restore_deadline_s:
                self.cold_start(f"restore did not complete within {self.restore_deadline_s:g}s")
            time.sleep(POLL_S)

    def _serve_restored(self) -> int:
        (self.control / WAITING).unlink(missing_ok=True)
        try:
            self.restored_pid = int((self.control / RESTORED_PID).read_text().strip())
        except (OSError, ValueError):
            self.restored_pid = None
        if self._pending_signal is not None and self.restored_pid is not None:
            self._on_signal(self._pending_signal, None)
        while True:
            self._reap()
            if self.restored_pid is not None and self.restored_pid in self.exited:
                return self.exited[self.restored_pid]
            if self.restored_pid is None:
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    return 0
            time.sleep(POLL_S)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    control = Path(os.environ.get(CONTROL_DIR_ENV) or DEFAULT_CONTROL_DIR)
    ph = Placeholder(
        control, args,
        deadline_s=float(os.environ.get(PLACEHOLDER_DEADLINE_ENV) or 120),
        restore_deadline_s=float(os.environ.get(RESTORE_DEADLINE_ENV) or 600),
    )
    return ph.run()


if __name__ == "__main__":
    sys.exit(main())
