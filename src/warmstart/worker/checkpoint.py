"""The checkpoint point: the one call an engine makes between init and serving.

::

    from warmstart.worker import checkpoint_point, on_restore

    engine = build_engine()                        # phase 1: load, allocate, warm up
    checkpoint_point(release=engine.release_kv,    # frees KV physical memory, keeps VA
                     reacquire=engine.reacquire_kv)
    start_http_server()                            # phase 2

Without ``SNAPSHOT_CONTROL_DIR`` the call returns at once. With it, the worker

1. refuses to go on if it holds TCP sockets or io_uring (CRIU cannot dump them),
2. calls ``release()``, writes ``ready-for-snapshot`` (a `ReadyInfo` with its
   pid, labels and a fresh ``checkpoint_id``) and polls the control dir:

   * ``restore-complete`` (seen only by a restored copy): reads
     ``restore-context.json``, checks its ``checkpoint_id`` is this worker's,
     applies its ``env``, calls ``reacquire()``, runs the `on_restore`
     callbacks and returns ``Outcome.RESTORED``;
   * ``snapshot-failed``: ``reacquire()`` and return ``Outcome.SNAPSHOT_FAILED``;
   * ``snapshot-complete``: the original exits with status 0, or, when asked to
     continue (argument or ``WARMSTART_CONTINUE_AFTER_SNAPSHOT=1``),
     ``reacquire()`` and return ``Outcome.SNAPSHOTTED``.

A restorer must remove a stale ``snapshot-complete`` from the control dir
before the restored copy runs (or write ``restore-complete`` before restoring);
otherwise the copy takes it for its own and exits.
"""

from __future__ import annotations

import enum
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from pydantic import ValidationError

from warmstart import protocol
from warmstart.errors import UsageError
from warmstart.worker.preflight import apply_checkpoint_env, check_checkpointable

log = logging.getLogger("warmstart.worker")

CONTINUE_ENV = "WARMSTART_CONTINUE_AFTER_SNAPSHOT"
_STALE = (
    protocol.SNAPSHOT_COMPLETE,
    protocol.SNAPSHOT_FAILED,
    protocol.RESTORE_COMPLETE,
    protocol.RESTORE_CONTEXT,
    protocol.READY_FOR_SNAPSHOT,
)


class Outcome(enum.Enum):
    NOT_REQUESTED = "not-requested"  # no control dir: nothing happened
    RESTORED = "restored"  # this is a restored copy
    SNAPSHOTTED = "snapshotted"  # the original, told to continue after its snapshot
    SNAPSHOT_FAILED = "snapshot-failed"  # the checkpointer gave up; running un-snapshotted
    TIMED_OUT = "timed-out"  # nobody answered within `timeout`; running un-snapshotted


class ForeignSnapshot(UsageError):
    """A restore marker that belongs to another worker's snapshot."""


class BadRestoreContext(UsageError):
    """``restore-context.json`` is missing or unreadable."""


RestoreCallback = Callable[[protocol.RestoreContext], None]


