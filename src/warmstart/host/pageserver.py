"""A parallel page server for ``criu restore --lazy-pages``.

CRIU's restore writes a task's memory back with one ``preadv`` per task, in
the task itself, one 4 KiB page fault at a time: about 2 GB/s however many
cores the host has. With ``--lazy-pages`` CRIU instead leaves the private
anonymous memory unpopulated, registers it with a userfaultfd, and hands that
descriptor to a page server over ``<work dir>/lazy-pages.socket``. This is
that server: it reads the snapshot's pagemaps, and

* answers page faults as they come (the restorer itself may touch memory), and
* :meth:`PageServer.fill` copies every remaining page into every task with a
  pool of threads (``UFFDIO_COPY`` from large ``pread`` buffers), while the
  tasks are held stopped (``--leave-stopped``).

Only when everything is in place does the caller let the tasks run, so a
restored worker never sees a missing page: if this server fails, the restore
fails and the tree is killed. Closing the server closes the userfaultfds, and
the kernel returns the ranges to ordinary anonymous memory.

The socket protocol is CRIU's (criu/uffd.c): per task, the virtual PID as a
native int, then (for a live task) the userfaultfd over SCM_RIGHTS with one
dummy byte. A negative PID announces a zombie, with no descriptor.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from warmstart.errors import CriuError
from warmstart.host import uffd
from warmstart.host.pagemap import PAGE_SIZE, PageRun, read_pagemap, read_vmas, split_at_vmas

log = logging.getLogger(__name__)

SOCKET_NAME = "lazy-pages.socket"
#: What CRIU sends on the socket once the restore is over ("RSTF").
RESTORE_FINISHED = 0x52535446
#: Bytes one fill job reads and copies at a time.
DEFAULT_CHUNK = 8 << 20
#: Bytes served around a faulting address (prefetch for the fault's neighbours).
FAULT_CHUNK = 256 << 10


def default_threads() -> int:
    return max(2, min(16, os.cpu_count() or 2))


class PlainPages:
    """A pages image as CRIU wrote it."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def readinto(self, view: memoryview, offset: int) -> int:
        return os.preadv(self._fd, [view], offset)

    def close(self) -> None:
        os.close(self._fd)


class PagesSource(Protocol):
    """Where the bytes of a pages image come from (the file, or a compressed form of it)."""

    def readinto(self, view: memoryview, offset: int) -> int: ...
    def close(self) -> None: ...


@dataclass
class _Task:
    pid: int
    fd: int
    pages: PagesSource
    runs: list[PageRun]
    starts: list[int] = field(init=False)
    removed: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.runs.sort(key=lambda r: r.vaddr)
        self.starts = [r.vaddr for r in self.runs]

    def run_at(self, addr: int) -> PageRun | None:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and self.runs[i].vaddr <= addr < self.runs[i].end:
            return self.runs[i]
        return None

    def is_removed(self, addr: int) -> bool:
        return any(s <= addr < e for s, e in self.removed)


@dataclass(frozen=True)
class FillStats:
    tasks: int
    bytes: int
    seconds: float
    faults: int


