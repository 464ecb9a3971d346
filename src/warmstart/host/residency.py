"""Which pages of a tree's mapped files are in the page cache, and reading them back in.

A snapshot holds a worker's anonymous memory, not the shared libraries and
other files it has mapped: after a restore those pages come back from disk
one fault at a time, as the worker first touches them (on the GPU worker a
cold page cache costs about a second before the first token that way).
At checkpoint time the tree's file mappings are listed from
``/proc/PID/maps`` and each file's page-cache residency over those ranges is
read with ``mincore(2)``; a restore can read those ranges back (synchronous
readers, a few at a time) once the tree runs.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PAGE = mmap.PAGESIZE


@dataclass(frozen=True)
class FileRanges:
    """Resident byte ranges of one file, with what identifies its version."""

    path: str
    size: int
    mtime_ns: int
    ranges: tuple[tuple[int, int], ...]  # (offset, length), page-aligned

    @property
    def bytes(self) -> int:
        return sum(length for _, length in self.ranges)


def mapped_files(pids: Iterable[int], proc: Path = Path("/proc")) -> dict[str, list[tuple[int, int]]]:
    """Regular files mapped by ``pids``: path -> merged (offset, length) ranges."""
    spans: dict[str, list[tuple[int, int]]] = {}
    for pid in pids:
        try:
            lines = (proc / str(pid) / "maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/") or parts[5].endswith(" (deleted)"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            spans.setdefault(parts[5], []).append((int(parts[2], 16), end - start))
    return {path: _merge(r) for path, r in spans.items()}


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1]:
            last_off, last_len = out[-1]
            out[-1] = (last_off, max(last_len, off + length - last_off))
        else:
            out.append((off, length))
    return out


@cache  # a CDLL is a class of its own with its prototypes: once, not per file
def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(None, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return lib


_MAP_FAILED = ctypes.c_void_p(-1).value


_RESIDENT = bytes(i & 1 for i in range(256))  # mincore: bit 0 of each byte says resident


def _runs(flags: bytes, base: int) -> list[tuple[int, int]]:
    """(offset, length) of the resident pages in a mincore vector starting at ``base``."""
    return [
        (base + m.start() * PAGE, (m.end() - m.start()) * PAGE)
        for m in re.finditer(rb"\x01+", flags.translate(_RESIDENT))
    ]


def resident_ranges(path: str, spans: list[tuple[int, int]]) -> FileRanges | None:
    """The page-cache-resident parts of ``spans`` of ``path`` (None: not a readable regular file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    lib = _libc()
    try:
        st = os.fstat(fd)
        if not st.st_size or (st.st_mode & 0o170000) != 0o100000:
            return None
        # Mapping a file maps none of its pages: mincore then reports the page cache.
        base = lib.mmap(None, st.st_size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if base in (None, _MAP_FAILED):
            return None
        found: list[tuple[int, int]] = []
        try:
            for off, length in spans:
                off -= off % PAGE
                end = min(off + length, st.st_size)
                if end <= off:
                    continue
                vec = ctypes.create_string_buffer(-(-(end - off) // PAGE))
                if lib.mincore(base + off, end - off, vec) == 0:
                    found += _runs(vec.raw, off)
        finally:
            lib.munmap(base, st.st_size)
        return FileRanges(path, st.st_size, st.st_mtime_ns, tuple(_merge(found)))
    finally:
        os.close(fd)


def missing_ranges(path: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``spans`` (sorted, disjoint) of ``path`` that are not in the page cache."""
    resident = resident_ranges(path, spans)
    if resident is None:
        return list(spans)
    out: list[tuple[int, int]] = []
    have = list(resident.ranges)
    i = 0
    for off, length in spans:
        pos, end = off, off + length
        while i < len(have) and have[i][0] + have[i][1] <= pos:
            i += 1
        j = i
        while pos < end:
            if j == len(have) or have[j][0] >= end:
                out.append((pos, end - pos))
                break
            r_start, r_end = have[j][0], have[j][0] + have[j][1]
            if r_start > pos:
                out.append((pos, r_start - pos))
            pos = max(pos, r_end)
            j += 1
    return out


def resident_files(pids: Iterable[int]) -> list[FileRanges]:
    """Every mapped file of ``pids`` with at least one resident page."""
    out = []
    for path, spans in sorted(mapped_files(pids).items()):
        fr = resident_ranges(path, spans)
        if fr is not None and fr.ranges:
            out.append(fr)
    return out


def evict(path: Path) -> None:
    """Write ``path`` back and drop its pages from the page cache (a cold read next)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


#: Largest single read of :func:`read_in` (and so of :func:`prefetch`).
READ_CHUNK = 8 << 20


def read_in(path: str | os.PathLike[str], offset: int, length: int) -> int:
    """Read what of ``[offset, offset + length)`` of a file is not cached yet; return the bytes read.

    One synchronous read at a time, at most :data:`READ_CHUNK`: the page cache
    fills, and nothing is queued ahead of reads someone else waits on. Never
    raises (a file that went away reads as nothing)."""
    got = 0
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        for off, n in missing_ranges(os.fspath(path), [(offset, length)]):
            while n > 0:
                chunk = len(os.pread(fd, min(n, READ_CHUNK), off))
                if not chunk:
                    break
                got, off, n = got + chunk, off + chunk, n - chunk
    except OSError:
        pass
    finally:
        os.close(fd)
    return got


def prefetch(files: Iterable[FileRanges], *, threads: int = 4) -> int:
    """Read back every range of an unchanged file that is not cached; return the bytes read.

    ``threads`` synchronous readers, in pieces of :data:`READ_CHUNK`: asking the
    kernel for everything at once (``POSIX_FADV_WILLNEED``) would queue it all
    ahead of the page faults of the worker that needs a few of those pages now.
    """
    jobs: list[tuple[str, int, int]] = []
    for fr in files:
        try:
            st = os.stat(fr.path)
        except OSError:
            continue
        if st.st_size != fr.size or st.st_mtime_ns != fr.mtime_ns:
            continue  # another version of the file: its old pages mean nothing
        for off, n in fr.ranges:
            jobs += [(fr.path, pos, min(READ_CHUNK, off + n - pos)) for pos in range(off, off + n, READ_CHUNK)]
    with ThreadPoolExecutor(threads, thread_name_prefix="prefetch") as pool:
        return sum(pool.map(lambda job: read_in(*job), jobs))
