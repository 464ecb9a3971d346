"""Checksums of snapshot files: computed while CRIU writes, verified while it reads.

Digests are xxh3-128 (``xxh3-128:<hex>``): about 30 GB/s on one core here, so
the cost of integrity is the read from the page cache, not the hash. The
checkpoint path hashes page images *while* CRIU writes them
(:class:`FollowingDigester`); the restore path verifies *while* CRIU restores
into stopped tasks, which are only let run once every file checked out.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import xxhash

from warmstart.errors import SnapshotCorrupt
from warmstart.host.sparse import HoleMap, ZeroRuns, punch_hole
from warmstart.store.writeback import start_writeback

ALGORITHM = "xxh3-128"
_CHUNK = 8 << 20
#: Window of a growing file mapped at a time by FollowingDigester.
_WINDOW = 64 << 20


def _hasher() -> xxhash.xxh3_128:
    return xxhash.xxh3_128()


def format_digest(h: xxhash.xxh3_128) -> str:
    return f"{ALGORITHM}:{h.hexdigest()}"


#: Files up to this size are read in one go by :func:`digest_file` (no 8 MiB buffer
#: to allocate: a snapshot's dozens of small CRIU images cost 10x less that way).
_SMALL = 1 << 20


def digest_file(path: Path) -> tuple[int, str]:
    """(size, digest) of one file."""
    h = _hasher()
    with open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size <= _SMALL:
            data = f.readall()  # to the end, should it have grown meanwhile
            h.update(data)
            return len(data), format_digest(h)
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        size = 0
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, format_digest(h)


#: Large files also get one digest per piece of this size, so a restore can
#: verify them on many cores instead of one.
PIECE_SIZE = 64 << 20


@dataclass
class _Follow:
    hasher: xxhash.xxh3_128
    offset: int = 0
    piece: xxhash.xxh3_128 = field(default_factory=_hasher)
    pieces: list[str] = field(default_factory=list)
    #: Set when zero runs are punched out of the file as it grows.
    zeros: ZeroRuns | None = None

    def feed(self, data: memoryview) -> None:
        """Hash ``data`` (the bytes at ``offset``) into the file and piece digests."""
        self.hasher.update(data)
        pos = 0
        while pos < len(data):
            room = PIECE_SIZE - (self.offset + pos) % PIECE_SIZE
            part = data[pos : pos + room]
            self.piece.update(part)
            pos += len(part)
            if len(part) == room:
                self.pieces.append(format_digest(self.piece))
                self.piece = _hasher()

    def close_pieces(self) -> list[str]:
        if self.offset % PIECE_SIZE:
            self.pieces.append(format_digest(self.piece))
            self.piece = _hasher()
        return self.pieces


class FollowingDigester:
    """Hash the large, append-only files of a directory while another process writes them.

    Call :meth:`start`, let the writer run, then :meth:`finish` once it has
    exited: it hashes what is left and every other file, and returns
    ``{relative path: (size, digest)}``. Only files matching ``follow`` are
    hashed as they grow (CRIU writes ``pages-*.img`` strictly by appending);
    everything else is hashed whole at the end. Starting their write-back to
    disk is another job (:class:`warmstart.store.writeback.EarlyWriteback`).
    With ``sparse=True`` runs of zeros in the followed files are punched out
    as holes once read (:mod:`warmstart.host.sparse`): the bytes, and so the
    digests, stay the same; :attr:`punched` counts what was freed.

    The growing files are hashed straight from the page cache through a
    read-only mapping (no copy into a buffer: half the CPU of ``read``, which
    matters on a machine whose cores CRIU and the kernel's write-back also
    want). Only files that nobody truncates may be followed: CRIU never
    truncates a page image, and the directory is our own staging directory.
    """

    def __init__(self, root: Path, *, follow: str = "pages-*.img", sparse: bool = False) -> None:
        self.root = Path(root)
        self.follow = follow
        self.sparse = sparse
        self.punched = 0
        self._state: dict[Path, _Follow] = {}
        self._pieces: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="digest-follow", daemon=True)

    def start(self) -> FollowingDigester:
        self._thread.start()
        return self

    def _advance(self, path: Path) -> int:
        st = self._state.setdefault(path, _Follow(_hasher(), zeros=ZeroRuns() if self.sparse else None))
        moved = 0
        runs: list[tuple[int, int]] = []
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            while st.offset < size:
                base = st.offset - st.offset % mmap.ALLOCATIONGRANULARITY
                length = min(size - base, _WINDOW)
                with (
                    mmap.mmap(f.fileno(), length, prot=mmap.PROT_READ, offset=base) as window,
                    memoryview(window) as view,
                    view[st.offset - base :] as fresh,
                ):
                    st.feed(fresh)
                    if st.zeros is not None:
                        runs += st.zeros.feed(st.offset, fresh)
                moved += base + length - st.offset
                st.offset = base + length
        self._punch(path, runs)
        return moved

    def _punch(self, path: Path, runs: list[tuple[int, int]]) -> None:
        if not runs or not self.sparse:
            return
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for start, end in runs:
                if not punch_hole(fd, start, end - start):
                    self.sparse = False  # this filesystem keeps no holes: stop trying
                    return
                self.punched += end - start
        finally:
            os.close(fd)

    def _loop(self) -> None:
        while not self._stop.is_set():
            moved = 0
            for path in sorted(self.root.rglob(self.follow)):
                try:
                    moved += self._advance(path)
                except FileNotFoundError:
                    continue
            if not moved:
                self._stop.wait(0.01)

    def cancel(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def finish(self) -> dict[str, tuple[int, str]]:
        self.cancel()
        result: dict[str, tuple[int, str]] = {}
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            rel = str(path.relative_to(self.root))
            if path in self._state or path.match(self.follow):
                self._advance(path)
                st = self._state[path]
                if st.zeros is not None:
                    self._punch(path, st.zeros.finish())
                result[rel] = (st.offset, format_digest(st.hasher))
                self._pieces[rel] = st.close_pieces()
            else:
                result[rel] = digest_file(path)
        return result


    def pieces(self) -> dict[str, list[str]]:
        """After :meth:`finish`: the piece digests of each followed file (:data:`PIECE_SIZE`)."""
        return dict(self._pieces)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory below ``root`` (directories last).

    Write-back of every file is started first, so the disk works on all of
    them at once and each fsync only waits for what is still in flight.
    """
    dirs: list[str] = []
    files: list[str] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        dirs.append(dirpath)
        files += [os.path.join(dirpath, name) for name in filenames]
    for sync in (start_writeback, os.fsync):
        for path in files:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                sync(fd)
            finally:
                os.close(fd)
    for d in reversed(dirs):
        fsync_dir(Path(d))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Expected:
    path: str
    size: int
    digest: str
    #: Digests of consecutive :data:`PIECE_SIZE` pieces; when given, they are
    #: checked (in parallel) instead of ``digest``.
    pieces: tuple[str, ...] = ()


