"""The process tree being checkpointed: validation, summary, pre-flight checks."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from functools import cache

import psutil

from warmstart.errors import UsageError
from warmstart.host import sockets


@cache
def _children_files() -> bool:
    """Whether ``/proc/PID/task/TID/children`` exists (CONFIG_PROC_CHILDREN; CRIU needs it too)."""
    return os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _child_pids(pid: int) -> list[int]:
    """Children of every thread of ``pid``, ascending (as psutil lists them); empty if gone."""
    task_dir = f"/proc/{pid}/task"
    try:
        tids = os.listdir(task_dir)
    except OSError:
        return []
    found: set[int] = set()
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/children", "rb") as fh:
                found.update(map(int, fh.read().split()))
        except OSError:
            continue  # the thread exited meanwhile
    return sorted(found)


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants, root first (psutil.NoSuchProcess if it is gone).

    In the order of psutil's ``children(recursive=True)``, but read from the
    tree's own ``/proc/PID/task/*/children`` files rather than from every
    process of the host."""
    if not _children_files():
        root = psutil.Process(pid)
        return [pid, *(c.pid for c in root.children(recursive=True))]
    if not os.path.isdir(f"/proc/{pid}/task"):
        raise psutil.NoSuchProcess(pid)
    out, seen, stack = [pid], {pid}, [pid]
    while stack:
        for child in _child_pids(stack.pop()):
            if child not in seen:
                seen.add(child)
                out.append(child)
                stack.append(child)
    return out


def tree_processes(pid: int) -> list[psutil.Process]:
    """``pid`` and all its descendants, root first."""
    root = psutil.Process(pid)
    if not _children_files():
        return [root, *root.children(recursive=True)]
    out = [root]
    for child in tree_pids(pid)[1:]:
        try:
            out.append(psutil.Process(child))
        except psutil.NoSuchProcess:
            continue
    return out


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state first); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _is_ancestor(pid: int, of: int) -> bool:
    """Whether ``pid`` is a parent, grand-parent... of ``of``."""
    seen = set()
    while of > 0 and of not in seen:
        seen.add(of)
        fields = _stat_fields(of)
        if fields is None:
            return False
        of = int(fields[1])
        if of == pid:
            return True
    return False


def validate_root(pid: int) -> psutil.Process:
    """Refuse PIDs CRIU must never be pointed at, with a clear reason."""
    if pid <= 0:
        raise UsageError(f"PID {pid} is not a valid process id", hint="pass the PID of the worker")
    if pid == 1:
        raise UsageError(
            "refusing to checkpoint PID 1 (init)", hint="pass the PID of the worker process tree"
        )
    if pid == os.getpid():
        raise UsageError("refusing to checkpoint warmstart itself", hint="pass the worker's PID")
    try:
        proc = psutil.Process(pid)
        status = proc.status()
    except psutil.NoSuchProcess:
        raise UsageError(f"no process with PID {pid}", hint="check the PID with `ps`") from None
    if status == psutil.STATUS_ZOMBIE:
        raise UsageError(f"PID {pid} has exited (zombie)", hint="check the PID with `ps`")
    if _is_ancestor(pid, os.getpid()):
        raise UsageError(
            f"PID {pid} is an ancestor of warmstart itself", hint="pass the worker's own PID"
        )
    return proc


def established_tcp(pids: Iterable[int]) -> list[str]:
    """Established TCP connections held by ``pids``, as ``local -> remote`` strings.

    Only the sockets the tree holds are looked up, in the tables of its own
    network namespaces (:class:`warmstart.host.sockets.TreeSockets`)."""
    return sockets.established_tcp(list(pids))


def has_terminal(pids: Iterable[int]) -> bool:
    for pid in pids:
        fields = _stat_fields(pid)
        # no controlling tty (tty_nr 0): nothing to look up among the /dev nodes
        if fields is None or fields[4] == "0":
            continue
        try:
            if psutil.Process(pid).terminal():
                return True
        except psutil.NoSuchProcess:
            continue
    return False


def _dead(p: psutil.Process, root: int) -> bool:
    try:
        if p.status() != psutil.STATUS_ZOMBIE:
            return False
        if p.ppid() == os.getpid():
            os.waitpid(p.pid, os.WNOHANG)  # ours to reap
            return True
        # init reaps an orphan at once: wait for the PID to be free; a live
        # parent reaps when it likes, and that is not worth waiting for
        return p.pid == root and p.ppid() != 1
    except (psutil.NoSuchProcess, ChildProcessError):
        return True


def kill_tree(pid: int, *, timeout: float = 10.0, wait: bool = True) -> None:
    """SIGKILL ``pid`` and its descendants and wait until none of them runs.

    A zombie root whose parent is alive counts as gone: reaping it is that
    parent's business, and waiting for it (psutil does, for tasks that are
    not our children) would wait on someone else. Everything else (orphans,
    which init reaps at once, and descendants) is waited for until its PID is
    free, so a restore can take it again. ``wait=False`` returns once the
    signals are sent: a stopped task that gets SIGKILL never runs again, and
    the kernel tears its memory down meanwhile (see :func:`wait_exits`).
    """
    try:
        procs = tree_processes(pid)
    except psutil.NoSuchProcess:
        return
    for p in reversed(procs):
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if not wait:
        return
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not all(_dead(p, pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


_PF_EXITING = 0x4  # include/linux/sched.h: set as a task starts to exit
_SIGKILL_PENDING = 1 << (signal.SIGKILL - 1)


def exiting(pid: int) -> bool:
    """Whether ``pid`` is dying: killed (a SIGKILL pending: it has not run since),
    tearing down, or a zombie not yet reaped."""
    fields = _stat_fields(pid)
    if fields is None:
        return False  # gone, or never there
    # stat fields 9 (flags) and 31 (signal: the pending signals, where a fatal
    # signal marks every thread until it runs and exits)
    return (
        fields[0] in ("Z", "X")
        or bool(int(fields[6]) & _PF_EXITING)
        or bool(int(fields[28]) & _SIGKILL_PENDING)
    )


def wait_exits(pids: Iterable[int], *, timeout: float = 10.0) -> None:
    """Wait while any of ``pids`` is dying (see :func:`exiting`), reaping our own children.

    A checkpoint kills its original without waiting for the kernel to free its
    memory; whoever needs those PIDs back (a restore on the same host) waits
    here. Live processes are not waited for."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while (dying := [pid for pid in pids if exiting(pid)]) and time.monotonic() < deadline:
        for pid in dying:
            try:
                os.waitpid(pid, os.WNOHANG)  # ours to reap (ECHILD otherwise)
            except ChildProcessError:
                pass
        time.sleep(delay)
        delay = min(delay * 2, 0.01)


def continue_pids(pids: Iterable[int]) -> None:
    """SIGCONT ``pids`` and their descendants: a task forked after the tree was listed
    (a shell's short-lived child) was frozen and left stopped by CRIU all the same."""
    pids = list(pids)
    every = list(pids)
    for pid in pids:
        try:
            every += tree_pids(pid)[1:]
        except psutil.NoSuchProcess:
            continue
    for pid in dict.fromkeys(every):
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def continue_tree(pid: int) -> None:
    """SIGCONT every task of the tree (after ``criu restore --leave-stopped``)."""
    for p in tree_processes(pid):
        try:
            os.kill(p.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
