"""Pull a snapshot from a remote store while something reads it (``restore URL``).

:meth:`RemoteStore.pull <warmstart.store.remote.RemoteStore.pull>` fetches
everything and then publishes. A :class:`StreamingPull` fetches the same
chunks into the same resumable staging directory, in steps a restore can
interleave with its own work:

1. :meth:`StreamingPull.open`: the trust check (first, as for a pull), then
   the manifest and every file except the *bulk* ones (page images), fetched
   and verified.
2. Reads of bulk files through :meth:`StreamingPull.reader`: a read blocks
   until the chunks covering its bytes are in and passed their BLAKE3 check;
   a chunk nobody fetches yet is fetched by the reader itself, at once (so the
   few page runs CRIU reads itself, and page faults, never queue behind the
   bulk download). If the download failed, the read raises its error.
3. :meth:`StreamingPull.start`: every remaining chunk in the background, in
   file order, on ``jobs`` threads.
4. :meth:`StreamingPull.wait` (all in, or the error), then
   :meth:`StreamingPull.publish`, or :meth:`StreamingPull.abort`.

A snapshot becomes visible in the local store only by ``publish``; an aborted
stream leaves its staging directory (resumable by a later pull) unless the
store sent damaged data, which removes it.
"""

from __future__ import annotations

import bisect
import copy
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.errors import SnapshotCorrupt, StoreError, WarmstartError
from warmstart.host.sparse import write_sparse
from warmstart.snapshot.manifest import MANIFEST_NAME, Manifest
from warmstart.store.compress import CODECS, CompressedPages, suffix
from warmstart.store.index import ChunkRef, FileRef, SnapshotIndex
from warmstart.store.local import LocalStore, Staging, check_name
from warmstart.store.remote import (
    Progress,
    RateLimit,
    RemoteStore,
    _digest,
    check_pulled_manifest,
    create_sized,
)
from warmstart.store.signing import TrustDecision, TrustPolicy

_PENDING, _FETCHING, _DONE = 0, 1, 2


def is_page_image(rel: str) -> bool:
    """A snapshot file that holds page contents: ``images/pages-N.img`` or its compressed form."""
    parts = rel.split("/")
    if len(parts) != 2 or parts[0] != "images" or not parts[1].startswith("pages-"):
        return False
    return parts[1].endswith(".img") or any(parts[1].endswith(".img" + suffix(c)) for c in CODECS)


@dataclass
class _File:
    ref: FileRef
    fd: int
    starts: list[int]
    state: list[int]

    @classmethod
    def of(cls, ref: FileRef, fd: int) -> _File:
        starts, pos = [], 0
        for c in ref.chunks:
            starts.append(pos)
            pos += c.size
        return cls(ref, fd, starts, [_PENDING] * len(ref.chunks))

    def covering(self, offset: int, length: int) -> range:
        """Indices of the chunks holding bytes [offset, offset + length)."""
        if length <= 0 or not self.starts:
            return range(0)
        lo = max(0, bisect.bisect_right(self.starts, offset) - 1)
        hi = bisect.bisect_left(self.starts, offset + length)
        return range(lo, hi)


@dataclass
class StreamStats:
    """What arrived when: the basis of the overlap a streaming restore reports."""

    logical_bytes: int = 0
    #: Bytes of the files fetched by :meth:`StreamingPull.open` (manifest, small images).
    meta_bytes: int = 0
    #: Bytes of page images in total, and those in place when :meth:`StreamingPull.mark` was called.
    bulk_bytes: int = 0
    bulk_at_mark: int = 0
    #: Bytes downloaded (not found in place from an interrupted earlier pull).
    fetched_bytes: int = 0
    resumed_bytes: int = 0
    #: Bulk chunks fetched by readers ahead of the background order.
    on_demand_chunks: int = 0
    #: perf_counter() times: open, background start, mark, last chunk in.
    opened_at: float = 0.0
    started_at: float = 0.0
    marked_at: float | None = None
    done_at: float | None = None
    trust: TrustDecision | None = None

    @property
    def overlapped_bytes(self) -> int:
        """Page-image bytes that arrived after the mark (while the restore ran)."""
        return self.bulk_bytes - self.bulk_at_mark if self.marked_at is not None else 0


