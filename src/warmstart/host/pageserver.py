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
import ctypes
import errno
import json
import logging
import mmap
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from warmstart.errors import CriuError
from warmstart.host import uffd
from warmstart.host.fillqueue import Chunk, FillQueue
from warmstart.host.pagemap import (
    PAGE_SIZE,
    PE_PRESENT,
    Pagemap,
    PageRun,
    RunsCache,
    pages_image_of,
    read_pagemap,
    read_vmas,
    split_at_vmas,
)
from warmstart.host.residency import read_in
from warmstart.host.sparse import HoleMap

log = logging.getLogger(__name__)

SOCKET_NAME = "lazy-pages.socket"
#: What CRIU sends on the socket once the restore is over ("RSTF").
RESTORE_FINISHED = 0x52535446
#: Bytes one fill job reads and copies at a time.
DEFAULT_CHUNK = 8 << 20
#: Synchronous reads the readahead keeps in flight: enough to keep a disk busy, few
#: enough that CRIU's own small reads never queue behind much.
READAHEAD_THREADS = 4
#: Bytes served around a faulting address (prefetch for the fault's neighbours).
FAULT_CHUNK = 256 << 10
#: Runs shorter than this are filled in batches (one read, then one bare ``UFFDIO_COPY``
#: each, the GIL kept) by one thread at a time, the batch lane: per run the cost is
#: Python's, not the kernel's, and threads that take turns at the GIL for many short
#: calls only slow each other down.
SMALL_RUN = 256 << 10
#: Holes of a pages image shorter than this are copied like data (they read as
#: zeros); longer ones get the zero page (see :func:`_coarse`).
SMALL_HOLE = 1 << 20
#: Most image bytes one batch of small runs spans.
BATCH_SPAN = 8 << 20


#: Threads that check the pages image's pieces as the fill completes them (hashing
#: from the page cache runs at several GB/s a thread; a piece is 64 MiB).
CHECKERS = 4


#: Python's thread switch interval while a page server runs (the default is 5 ms). The
#: fill threads, the batch lane (which keeps the GIL across its small copies) and the
#: thread answering the restorer's faults each need the GIL for a moment between
#: system calls; with 5 ms slices they wait for it. Measured on the GPU worker (H200,
#: seventh session): fill 6.5 -> 8.4-9.3 GB/s, the restorer's 52 faults served in 4 ms
#: instead of 30.
SWITCH_INTERVAL = 0.0002


