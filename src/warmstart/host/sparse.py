"""Sparse page images: runs of zero pages become holes in the file.

A GPU worker's pages image holds the driver's host copy of device memory,
and a good part of it is zeros (about a third for the Qwen3-0.6B-shaped
reference worker: allocations never written). Punching those runs out of the
file keeps its bytes exactly as they were (a hole reads as zeros, so every
digest still holds), but a hole costs no disk space, no disk read on a cold
restore, and the page server maps the kernel's zero page there
(``UFFDIO_ZEROPAGE``) instead of copying 4 KiB at a time.

:class:`ZeroRuns` finds the runs in data as it streams past (the checkpoint's
digester feeds it), :func:`punch_hole` frees them, :class:`HoleMap` tells a
reader where the holes of a file are.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import os
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

#: Zero runs shorter than this stay data: a hole per stray zero page would
#: fragment the file for no gain.
MIN_HOLE = 64 << 10
_BLOCK = MIN_HOLE
_ZERO_BLOCK = bytes(_BLOCK)
_ZERO_WORD = bytes(8)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


@cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    libc.fallocate.restype = ctypes.c_int
    return libc


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free ``[offset, offset + length)`` of a file, keeping its size; False where the filesystem can't."""
    if _libc().fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def keeps_holes(directory: Path) -> bool | None:
    """Whether files in ``directory`` (or its nearest existing parent) can hold holes; None: cannot tell."""
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        fd, name = tempfile.mkstemp(prefix=".warmstart-holes-", dir=where)
    except OSError:
        return None
    try:
        os.pwrite(fd, b"\x01" * (2 * MIN_HOLE), 0)
        return punch_hole(fd, 0, MIN_HOLE) and bool(HoleMap(fd, 2 * MIN_HOLE))
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(name)


class ZeroRuns:
    """Find runs of zero bytes, in whole :data:`MIN_HOLE` blocks, in a stream fed in order.

    ``feed(offset, data)`` takes bytes of the file (``offset`` is where
    ``data`` starts) and returns the runs that ended inside it; :meth:`finish`
    returns the last. Only blocks aligned to :data:`MIN_HOLE` in the file and
    wholly inside one ``data`` count, so a block split across two feeds, or a
    gap between feeds, ends a run.
    """

    def __init__(self) -> None:
        self._run: tuple[int, int] | None = None

    def feed(self, offset: int, data: memoryview) -> list[tuple[int, int]]:
        done: list[tuple[int, int]] = []
        end = offset + len(data)
        pos = -(-offset // _BLOCK) * _BLOCK
        while pos + _BLOCK <= end:
            block = data[pos - offset : pos - offset + _BLOCK]
            if block[:8] == _ZERO_WORD and block.tobytes() == _ZERO_BLOCK:
                if self._run is not None and self._run[1] == pos:
                    self._run = (self._run[0], pos + _BLOCK)
                else:
                    done += self.finish()
                    self._run = (pos, pos + _BLOCK)
            else:
                done += self.finish()
            pos += _BLOCK
        return done

    def finish(self) -> list[tuple[int, int]]:
        run, self._run = self._run, None
        return [run] if run is not None else []


class HoleMap:
    """The holes of an open file, for readers that can do better than read zeros."""

    def __init__(self, fd: int, size: int, start: int = 0) -> None:
        """The holes of ``[start, size)`` of ``fd`` (a hole that began earlier starts at ``start``)."""
        self._starts: list[int] = []
        self._ends: list[int] = []
        pos = start
        while pos < size:
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                break  # the filesystem can't say: no holes known
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    break
                data = size  # a hole up to the end
            self._starts.append(hole)
            self._ends.append(min(data, size))
            pos = data

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> HoleMap:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return cls(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    @property
    def hole_bytes(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def is_hole(self, offset: int, length: int) -> bool:
        """Whether all of ``[offset, offset + length)`` lies in one hole."""
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset + length <= self._ends[i]

    def split(self, offset: int, length: int, *, granule: int = 4096) -> Iterator[tuple[int, int, bool]]:
        """Cut ``[offset, offset + length)`` into (offset, length, is_hole) parts.

        Hole parts are shrunk to whole ``granule`` units (the page size), so a
        reader never zero-fills a partial page that also holds data.
        """
        pos, end = offset, offset + length
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while pos < end:
            while i < len(self._starts) and self._ends[i] <= pos:
                i += 1
            if i == len(self._starts) or self._starts[i] >= end:
                yield pos, end - pos, False
                return
            h_start = -(-max(self._starts[i], pos) // granule) * granule
            h_end = min(self._ends[i], end) // granule * granule
            if h_end <= h_start:  # no whole granule: read it as data
                nxt = min(self._ends[i], end)
                yield pos, nxt - pos, False
                pos = nxt
                i += 1
                continue
            if h_start > pos:
                yield pos, h_start - pos, False
            yield h_start, h_end - h_start, True
            pos = h_end
            i += 1


def write_sparse(fd: int, data: memoryview | bytes, offset: int) -> None:
    """``pwrite`` all of ``data`` at ``offset``, leaving its whole zero blocks as holes.

    Zero runs are punched rather than skipped, so whatever the file held there
    before reads as zeros afterwards; where the filesystem keeps no holes they
    are written like the rest. Raises OSError like ``pwrite``.
    """
    view = memoryview(data).cast("B")
    finder = ZeroRuns()
    runs = finder.feed(offset, view) + finder.finish()
    pos = offset
    for start, end in [*runs, (offset + len(view), offset + len(view))]:
        _pwrite_all(fd, view[pos - offset : start - offset], pos)
        if end > start and not punch_hole(fd, start, end - start):
            _pwrite_all(fd, view[start - offset : end - offset], start)
        pos = end


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
