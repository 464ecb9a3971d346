"""A keeper process for ``restore --lazy``: no zero pages if the restore dies.

A lazy restore lets the tasks run while the page server still fills their
memory through one userfaultfd per task. Those descriptors live in the
``warmstart restore`` process; if it is killed (SIGKILL, OOM) before the fill
ends, they close, the kernel drops the registrations, and every page not yet
filled reads as zeros in a task that runs on: silent memory corruption.

:class:`Keeper` closes that window with a tiny ``/bin/sh`` child, started
before the tasks resume, that holds a copy of every userfaultfd and reads the
other end of a pipe on its stdin. While it holds them the descriptors stay
open, so a fault on a missing page blocks instead of reading zeros. The
restore ends it in one of two ways:

* :meth:`Keeper.release` (every page is placed, or the caller killed the
  tasks itself): it writes ``done``; the child exits and leaves them be.
* The restore dies, or calls :meth:`Keeper.abort`: the pipe reaches end of
  file without ``done``; the child SIGKILLs the tasks, and only then exits
  and drops its copies. A task killed while blocked on a fault never runs
  again, so no task reads a zero page.

The child runs in its own session, so a Ctrl-C to the terminal's process
group does not take it down with the restore.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Self

from warmstart.errors import CriuError, EnvironmentProblem

log = logging.getLogger(__name__)

#: The child: one line from stdin (the pipe); anything but ``done`` (end of file
#: included) kills the tasks. ``read`` and ``kill`` are shell builtins.
_SCRIPT = 'IFS= read -r word; [ "$word" = done ] || kill -KILL "$@"'
#: Seconds to wait for the child to exit once told what to do.
_EXIT_TIMEOUT = 5.0


class Keeper:
    """Holds copies of a lazy restore's userfaultfds until the fill is over; see the module."""

    def __init__(self, child: subprocess.Popen[bytes], pipe: int, pids: list[int]) -> None:
        self._child = child
        self._pipe: int | None = pipe
        self.pids = pids

    @classmethod
    def start(cls, uffds: list[int], pids: list[int]) -> Keeper:
        """Start a keeper of ``uffds`` that SIGKILLs ``pids`` if this process dies first.

        Call before the tasks run: a descriptor it does not hold is not kept."""
        for fd in uffds:  # Popen skips a descriptor that is not open: it would not be kept
            try:
                os.fstat(fd)
            except OSError as exc:
                raise CriuError(
                    f"lazy-restore keeper: descriptor {fd} is not open ({exc.strerror})",
                    hint="retry the restore",
                ) from None
        read_end, write_end = os.pipe()  # both close-on-exec: the write end stays here only
        try:
            child = subprocess.Popen(
                ["/bin/sh", "-c", _SCRIPT, "warmstart-keeper", *map(str, pids)],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=uffds,
                close_fds=True,
                start_new_session=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(write_end)
            raise EnvironmentProblem(
                f"cannot start the lazy-restore keeper: {getattr(exc, 'strerror', None) or exc}",
                hint="check that /bin/sh runs here, or restore without --lazy",
            ) from None
        finally:
            os.close(read_end)
        return cls(child, write_end, list(pids))

    @property
    def pid(self) -> int:
        return self._child.pid

    def release(self) -> None:
        """The fill is over (or the tasks are dead): let the keeper exit, leaving the tasks be."""
        self._end(b"done\n")

    def abort(self) -> None:
        """Let the keeper SIGKILL the tasks and exit (a failure while they may still run)."""
        self._end(b"")

    def _end(self, word: bytes) -> None:
        if self._pipe is None:
            return  # already ended
        pipe, self._pipe = self._pipe, None
        try:
            if word:
                os.write(pipe, word)  # a few bytes into an empty pipe: never blocks
        except OSError as exc:  # the keeper is gone already (killed by someone): nothing to tell it
            log.debug("keeper %d: %s", self._child.pid, exc)
        finally:
            os.close(pipe)
        try:
            self._child.wait(timeout=_EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:  # cannot happen with a shell that runs; never leave it
            log.warning("keeper %d did not exit; killing it", self._child.pid)
            if not word:
                _kill(self.pids)  # its job, done here before its copies close
            self._child.kill()
            self._child.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """Leaving without :meth:`release` aborts: the tasks are killed."""
        self.abort()


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