def _digest_range(path: Path, offset: int, length: int) -> str:
    """The digest of ``length`` bytes at ``offset``; holes are hashed as the zeros they read as, unread."""
    h = _hasher()
    with open(path, "rb", buffering=0) as f:
        holes = HoleMap(f.fileno(), offset + length, start=offset)  # this range's holes only
        for start, size, is_hole in holes.split(offset, length):
            if is_hole:
                for pos in range(0, size, _CHUNK):
                    h.update(_zeros()[: min(_CHUNK, size - pos)])
                continue
            base = start - start % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(f.fileno(), start + size - base, prot=mmap.PROT_READ, offset=base) as window:
                with memoryview(window) as view:
                    h.update(view[start - base :])
    return format_digest(h)


@cache
def _zeros() -> memoryview:
    return memoryview(bytes(_CHUNK))


def check_size(root: Path, e: Expected) -> None:
    """Raise :class:`SnapshotCorrupt` if a snapshot file is missing or not the size its manifest says."""
    try:
        size = (root / e.path).stat().st_size
    except FileNotFoundError:
        raise SnapshotCorrupt(
            f"snapshot file {e.path} is missing", hint="the snapshot is damaged; take a new one"
        ) from None
    if size != e.size:
        raise SnapshotCorrupt(
            f"snapshot file {e.path} has {size} bytes, manifest says {e.size}",
            hint="the snapshot is damaged; take a new one",
        )


def check_piece(root: Path, e: Expected, index: int) -> int:
    """Check piece ``index`` of a file with piece digests; return its length.

    Raises :class:`SnapshotCorrupt` if it does not match. Holes are hashed as
    the zeros they read as, without reading them."""
    offset = index * PIECE_SIZE
    length = min(PIECE_SIZE, e.size - offset)
    if _digest_range(root / e.path, offset, length) != e.pieces[index]:
        raise SnapshotCorrupt(
            f"snapshot file {e.path} fails its checksum (bytes {offset}-{offset + length})",
            hint="the snapshot is damaged; take a new one",
        )
    return length


def verify_files(root: Path, expected: Iterable[Expected], *, workers: int | None = None) -> int:
    """Check every file's size and digest; return the bytes read.

    Raises :class:`SnapshotCorrupt` naming the first bad file. Files with
    piece digests are checked piece by piece on a thread pool (xxhash and
    page-cache reads release the GIL), so a large page image takes all cores.
    """
    items = sorted(expected, key=lambda e: -e.size)

    def check(e: Expected) -> int:
        path = root / e.path
        check_size(root, e)
        if e.pieces:
            if len(e.pieces) != -(-e.size // PIECE_SIZE):
                raise SnapshotCorrupt(
                    f"snapshot file {e.path} has {len(e.pieces)} piece digests for {e.size} bytes",
                    hint="the snapshot is damaged; take a new one",
                )
            return 0  # its pieces are checked as jobs of their own
        _size, digest = digest_file(path)
        if digest != e.digest:
            raise SnapshotCorrupt(
                f"snapshot file {e.path} fails its checksum",
                hint="the snapshot is damaged; take a new one",
            )
        return e.size

    workers = workers or max(2, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
        total = sum(pool.map(check, items))  # sizes and whole-file digests first
        jobs = [(e, i) for e in items for i in range(len(e.pieces))]
        return total + sum(pool.map(lambda job: check_piece(root, *job), jobs))