class PageServer:
    """Serve the lazy pages of one ``criu restore`` from ``images``.

    Use as a context manager around the restore: enter before starting CRIU
    (it connects to the socket at once), call :meth:`fill` once CRIU returned.
    """

    def __init__(
        self,
        images: Path,
        work_dir: Path,
        *,
        threads: int | None = None,
        chunk: int = DEFAULT_CHUNK,
        open_pages: Callable[[Path], PagesSource] = PlainPages,
    ) -> None:
        self.images = Path(images)
        self.open_pages = open_pages
        self.socket_path = Path(work_dir) / SOCKET_NAME
        self.threads = threads or default_threads()
        self.chunk = max(PAGE_SIZE, chunk - chunk % PAGE_SIZE)
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._errors: list[str] = []
        self._faults = 0
        self._received: set[int] = set()
        self._listener: socket.socket | None = None
        self._epoll = select.epoll()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> PageServer:
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(4)
        listener.settimeout(0.1)
        self._listener = listener
        for target, name in ((self._accept_loop, "pages-accept"), (self._event_loop, "pages-events")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.socket_path.unlink(missing_ok=True)
        with self._lock:
            for task in self._tasks.values():
                try:
                    os.close(task.fd)
                    task.pages.close()
                except OSError:
                    pass
            self._tasks.clear()
        self._epoll.close()

    # -- receiving userfaultfds ------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._receive, args=(conn,), name="pages-recv", daemon=True).start()

    def _receive(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        with conn:
            while not self._stop.is_set():
                try:
                    raw = _recv_exact(conn, 4, self._stop)
                except TimeoutError:
                    continue
                if raw is None:
                    return
                (pid,) = struct.unpack("=i", raw)
                if pid == RESTORE_FINISHED:
                    continue
                if pid < 0:
                    continue  # a zombie: nothing to serve
                try:
                    _msg, fds, _flags, _addr = _recv_fds(conn, self._stop)
                    if not fds:
                        raise OSError("no userfaultfd attached")
                    self._add_task(pid, fds[0])
                except Exception as exc:  # noqa: BLE001 - reported by fill()
                    self._fail(f"receiving the userfaultfd of PID {pid}: {exc}")
                    return

    def _add_task(self, pid: int, fd: int) -> None:
        pagemap = read_pagemap(self.images, pid)
        pages = self.open_pages(pagemap.pages)
        runs = split_at_vmas(pagemap.lazy_runs, read_vmas(self.images, pid))
        task = _Task(pid=pid, fd=fd, pages=pages, runs=runs)
        with self._lock:
            self._tasks[fd] = task
            self._received.add(pid)
        self._epoll.register(fd, select.EPOLLIN)
        log.debug("page server: PID %d, %d lazy bytes", pid, pagemap.lazy_bytes)

    # -- events -----------------------------------------------------------
    def _event_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self._epoll.poll(0.05)
            except OSError:
                return
            for fd, _mask in ready:
                with self._lock:
                    task = self._tasks.get(fd)
                if task is None:
                    continue
                try:
                    data = os.read(fd, uffd.MSG_SIZE * 64)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._fail(f"reading events of PID {task.pid}: {exc}")
                    continue
                for msg in uffd.parse_messages(data):
                    self._handle(task, msg)

    def _handle(self, task: _Task, msg: uffd.Message) -> None:
        if msg.event == uffd.EVENT_PAGEFAULT:
            self._faults += 1
            self._serve_fault(task, msg.args[1] & ~(PAGE_SIZE - 1))
        elif msg.event in (uffd.EVENT_REMOVE, uffd.EVENT_UNMAP):
            start, end = msg.args
            with self._lock:
                task.removed.append((start, end))
        elif msg.event == uffd.EVENT_REMAP:
            self._fail(f"PID {task.pid} remapped memory while being restored")
        elif msg.event == uffd.EVENT_FORK:
            os.close(msg.args[0])
            self._fail(f"PID {task.pid} forked while being restored")

    def _serve_fault(self, task: _Task, addr: int) -> None:
        run = task.run_at(addr)
        if run is None or task.is_removed(addr):
            err = uffd.zeropage(task.fd, addr, PAGE_SIZE)
            if err == errno.EEXIST:
                uffd.wake(task.fd, addr, PAGE_SIZE)
            return
        start = max(run.vaddr, addr - addr % FAULT_CHUNK)
        end = min(run.end, start + FAULT_CHUNK)
        try:
            placed = self._copy(task, run, start, end, self._buffer(FAULT_CHUNK))
        except Exception as exc:  # noqa: BLE001 - reported by fill(), which fails the restore
            # The source could not deliver (a streamed download failed): record
            # it, and unblock the faulting task with a zero page so CRIU can
            # return; the tasks stay stopped and fill() fails the restore.
            self._fail(f"serving a fault of PID {task.pid} at {addr:#x}: {exc}")
            if uffd.zeropage(task.fd, addr, PAGE_SIZE) == errno.EEXIST:
                uffd.wake(task.fd, addr, PAGE_SIZE)
            return
        log.debug("fault PID %d %#x: run %#x+%d, placed %d", task.pid, addr, run.vaddr, run.length, placed)
        uffd.wake(task.fd, addr, PAGE_SIZE)

    # -- copying ------------------------------------------------------------
    def _buffer(self, size: int) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, self.chunk))
            self._local.buf = buf
        return buf

    def _copy(self, task: _Task, run: PageRun, start: int, end: int, buf: bytearray) -> int:
        """Copy [start, end) of ``run`` into the task; return the bytes placed."""
        import ctypes

        length = end - start
        view = memoryview(buf)[:length]
        got = task.pages.readinto(view, run.offset + (start - run.vaddr))
        if got != length:
            raise CriuError(
                f"pages image of PID {task.pid} is shorter than its pagemap says",
                hint="the snapshot is damaged; take a new one",
            )
        src = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        placed = pos = 0
        while pos < length:
            err, copied = uffd.copy(task.fd, start + pos, src + pos, length - pos)
            pos += copied
            placed += copied
            if err == 0:
                break
            if err == errno.EEXIST:
                pos += PAGE_SIZE  # already there (a fault beat us to it)
            elif err == errno.EAGAIN:
                time.sleep(0.0005)  # layout events pending: let the event loop read them
            elif err in (errno.ENOENT, errno.ESRCH, errno.EFAULT):
                break  # the range or the task is gone
            else:
                raise CriuError(
                    f"copying pages into PID {task.pid} failed: {os.strerror(err)}",
                    hint="retry the restore without --parallel-pages",
                )
        return placed

    def _jobs(self) -> Iterator[tuple[_Task, PageRun, int, int]]:
        with self._lock:
            tasks = list(self._tasks.values())
        for task in tasks:
            for run in task.runs:
                for start in range(run.vaddr, run.end, self.chunk):
                    yield task, run, start, min(run.end, start + self.chunk)

    def expected_pids(self) -> set[int]:
        """The tasks CRIU will hand over: every task with a pagemap image (zombies have none)."""
        return {
            int(p.name[len("pagemap-") : -len(".img")])
            for p in self.images.glob("pagemap-*.img")
            if p.name[len("pagemap-") : -len(".img")].isdigit()
        }

    def fill(self, timeout: float = 5.0) -> FillStats:
        """Copy every lazy page into every task, in parallel; raise on any failure.

        Call once CRIU returned: it has handed over every task by then, but
        the last descriptors may still be in flight, so wait until each task
        with a pagemap has registered. A task left unfilled would read zeros
        once its userfaultfd is closed, so a missing one fails the restore.
        """
        t0 = time.perf_counter()
        expected = self.expected_pids()
        deadline = time.monotonic() + timeout
        while not expected <= self._received and not self._errors:
            if time.monotonic() > deadline:
                missing = sorted(expected - self._received)
                self._fail(f"CRIU never handed over the memory of PID {missing[0]}")
                break
            time.sleep(0.0005)
        self._raise_errors()

        def job(item: tuple[_Task, PageRun, int, int]) -> int:
            task, run, start, end = item
            if task.is_removed(start):
                return 0
            return self._copy(task, run, start, end, self._buffer(self.chunk))

        with ThreadPoolExecutor(self.threads, thread_name_prefix="pages-fill") as pool:
            moved = sum(pool.map(job, self._jobs()))
        self._raise_errors()
        return FillStats(len(self._tasks), moved, time.perf_counter() - t0, self._faults)

    def _fail(self, message: str) -> None:
        log.error("page server: %s", message)
        self._errors.append(message)

    def _raise_errors(self) -> None:
        if self._errors:
            raise CriuError(
                f"page server: {self._errors[0]}", hint="retry the restore with --no-parallel-pages"
            )


def _recv_exact(conn: socket.socket, n: int, stop: threading.Event) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            part = conn.recv(n - len(buf))
        except TimeoutError:
            if not buf:
                raise
            if stop.is_set():
                return None
            continue
        if not part:
            return None
        buf += part
    return buf


def _recv_fds(conn: socket.socket, stop: threading.Event) -> tuple[bytes, list[int], int, object]:
    while True:
        try:
            return socket.recv_fds(conn, 1, 1)
        except TimeoutError:
            if stop.is_set():
                raise OSError("stopped while waiting for a descriptor") from None