class Coordinator:
    """State of one process's checkpoint point (module functions use a default one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[RestoreCallback] = []
        self._restored = False
        self._context: protocol.RestoreContext | None = None
        self._checkpoint_id: str | None = None

    # -- public API -----------------------------------------------------------------------

    def on_restore(self, callback: RestoreCallback) -> RestoreCallback:
        """Run ``callback(context)`` after a restore, before phase 2. Usable as a decorator."""
        with self._lock:
            self._callbacks.append(callback)
        return callback

    def was_restored(self) -> bool:
        return self._restored

    def restore_context(self) -> protocol.RestoreContext | None:
        return self._context

    @property
    def checkpoint_id(self) -> str | None:
        return self._checkpoint_id

    def checkpoint_point(
        self,
        release: Callable[[], None] | None = None,
        reacquire: Callable[[], None] | None = None,
        timeout: float | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        control_dir: str | os.PathLike[str] | None = None,
        continue_after_snapshot: bool | None = None,
        poll_interval: float = 0.005,
        exit_original: Callable[[], None] | None = None,
    ) -> Outcome:
        directory = control_dir or os.environ.get(protocol.CONTROL_DIR_ENV)
        if not directory:
            return Outcome.NOT_REQUESTED
        cdir = Path(directory)
        if not cdir.is_dir():
            raise UsageError(
                f"{protocol.CONTROL_DIR_ENV}={cdir} is not a directory",
                hint="create it (the checkpointer watches it) or unset the variable",
            )
        if continue_after_snapshot is None:
            continue_after_snapshot = os.environ.get(CONTINUE_ENV, "") in ("1", "true", "yes")

        apply_checkpoint_env()
        check_checkpointable()
        for name in _STALE:
            stale = cdir / name
            if stale.exists():
                log.warning("removing stale %s from %s", name, cdir)
                stale.unlink(missing_ok=True)

        self._checkpoint_id = uuid.uuid4().hex
        if release is not None:
            release()
        info = protocol.ReadyInfo(
            pid=os.getpid(), labels=dict(labels or {}), checkpoint_id=self._checkpoint_id
        )
        _flush_stdio()
        protocol.signal_file(cdir, protocol.READY_FOR_SNAPSHOT, info)
        log.info("ready for snapshot (checkpoint_id %s); waiting in %s", self._checkpoint_id, cdir)

        outcome = self._wait(cdir, timeout, poll_interval)
        (cdir / protocol.READY_FOR_SNAPSHOT).unlink(missing_ok=True)

        if outcome is Outcome.RESTORED:
            context = self._load_context(cdir)
            os.environ.update(context.env)
            if reacquire is not None:
                reacquire()
            self._context = context
            self._restored = True
            for callback in list(self._callbacks):
                callback(context)
            log.info("restored from snapshot %s (%s)", context.snapshot_name, context.snapshot_id)
            return outcome
        if outcome is Outcome.SNAPSHOTTED and not continue_after_snapshot:
            log.info("snapshot complete; the original exits")
            (exit_original or _exit_original)()
            return outcome  # only reached when exit_original returns (tests)
        if reacquire is not None:
            reacquire()
        if outcome is Outcome.SNAPSHOT_FAILED:
            log.warning("checkpointer reported snapshot-failed; continuing un-snapshotted")
        elif outcome is Outcome.TIMED_OUT:
            log.warning("no checkpointer answered within %ss; continuing un-snapshotted", timeout)
        return outcome

    # -- internals ------------------------------------------------------------------------

    def _wait(self, cdir: Path, timeout: float | None, poll: float) -> Outcome:
        # Wall-clock deadline: a restored copy sees time jump, so on expiry it looks once
        # more after a short grace before giving up.
        deadline = None if timeout is None else time.time() + timeout
        expired_once = False
        while True:
            for name, outcome in (
                (protocol.RESTORE_COMPLETE, Outcome.RESTORED),
                (protocol.SNAPSHOT_FAILED, Outcome.SNAPSHOT_FAILED),
                (protocol.SNAPSHOT_COMPLETE, Outcome.SNAPSHOTTED),
            ):
                if (cdir / name).exists():
                    return outcome
            if deadline is not None and time.time() >= deadline:
                if expired_once:
                    return Outcome.TIMED_OUT
                expired_once = True
                deadline = time.time() + max(1.0, 10 * poll)
            time.sleep(poll)

    def _load_context(self, cdir: Path) -> protocol.RestoreContext:
        path = cdir / protocol.RESTORE_CONTEXT
        if not path.exists():
            raise BadRestoreContext(
                f"{protocol.RESTORE_COMPLETE} appeared in {cdir} but {protocol.RESTORE_CONTEXT} is missing",
                hint="the restorer must write the context before the completion marker",
            )
        try:
            context = protocol.read_model(path, protocol.RestoreContext)
        except (ValueError, ValidationError) as exc:
            first = str(exc).splitlines()[0]
            raise BadRestoreContext(
                f"{path} is not a valid restore context ({first})",
                hint="write it with warmstart.protocol.RestoreContext",
            ) from None
        if context.checkpoint_id != self._checkpoint_id:
            raise ForeignSnapshot(
                f"restore context is for checkpoint {context.checkpoint_id!r} "
                f"(snapshot {context.snapshot_name!r}), this worker is {self._checkpoint_id!r}",
                hint="the restore marker belongs to another snapshot; restore with its own context",
            )
        return context


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _exit_original() -> None:
    _flush_stdio()
    logging.shutdown()
    os._exit(0)


_default = Coordinator()


def checkpoint_point(
    release: Callable[[], None] | None = None,
    reacquire: Callable[[], None] | None = None,
    timeout: float | None = None,
    **kwargs: object,
) -> Outcome:
    """See the module docstring. Keyword options: labels, control_dir,
    continue_after_snapshot, poll_interval, exit_original."""
    return _default.checkpoint_point(release, reacquire, timeout, **kwargs)  # type: ignore[arg-type]


def on_restore(callback: RestoreCallback) -> RestoreCallback:
    return _default.on_restore(callback)


def was_restored() -> bool:
    return _default.was_restored()


def restore_context() -> protocol.RestoreContext | None:
    return _default.restore_context()