@dataclass
class StreamingPull:
    """One snapshot streaming from ``remote`` into ``local``; see the module docstring."""

    remote: RemoteStore
    name: str
    local: LocalStore
    as_name: str | None = None
    trust: TrustPolicy | None = None
    progress: Progress = field(default_factory=Progress)
    limit_rate: float | None = None
    #: Which snapshot files are read while they arrive (default: the page images).
    is_bulk: Callable[[str], bool] = is_page_image
    #: Called with a short line per event ("chunk PATH#I", "fetch-complete", ...), in order.
    on_event: Callable[[str], None] | None = None

    index: SnapshotIndex | None = field(init=False, default=None)
    manifest: Manifest | None = field(init=False, default=None)
    staging: Staging | None = field(init=False, default=None)
    stats: StreamStats = field(init=False, default_factory=StreamStats)

    def __post_init__(self) -> None:
        self._files: dict[str, _File] = {}
        self._cond = threading.Condition()
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._resumed = False
        self._limiter = RateLimit(self.limit_rate) if self.limit_rate else None
        self._closed = False

    # -- steps -----------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The staging directory the snapshot arrives in (until it is published)."""
        assert self.staging is not None, "open() first"
        return self.staging.path

    def open(self) -> Manifest:
        """Trust check, staging directory, manifest and every non-bulk file; returns the manifest."""
        self.stats.opened_at = time.perf_counter()
        index, self.stats.trust = self.remote.open_index(
            self.name, self.trust or TrustPolicy.from_env()
        )
        self.index = index
        local_name = check_name(self.as_name or self.name)
        tag = "pull-" + _digest(index.to_bytes())[:24]
        self.staging, self._resumed = self.local.begin_resumable(local_name, tag)
        self.stats.logical_bytes = index.logical_bytes
        self.progress.start(index.logical_bytes, f"pull {self.name}")
        try:
            manifest = self._open_files(index)
            small = [f for rel, f in self._files.items() if not self.is_bulk(rel)]
            with ThreadPoolExecutor(self.remote.jobs, thread_name_prefix="stream-meta") as pool:
                list(
                    pool.map(
                        lambda item: self._ensure_chunk(*item),
                        [(f, i) for f in small for i in range(len(f.state))],
                    )
                )
        except BaseException as exc:
            self.abort(exc)
            raise
        self.stats.meta_bytes = sum(f.ref.size for f in small) + next(
            f.size for f in index.files if f.path == MANIFEST_NAME
        )
        self.stats.bulk_bytes = sum(
            f.ref.size for rel, f in self._files.items() if self.is_bulk(rel)
        )
        self.manifest = manifest
        self._event("meta-complete")
        return manifest

    def _open_files(self, index: SnapshotIndex) -> Manifest:
        manifest = None
        for ref in index.files:
            if ref.path == MANIFEST_NAME:
                manifest = Manifest.from_json(
                    b"".join(self._fetch(c, ref.path) for c in ref.chunks),
                    where=f"{self.remote.url} {self.name}/{ref.path}",
                )
                self.stats.fetched_bytes += ref.size
                self.progress.advance(ref.size)
                continue
            fd = create_sized(self.path, ref.path, ref.size, ref.mode)
            self._files[ref.path] = _File.of(ref, fd)
        return check_pulled_manifest(self.name, manifest, index)

    def start(self) -> None:
        """Fetch every remaining chunk in the background: file order, ``jobs`` threads."""
        self.stats.started_at = time.perf_counter()
        order = iter([(f, i) for f in self._files.values() for i in range(len(f.state))])
        lock = threading.Lock()

        def work() -> None:
            while not self._stop.is_set():
                with lock:
                    item = next(order, None)
                if item is None:
                    return
                try:
                    self._ensure_chunk(*item, wait=False)
                except BaseException as exc:  # noqa: BLE001 - handed to every reader and to wait()
                    self._fail(exc)
                    return

        for n in range(self.remote.jobs):
            t = threading.Thread(target=work, name=f"stream-{n}", daemon=True)
            t.start()
            self._threads.append(t)

    def mark(self) -> None:
        """Note the moment the consumer started (the overlap is counted from here)."""
        with self._cond:
            self.stats.marked_at = time.perf_counter()
            self.stats.bulk_at_mark = self._bulk_in()
        self._event("mark")

    def wait(self) -> None:
        """Block until every chunk is in and checked; raise the download's error if it failed."""
        for t in self._threads:
            while t.is_alive():
                t.join(0.1)
                self._raise_error()
        if not self._threads:
            raise StoreError(f"streaming {self.name}: wait() before start()")
        with self._cond:  # chunks a reader is still fetching
            while not all(s == _DONE for f in self._files.values() for s in f.state):
                self._raise_error()
                self._cond.wait(0.5)
        self._raise_error()

    def publish(self, *, durable: bool = True) -> Path:
        """Make the complete snapshot visible in the local store (after :meth:`wait`)."""
        assert self.manifest is not None and self.staging is not None
        self._close_files()
        return self.local.publish(self.staging, self.manifest, durable=durable)

    def abort(self, cause: BaseException | None = None) -> None:
        """Stop the download; remove the staging directory if the data was damaged."""
        self._fail(cause or StoreError(f"streaming {self.name} was stopped"))
        for t in self._threads:
            t.join()
        self._close_files()
        damaged = isinstance(cause, SnapshotCorrupt) or isinstance(self._error, SnapshotCorrupt)
        if self.staging is not None and damaged:
            self.local.abort(self.staging)

    # -- reading -----------------------------------------------------------------
    def reader(self, rel: str) -> StreamingPages | StreamingCompressedPages:
        """A page source over bulk file ``rel`` whose reads wait for (or fetch) their chunks."""
        f = self._files[rel]
        if rel.endswith(".img"):
            return StreamingPages(self, f, self.path / rel)
        return StreamingCompressedPages(self, f, self.path / rel)

    def open_pages(self, path: Path) -> StreamingPages | StreamingCompressedPages:
        """:class:`~warmstart.host.pageserver.PageServer`'s ``open_pages`` for this snapshot's images."""
        rel = str(Path(path).relative_to(self.path))
        for candidate in (rel, *(rel + suffix(c) for c in CODECS)):
            if candidate in self._files:
                return self.reader(candidate)
        raise SnapshotCorrupt(
            f"{rel} is not part of snapshot {self.name!r}", hint="the snapshot is damaged"
        )

    def bulk_files(self) -> list[str]:
        return [rel for rel in self._files if self.is_bulk(rel)]

    def ensure(self, f: _File, offset: int, length: int) -> None:
        """Return once bytes [offset, offset + length) of ``f`` are in place (fetching them if nobody is)."""
        for i in f.covering(offset, length):
            self._ensure_chunk(f, i, on_demand=True)

    # -- chunks ------------------------------------------------------------------
    def _ensure_chunk(
        self, f: _File, i: int, *, on_demand: bool = False, wait: bool = True
    ) -> None:
        """Fetch chunk ``i`` of ``f`` unless it is in; one that another thread is fetching is
        waited for (``wait``) or left to it."""
        with self._cond:
            while True:
                self._raise_error()
                if f.state[i] == _DONE:
                    return
                if f.state[i] == _PENDING:
                    f.state[i] = _FETCHING
                    break
                if not wait:
                    return
                self._cond.wait(0.5)
        try:
            self._place(f, i)
        except BaseException as exc:
            self._fail(exc)
            raise
        with self._cond:
            f.state[i] = _DONE
            if on_demand and self.is_bulk(f.ref.path):
                self.stats.on_demand_chunks += 1
            last = all(s == _DONE for g in self._files.values() for s in g.state)
            if last:
                self.stats.done_at = time.perf_counter()
            self._cond.notify_all()
        self._event(f"chunk {f.ref.path}#{i}")
        if last:
            self._event("fetch-complete")

    def _place(self, f: _File, i: int) -> None:
        ref, offset = f.ref.chunks[i], f.starts[i]
        if self._resumed:
            have = os.pread(f.fd, ref.size, offset)
            if len(have) == ref.size and _digest(have) == ref.digest:
                with self._cond:
                    self.stats.resumed_bytes += ref.size
                self.progress.advance(ref.size)
                return
        data = self._fetch(ref, f.ref.path)
        try:
            write_sparse(f.fd, data, offset)  # zero runs stay holes, as at checkpoint
        except OSError as exc:
            raise StoreError(
                f"cannot write {self.path / f.ref.path}: {exc.strerror}",
                hint="free space in the local store and restore again (the download resumes)",
            ) from None
        with self._cond:
            self.stats.fetched_bytes += ref.size
        self.progress.advance(ref.size)

    def _fetch(self, ref: ChunkRef, where: str) -> bytes:
        return self.remote.fetch_chunk(ref, where, self._limiter)

    def _bulk_in(self) -> int:
        return sum(
            c.size
            for rel, f in self._files.items()
            if self.is_bulk(rel)
            for c, s in zip(f.ref.chunks, f.state)
            if s == _DONE
        )

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
                self._event(f"failed {type(exc).__name__}")
            self._stop.set()
            self._cond.notify_all()

    def _raise_error(self) -> None:
        err = self._error
        if err is None:
            return
        if isinstance(err, WarmstartError):
            raise copy.copy(err)
        raise StoreError(
            f"streaming {self.name} failed: {err}", hint="restore again (the download resumes)"
        )

    def _event(self, what: str) -> None:
        if self.on_event is not None:
            self.on_event(what)

    def _close_files(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            files = list(self._files.values())
        for f in files:
            try:
                os.close(f.fd)
            except OSError:
                pass


class StreamingPages:
    """A raw pages image that is still arriving (the streaming twin of ``PlainPages``)."""

    def __init__(self, pull: StreamingPull, f: _File, path: Path) -> None:
        self._pull, self._file = pull, f
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def readinto(self, view: memoryview, offset: int) -> int:
        length = max(0, min(len(view), self._file.ref.size - offset))
        self._pull.ensure(self._file, offset, length)
        return os.preadv(self._fd, [view[:length]], offset) if length else 0

    def prefetch(self, offset: int, length: int) -> None:
        """Have bytes [offset, offset + length) in place (fetched now if nobody fetches them)."""
        self._pull.ensure(self._file, offset, length)

    def close(self) -> None:
        os.close(self._fd)


class StreamingCompressedPages(CompressedPages):
    """A compressed pages image that is still arriving: each stored range is waited for first."""

    def __init__(self, pull: StreamingPull, f: _File, path: Path) -> None:
        self._pull, self._file = pull, f
        super().__init__(path)

    def _pread(self, length: int, offset: int) -> bytes:
        self._pull.ensure(self._file, offset, max(0, min(length, self._file.ref.size - offset)))
        return super()._pread(length, offset)

    def prefetch(self, offset: int, length: int) -> None:
        """Have the stored chunks of raw bytes [offset, offset + length) in place."""
        t = self._table
        end = min(offset + length, t.raw_size)
        for index in range(offset // t.chunk, -(-end // t.chunk)):
            off, size = t.entries[index]
            self._pull.ensure(self._file, off, size)