class _ShortSwitch:
    """Holds :data:`SWITCH_INTERVAL` while any page server in the process runs (counted:
    restores may run side by side, in the node agent), then puts the old value back."""

    _lock = threading.Lock()
    _users = 0
    _saved = 0.0

    @classmethod
    def enter(cls) -> None:
        with cls._lock:
            if cls._users == 0:
                cls._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(cls._saved, SWITCH_INTERVAL))
            cls._users += 1

    @classmethod
    def exit(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users == 0:
                sys.setswitchinterval(cls._saved)


def default_threads() -> int:
    return max(2, min(16, os.cpu_count() or 2))


#: madvise(2) advice that maps a range's page-cache pages in one call (Linux 5.14+).
_MADV_POPULATE_READ = 22


class PlainPages:
    """A pages image as CRIU wrote it.

    The file is also mapped, so :meth:`address` lets ``UFFDIO_COPY`` read the
    page cache directly: one copy per byte instead of ``pread`` + copy. Its
    :attr:`holes` (runs of zero pages punched out at checkpoint,
    :mod:`warmstart.host.sparse`) are never read: the zero page is mapped there.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size
        self.holes = HoleMap(self._fd, self.size)
        self._map: mmap.mmap | None = None
        self._base = 0
        if self.size:
            # ACCESS_COPY is MAP_PRIVATE: writable to ctypes, never written, so never copied.
            self._map = mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY)
            first = ctypes.c_char.from_buffer(self._map)
            self._base = ctypes.addressof(first)
            del first  # the address stays valid while the mapping is open; the export must not

    def readinto(self, view: memoryview, offset: int) -> int:
        return os.preadv(self._fd, [view], offset)

    def address(self, offset: int, length: int) -> int | None:
        """Where [offset, offset + length) of the image is mapped here, its pages read in."""
        if self._map is None or offset + length > self.size:
            return None  # short image: the caller's read reports it
        start = offset - offset % mmap.PAGESIZE
        try:
            self._map.madvise(_MADV_POPULATE_READ, start, offset + length - start)
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # EINVAL: older kernel, UFFDIO_COPY faults them in itself
                return None  # e.g. the file shrank: the caller's read reports it
        return self._base + offset

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        os.close(self._fd)


class PagesSource(Protocol):
    """Where the bytes of a pages image come from (the file, or a compressed form of it).

    A source may also offer ``address(offset, length) -> int | None``: the
    bytes mapped in this process, copied from there without a read.
    """

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
    #: its fill chunks, listed with the parse (None: list them at the fill)
    chunks: list[Chunk] | None = None

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

    def live_parts(self, start: int, end: int) -> list[tuple[int, int]]:
        """[start, end) less what the task unmapped or discarded since the restore."""
        parts = [(start, end)]
        for rs, re_ in self.removed:
            parts = [
                piece
                for s, e in parts
                for piece in ((s, min(e, rs)), (max(s, re_), e))
                if piece[0] < piece[1]
            ]
        return parts


class _LayoutChanging(Exception):
    """UFFDIO_COPY said EAGAIN: a layout event is waiting to be read first."""


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
        zero_copy: bool = True,
        check: Callable[[Path, int, int], None] | None = None,
        check_size: int = 64 << 20,
        readahead: bool = True,
        trace: Path | None = None,
        runs_cache: Path | None = None,
    ) -> None:
        self.images = Path(images)
        #: The snapshot's decoded pagemaps (:class:`RunsCache`), loaded by the prepare thread.
        self.runs_cache = runs_cache
        self._runs: RunsCache | None = None
        self.open_pages = open_pages
        #: Called as ``check(pages image, offset, length)`` for every
        #: ``check_size`` piece of each task's pages image, right after the
        #: fill placed that piece's pages (the bytes are in the page cache
        #: then): the checksums ride along with the fill instead of reading
        #: the image a second time. Raising fails the fill.
        self.check = check
        self.check_size = check_size
        #: Ask the kernel to read the pages images in from the moment CRIU starts.
        self.readahead = readahead
        #: Copy from the mapped image where the source allows (False: always pread first).
        self.zero_copy = zero_copy
        #: Debugging: a file that receives every fault and every filled chunk, with
        #: their times, as JSON when the server closes (``trace``, else
        #: ``WARMSTART_PAGES_TRACE``; ``restore --trace-pages``;
        #: ``bench/fill_trace.py`` summarizes it). Events: ``{"kind": "chunk",
        #: "began", "ended" (perf_counter seconds), "pid", "start", "end" (its
        #: address span), "bytes" (placed), "runs" (small runs of a batch, else 0)}``
        #: ``{"kind": "fault", "at", "pid", "addr", "bytes"}``, ``{"kind": "task", "at",
        #: "ready", "pid"}`` when a task's userfaultfd arrived (its restorer is about to
        #: run) and when the task was registered (its faults are served from then on),
        #: ``{"kind": "finished", "at"}`` when CRIU said the restore is over, and
        #: ``{"kind": "mark", "at", "name"}`` for the caller's :meth:`mark`.
        self.trace_path = str(trace) if trace else os.environ.get("WARMSTART_PAGES_TRACE") or None
        self._trace: list[dict[str, Any]] = []
        self.socket_path = Path(work_dir) / SOCKET_NAME
        self.threads = threads or default_threads()
        self.chunk = max(PAGE_SIZE, chunk - chunk % PAGE_SIZE)
        self._tasks: dict[int, _Task] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._cancelled = threading.Event()
        self._resumed = threading.Event()
        self._filling = threading.Lock()
        self._errors: list[str] = []
        self._faults = 0
        self._received: set[int] = set()
        self._pending: list[tuple[_Task, int]] = []  # faults deferred behind layout events
        self._listener: socket.socket | None = None
        self._epoll = select.epoll()
        self._closed = False
        self._switching = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # close() wakes the event loop
        self._epoll.register(self._wake, select.EPOLLIN)
        self._threads: list[threading.Thread] = []
        self._local = threading.local()
        self._queue: FillQueue | None = None  # while fill() runs
        self._batches = threading.Lock()  # held by the thread filling small runs (the batch lane)
        #: PID -> (pagemap, its task: runs cut at mappings, pages source), ahead of CRIU; the
        #: task's fill chunks are listed after every task is (see ``_listed``)
        self._prepared: dict[int, Future[tuple[Pagemap, _Task]]] = {}
        #: set once the prepare thread has listed the prepared tasks' fill chunks (or gave up)
        self._listed = threading.Event()
        self._opened: list[PagesSource] = []  # every pages source opened, closed by close()
        self._expected: set[int] | None = None

    # -- lifecycle -------------------------------------------------------
    def __enter__(self) -> PageServer:
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        listener.listen(4)
        listener.settimeout(0.1)
        self._listener = listener
        try:
            self._prepared = {pid: Future() for pid in self.expected_pids()}
        except Exception as exc:  # noqa: BLE001 - each task is parsed on arrival then
            log.debug("page server: cannot list the tasks ahead of CRIU: %s", exc)
        loops = [(self._accept_loop, "pages-accept"), (self._event_loop, "pages-events")]
        if self.readahead:
            loops.append((self._read_ahead, "pages-readahead"))
        loops.append((self._prepare, "pages-prepare"))  # last: it holds the GIL while it parses
        # Short GIL slices from here on: with 5 ms ones, each thread start and each of the
        # caller's system calls waited for the parse (up to 0.14 s of the restore's preparation).
        _ShortSwitch.enter()
        self._switching = True
        try:
            for target, name in loops:
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def mark(self, name: str) -> None:
        """Put a named moment of the caller's (``criu-start``, ``criu-returned``) into the trace."""
        if self.trace_path:
            self._trace.append({"kind": "mark", "at": time.perf_counter(), "name": name})

    def tasks_resumed(self) -> None:
        """The caller let the tasks run (lazy restore): from now on a fault the
        source cannot serve leaves its task blocked rather than zero-filled."""
        self._resumed.set()

    def close(self) -> None:
        """Stop serving. A fill still running (lazy restore) is cancelled and
        waited for first, so no thread uses a descriptor after it is closed."""
        if self._closed:
            return
        self._closed = True
        self.mark("closing")
        self._cancelled.set()
        with self._filling:
            pass
        self._stop.set()
        # Wake the loops rather than let them wait out a timeout (0.085 s of a 0.17 s fill phase).
        os.eventfd_write(self._wake, 1)
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
                except OSError:
                    pass
            self._tasks.clear()
            opened, self._opened = self._opened, []
        # Unmapping gigabytes of mapped image takes tens of milliseconds and nothing waits
        # for it: the tasks are whole once their userfaultfds are closed (above).
        threading.Thread(target=_close_all, args=(opened,), name="pages-unmap", daemon=True).start()
        self.mark("closed")
        if self.trace_path:
            try:
                Path(self.trace_path).write_text(json.dumps({"events": self._trace}))
            except OSError as exc:  # a debugging aid never fails the restore
                log.warning("page server: cannot write the trace to %s: %s", self.trace_path, exc)
            self.trace_path = None
        self._epoll.close()
        os.close(self._wake)
        if self._switching:
            self._switching = False
            _ShortSwitch.exit()

    # -- readahead -------------------------------------------------------
    def _read_ahead(self) -> None:
        """Read the pages images into the page cache, CRIU's own pages first.

        With a cold page cache the restore is bound by the disk, and CRIU's
        part is a long series of small reads (file metadata, the pages it
        restores itself): these threads keep the disk busy meanwhile, each
        with one synchronous 8 MiB read at a time, in file order, so CRIU's
        reads never wait behind a deep queue (readahead requests through
        ``WILLNEED`` did that: 0.6 s for one ``open``). Holes and pages
        already in the cache are skipped. An optimisation only: any error
        just ends it.
        """
        try:
            maps = self._prepared_pagemaps()
            order = [(m.pages, [r for r in m.runs if not r.lazy and r.flags & PE_PRESENT]) for m in maps]
            order += [(m.pages, m.lazy_runs) for m in maps]
            jobs: list[tuple[Path, int, int]] = []
            for path, runs in order:
                if not runs or not path.exists():
                    continue
                with open(path, "rb", buffering=0) as f:
                    holes = HoleMap(f.fileno(), os.fstat(f.fileno()).st_size)
                # The data between holes, contiguous runs merged: a worker has thousands
                # of small runs, and one residency check per run kept this thread busy
                # (and the GIL taken) for seconds.
                spans: list[list[int]] = []
                for r in runs:
                    for offset, length, hole in holes.split(r.offset, r.length):
                        if hole:
                            continue
                        if spans and spans[-1][1] == offset:
                            spans[-1][1] = offset + length
                        else:
                            spans.append([offset, offset + length])
                jobs += [(path, pos, min(self.chunk, end - pos))
                         for start, end in spans for pos in range(start, end, self.chunk)]  # fmt: skip
            with ThreadPoolExecutor(READAHEAD_THREADS, thread_name_prefix="pages-readahead") as pool:
                list(pool.map(lambda job: None if self._stop.is_set() else read_in(*job), jobs))
        except Exception as exc:  # noqa: BLE001
            log.debug("page server: readahead stopped: %s", exc)

    # -- parsing the tasks' images ahead of CRIU ---------------------------
    def _parse(self, pid: int) -> tuple[Pagemap, _Task]:
        """A task's pagemap and its :class:`_Task` (no userfaultfd yet)."""
        pagemap = read_pagemap(self.images, pid, self._runs)
        runs = split_at_vmas(pagemap.lazy_runs, read_vmas(self.images, pid))
        pages = self.open_pages(pagemap.pages)
        with self._lock:
            self._opened.append(pages)
        return pagemap, _Task(pid=pid, fd=-1, pages=pages, runs=runs)

    def _prepare(self) -> None:
        """Parse each expected task's pagemap and mappings, and open its pages, before
        CRIU hands the task over. The restorer's first faults (its rseq area, the
        threads' stacks) wait until the task is registered here; parsing the
        reference worker's 12k runs on arrival held its restorer for 0.17 s."""
        self.mark("parse-start")
        tasks: list[_Task] = []
        try:
            if self.runs_cache is not None:
                self._runs = RunsCache.load(self.runs_cache)
            for pid, future in sorted(self._prepared.items()):
                if self._stop.is_set():
                    future.cancel()
                    continue
                try:
                    parsed = self._parse(pid)
                except Exception as exc:  # noqa: BLE001 - _add_task parses again and reports
                    future.set_exception(exc)
                    continue
                future.set_result(parsed)
                tasks.append(parsed[1])
            self.mark("parsed")
            # The fill's chunks come after every task can be registered: the restorer
            # waits for its task, the fill starts only once CRIU has returned.
            for task in tasks:
                if self._stop.is_set():
                    break
                task.chunks = self._task_chunk_list(task)
            self.mark("listed")
        finally:
            self._listed.set()

    def pagemap(self, pid: int) -> Pagemap:
        """A task's pagemap, parsed once for everyone who needs it (file readahead too)."""
        future = self._prepared.get(pid)
        if future is not None:
            try:
                return future.result()[0]
            except Exception:  # noqa: BLE001 - parsed again below, which says what is wrong
                pass
        return read_pagemap(self.images, pid, self._runs)

    def wait_prepared(self, timeout: float = 10.0) -> None:
        """Wait until every expected task is parsed (or its parse failed: it is redone,
        and reported, when the task arrives)."""
        wait(list(self._prepared.values()), timeout=timeout)

    def _prepared_pagemaps(self) -> list[Pagemap]:
        return [self.pagemap(pid) for pid in sorted(self._prepared)]

    # -- receiving userfaultfds ------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener, self._wake], [], [])
                if self._wake in ready:  # close()
                    return
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
                    if self.trace_path:
                        self._trace.append({"kind": "finished", "at": time.perf_counter()})
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
        arrived = time.perf_counter()
        prepared = self._prepared.get(pid)
        try:
            pagemap, task = prepared.result() if prepared is not None else self._parse(pid)
        except Exception:  # noqa: BLE001 - parse it here, where a failure is reported
            pagemap, task = self._parse(pid)
        task.fd = fd
        if self.trace_path:
            self._trace.append({"kind": "task", "at": arrived, "ready": time.perf_counter(), "pid": pid})
        with self._lock:
            self._tasks[fd] = task
            self._received.add(pid)
        self._epoll.register(fd, select.EPOLLIN)
        log.debug("page server: PID %d, %d lazy bytes", pid, pagemap.lazy_bytes)

    # -- events -----------------------------------------------------------
    def _event_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready = self._epoll.poll(0.0005 if self._pending else 0.05)
            except OSError:
                return
            for fd, _mask in ready:
                if fd == self._wake:
                    continue
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
                    try:
                        self._handle(task, msg)
                    except Exception as exc:  # noqa: BLE001 - the faulting task stays blocked; fill() raises
                        self._fail(f"serving PID {task.pid}: {exc}")
            self._retry_pending()

    def _retry_pending(self) -> None:
        """Serve faults deferred while layout events were pending (read above by now)."""
        pending, self._pending = self._pending, []
        for task, addr in pending:
            try:
                self._serve_fault(task, addr)
            except Exception as exc:  # noqa: BLE001
                self._fail(f"serving PID {task.pid}: {exc}")

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
            if err == errno.EAGAIN:
                self._pending.append((task, addr))
            elif err == errno.EEXIST:
                uffd.wake(task.fd, addr, PAGE_SIZE)
            return
        start = max(run.vaddr, addr - addr % FAULT_CHUNK)
        end = min(run.end, start + FAULT_CHUNK)
        with self._lock:  # never put old bytes where the task has discarded memory since
            parts = task.live_parts(start, end)
        try:
            buf = self._buffer(FAULT_CHUNK)
            placed = sum(self._copy(task, run, s, e, buf, wait=False) for s, e in parts)
        except _LayoutChanging:
            # A running (lazy) task changed its memory map: the kernel refuses
            # copies until this thread reads that event, so read it first.
            self._pending.append((task, addr))
            return
        except Exception as exc:  # noqa: BLE001 - reported by fill(), which fails the restore
            # The source could not deliver (a streamed download failed): record it.
            self._fail(f"serving a fault of PID {task.pid} at {addr:#x}: {exc}")
            if not self._resumed.is_set():
                # CRIU's restorer is the one waiting: unblock it with a zero page so
                # CRIU returns; the tasks stay stopped and fill() fails the restore.
                # A running task instead stays blocked until the restore kills it.
                if uffd.zeropage(task.fd, addr, PAGE_SIZE) == errno.EEXIST:
                    uffd.wake(task.fd, addr, PAGE_SIZE)
            return
        log.debug("fault PID %d %#x: run %#x+%d, placed %d", task.pid, addr, run.vaddr, run.length, placed)
        if self.trace_path:
            self._trace.append({"kind": "fault", "at": time.perf_counter(), "pid": task.pid, "addr": addr,
                                "bytes": placed})  # fmt: skip
        uffd.wake(task.fd, addr, PAGE_SIZE)
        queue = self._queue
        if queue is not None:  # a running task reads here: fill on from here
            queue.jump(task.pid, end)

    # -- copying ------------------------------------------------------------
    def _buffer(self, size: int) -> bytearray:
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None or len(buf) < size:
            buf = bytearray(max(size, self.chunk))
            self._local.buf = buf
        return buf

    def _copy(
        self,
        task: _Task,
        run: PageRun,
        start: int,
        end: int,
        buf: bytearray,
        *,
        wait: bool = True,
    ) -> int:
        """Place [start, end) of ``run`` in the task; return the bytes placed.

        Parts the image holds as holes get the zero page, the rest is copied.
        ``wait=False`` (the event thread) raises :class:`_LayoutChanging`
        instead of waiting for layout events only that thread can read."""
        holes: HoleMap | None = getattr(task.pages, "holes", None)
        if not holes:
            return self._copy_data(task, run, start, end, buf, wait=wait)
        placed = 0
        for offset, length, is_hole in _coarse(holes.split(run.offset + (start - run.vaddr), end - start)):
            at = run.vaddr + (offset - run.offset)
            if is_hole:
                placed += self._zero(task, at, at + length, wait=wait)
            else:
                placed += self._copy_data(task, run, at, at + length, buf, wait=wait)
        return placed

    def _zero(self, task: _Task, start: int, end: int, *, wait: bool) -> int:
        def call(pos: int) -> tuple[int, int]:
            return uffd.zero_range(task.fd, start + pos, end - start - pos)

        return self._place(task, end - start, call, "mapping zero pages into", wait=wait)

    def _place(
        self,
        task: _Task,
        length: int,
        call: Callable[[int], tuple[int, int]],
        what: str,
        *,
        wait: bool,
        on_efault: Callable[[int], int] | None = None,
    ) -> int:
        """Repeat a ``UFFDIO_*`` call until ``length`` bytes are placed; return the bytes placed.

        ``call(pos)`` places the range from ``pos`` on and returns (errno or 0,
        bytes done). Pages already there are stepped over; ``on_efault(pos)``
        takes over the rest where the source could not be read."""
        placed = pos = 0
        while pos < length:
            err, done = call(pos)
            pos += done
            placed += done
            if err == 0:
                break
            if err == errno.EEXIST:
                pos += PAGE_SIZE  # already there (a fault beat us to it)
            elif err == errno.EAGAIN and not wait:
                raise _LayoutChanging
            elif err == errno.EAGAIN:
                time.sleep(0.0005)  # layout events pending: let the event loop read them
            elif err == errno.EFAULT and on_efault is not None:
                return placed + on_efault(pos)
            elif err in (errno.ENOENT, errno.ESRCH, errno.EFAULT):
                break  # the range or the task is gone
            else:
                raise CriuError(
                    f"{what} PID {task.pid} failed: {os.strerror(err)}",
                    hint="retry the restore with --no-parallel-pages",
                )
        return placed

    @staticmethod
    def _read(task: _Task, buf: bytearray, offset: int, length: int) -> int:
        """Read ``length`` bytes of the task's pages image at ``offset`` into ``buf``; its address."""
        try:
            got = task.pages.readinto(memoryview(buf)[:length], offset)
        except OSError as exc:
            raise CriuError(
                f"reading the pages image of PID {task.pid} failed: {exc.strerror or exc}",
                hint="check the snapshot's storage; take a new snapshot if it is damaged",
            ) from None
        if got != length:
            raise CriuError(
                f"pages image of PID {task.pid} is shorter than its pagemap says",
                hint="the snapshot is damaged; take a new one",
            )
        return ctypes.addressof(ctypes.c_char.from_buffer(buf))

    def _copy_data(
        self,
        task: _Task,
        run: PageRun,
        start: int,
        end: int,
        buf: bytearray,
        *,
        buffered: bool = False,
        wait: bool = True,
    ) -> int:
        """Copy [start, end) of ``run`` from the image into the task (see :meth:`_copy`)."""
        length = end - start
        offset = run.offset + (start - run.vaddr)
        mapped = None if buffered or not self.zero_copy else getattr(task.pages, "address", None)
        src = mapped(offset, length) if mapped is not None else None
        buffered = src is None
        if src is None:
            src = self._read(task, buf, offset, length)
        source: int = src

        def call(pos: int) -> tuple[int, int]:
            return uffd.copy(task.fd, start + pos, source + pos, length - pos)

        def reread(pos: int) -> int:  # the mapped image could not be read (it shrank?): read it, which says why
            return self._copy_data(task, run, start + pos, end, buf, buffered=True, wait=wait)

        return self._place(task, length, call, "copying pages into", wait=wait,
                           on_efault=None if buffered else reread)  # fmt: skip

    def _chunks(self) -> list[Chunk]:
        """Every task's lazy memory in ``chunk``-sized pieces, in address order.

        Consecutive small runs become one batch chunk (payload: the list of runs).
        With checks, chunks are cut at the image's check pieces too, and a piece
        without lazy pages gets one empty chunk (it is checked all the same)."""
        if self._threads:  # the prepare thread runs: let it finish its listing
            self._listed.wait(5.0)
        with self._lock:
            tasks = list(self._tasks.values())
        return [c for task in tasks for c in (task.chunks if task.chunks is not None else self._task_chunk_list(task))]

    def _task_chunk_list(self, task: _Task) -> list[Chunk]:
        """One task's part of :meth:`_chunks` (listed ahead of CRIU, with the parse)."""
        piece = self.check_size if self.check is not None else None
        mine = list(self._task_chunks(task, piece))
        if piece is not None:
            size = getattr(task.pages, "size", None)
            if size is None:
                size = max((r.offset + r.length for r in task.runs), default=0)
            seen = {c.piece for c in mine}
            mine += [Chunk(task.pid, 0, 0, i, (task, None))
                     for i in range(-(-size // piece)) if i not in seen]  # fmt: skip
        return mine

    def _task_chunks(self, task: _Task, piece: int | None) -> Iterator[Chunk]:
        def piece_of(run: PageRun, pos: int) -> int | None:
            return None if piece is None else (run.offset + (pos - run.vaddr)) // piece

        batch: list[PageRun] = []
        for run in task.runs:
            if batch and (run.length >= SMALL_RUN
                          or piece_of(run, run.vaddr) != piece_of(batch[0], batch[0].vaddr)
                          or run.offset + run.length - batch[0].offset > BATCH_SPAN):
                yield self._batch_chunk(task, batch, piece_of(batch[0], batch[0].vaddr))
                batch = []
            if run.length < SMALL_RUN:
                batch.append(run)
                continue
            pos = run.vaddr
            while pos < run.end:
                end = min(run.end, pos + self.chunk)
                index = piece_of(run, pos)
                if piece is not None and index is not None:
                    end = min(end, pos + (index + 1) * piece - (run.offset + pos - run.vaddr))
                yield Chunk(task.pid, pos, end, index, (task, run))
                pos = end
        if batch:
            yield self._batch_chunk(task, batch, piece_of(batch[0], batch[0].vaddr))

    @staticmethod
    def _batch_chunk(task: _Task, batch: list[PageRun], piece: int | None) -> Chunk:
        return Chunk(task.pid, batch[0].vaddr, batch[-1].end, piece, (task, batch))

    def _fill_batch(self, task: _Task, runs: list[PageRun]) -> int:
        """Place a batch of small runs: one read of the image span, one copy per run.

        Holes inside the span are read (as zeros) and copied like data: for runs
        this small, one call per run costs more than the pages it would spare."""
        first, last = runs[0], runs[-1]
        span = last.offset + last.length - first.offset
        base = self._read(task, self._buffer(span), first.offset, span)
        placed = 0
        for run in runs:
            parts = [(run.vaddr, run.end)]
            if task.removed:
                with self._lock:
                    parts = task.live_parts(run.vaddr, run.end)
            for start, end in parts:
                src = base + run.offset - first.offset + start - run.vaddr
                err, done = uffd.copy_small(task.fd, start, src, end - start)
                placed += done
                if err:  # a fault beat us to a page, a layout change...: the careful way on
                    at, left = start + done, end - start - done

                    def call(pos: int, at: int = at, src: int = src + done,
                             left: int = left) -> tuple[int, int]:
                        return uffd.copy(task.fd, at + pos, src + pos, left - pos)

                    placed += self._place(task, left, call, "copying pages into", wait=True)
        return placed

    def expected_pids(self) -> set[int]:
        """The tasks CRIU will hand over: every task with a pagemap image (zombies have none).
        Listed once (a worker's image directory holds thousands of files)."""
        if self._expected is None:
            self._expected = task_pids(self.images)
        return set(self._expected)

    def task_fds(self) -> dict[int, int]:
        """PID -> userfaultfd of every task handed over so far (for a keeper to hold copies)."""
        with self._lock:
            return {task.pid: task.fd for task in self._tasks.values()}

    def fill(self, timeout: float = 5.0) -> FillStats:
        """Copy every lazy page into every task, in parallel; raise on any failure.

        Call once CRIU returned: it has handed over every task by then, but
        the last descriptors may still be in flight, so wait until each task
        with a pagemap has registered. A task left unfilled would read zeros
        once its userfaultfd is closed, so a missing one fails the restore.
        """
        with self._filling:
            if self._cancelled.is_set():
                raise CriuError("page server: closed before the fill", hint="retry the restore")
            return self._fill(timeout)

    def _fill(self, timeout: float) -> FillStats:
        t0 = time.perf_counter()
        expected = self.expected_pids()
        deadline = time.monotonic() + timeout
        while not expected <= self._received and not self._errors and not self._cancelled.is_set():
            if time.monotonic() > deadline:
                missing = sorted(expected - self._received)
                self._fail(f"CRIU never handed over the memory of PID {missing[0]}")
                break
            time.sleep(0.0005)
        self._raise_errors()

        self.mark("fill-start")
        failed = threading.Event()
        queue = self._queue = FillQueue(self._chunks())
        self.mark("chunks-listed")
        small: deque[Chunk] = deque()  # batches of small runs, waiting for the one batch lane
        checks: list[Future[None]] = []

        def stopped() -> bool:
            return self._cancelled.is_set() or failed.is_set()

        def place(chunk: Chunk) -> int:
            task, run = chunk.payload
            began = time.perf_counter()
            if isinstance(run, list):
                moved = self._fill_batch(task, run)
            elif run is not None:
                with self._lock:  # a running (lazy) task may have dropped parts since
                    parts = task.live_parts(chunk.start, chunk.end)
                buf = self._buffer(self.chunk)
                moved = sum(self._copy(task, run, s, e, buf) for s, e in parts)
            else:
                moved = 0
            if self.trace_path:
                self._trace.append({"kind": "chunk", "began": began, "ended": time.perf_counter(), "pid": task.pid,
                                    "start": chunk.start, "end": chunk.end, "bytes": moved,
                                    "runs": len(run) if isinstance(run, list) else 0})  # fmt: skip
            if queue.done(chunk):  # hashed on the checkers: never in the lane's way
                checks.append(checkers.submit(self._check_piece, task, chunk.piece))
            return moved

        def batch_lane() -> int:
            """Fill waiting batches if no other thread is: one lane, and nobody waits for it."""
            moved = 0
            while small and not stopped() and self._batches.acquire(blocking=False):
                try:
                    while small and not stopped():
                        moved += place(small.popleft())
                finally:
                    self._batches.release()
            return moved  # (a batch queued after the loop's last look finds the lock free)

        def worker() -> int:
            moved = 0
            try:
                while not stopped():
                    chunk = queue.take()
                    if chunk is None:
                        break
                    if isinstance(chunk.payload[1], list):
                        small.append(chunk)
                        moved += batch_lane()
                    else:
                        moved += place(chunk)
            except BaseException:
                failed.set()  # the other threads stop copying
                raise
            return moved

        try:
            with (
                ThreadPoolExecutor(CHECKERS, thread_name_prefix="pages-check") as checkers,
                ThreadPoolExecutor(self.threads, thread_name_prefix="pages-fill") as pool,
            ):
                futures = [pool.submit(worker) for _ in range(min(self.threads, len(queue)) or 1)]
                moved = sum(f.result() for f in futures)
                self.mark("copies-done")
                for check in checks:
                    check.result()
                self.mark("checks-done")
        finally:
            self._queue = None
        self._raise_errors()
        if self._cancelled.is_set():
            raise CriuError("page server: fill cancelled", hint="retry the restore")
        return FillStats(len(self._tasks), moved, time.perf_counter() - t0, self._faults)

    def _check_piece(self, task: _Task, index: int | None) -> None:
        """Check piece ``index`` of ``task``'s pages image, just placed (in the page cache)."""
        path = getattr(task.pages, "path", None)
        if self.check is None or path is None or index is None:
            return
        offset = index * self.check_size
        self.check(path, offset, min(self.check_size, task.pages.size - offset))  # type: ignore[attr-defined]

    def _fail(self, message: str) -> None:
        log.error("page server: %s", message)
        self._errors.append(message)

    def _raise_errors(self) -> None:
        if self._errors:
            raise CriuError(
                f"page server: {self._errors[0]}", hint="retry the restore with --no-parallel-pages"
            )


def _coarse(parts: Iterable[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """``parts`` (offset, length, is hole) with holes under :data:`SMALL_HOLE` copied as data.

    A short hole reads as zeros like any other; copying it costs a little memory
    bandwidth, while a pair of calls per hole (the zero page there, a copy after
    it), each waiting for the GIL among busy threads, cost milliseconds."""
    out: list[tuple[int, int, bool]] = []
    for offset, length, is_hole in parts:
        is_hole = is_hole and length >= SMALL_HOLE
        if out and out[-1][2] == is_hole and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length, is_hole)
        else:
            out.append((offset, length, is_hole))
    return out


def _close_all(sources: list[PagesSource]) -> None:
    for pages in sources:
        try:
            pages.close()
        except OSError:
            pass


def task_pids(images: Path) -> set[int]:
    """The tasks of a dump that have memory to restore: every ``pagemap-<pid>.img``."""
    return {
        int(p.name[len("pagemap-") : -len(".img")])
        for p in Path(images).glob("pagemap-*.img")
        if p.name[len("pagemap-") : -len(".img")].isdigit()
    }


def served_pages_images(images: Path) -> set[Path]:
    """The pages images a :class:`PageServer` fills from, and so can check as it fills."""
    return {pages_image_of(images, pid) for pid in task_pids(images)}


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
