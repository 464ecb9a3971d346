"""The file reads CRIU makes while it restores a tree, done ahead of it.

On a cold page cache CRIU's own part of a restore is bound by two kinds of
small, one-at-a-time reads of the tree's files (libraries, mostly), not by
the pages images:

* it opens every mapped file (path lookup, inode: metadata reads), and
* it writes each dumped page of a private file mapping (a library's relocated
  data, say) over a copy-on-write of that file page, so the kernel first
  reads the file page, on a fault.

On the GPU worker that was 0.5 s of opens and 0.8 s of such faults, at disk
latency. :class:`FileReadahead` does both ahead of CRIU from the images
alone, on a pool of threads: it looks up every regular file of the dump,
then reads the file pages under every dumped page of a private file mapping,
merged into runs. It changes nothing CRIU reads; it only fills the caches.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from warmstart.host.pagemap import PE_PRESENT, Pagemap, _messages, read_pagemap
from warmstart.host.residency import read_in
from warmstart.host.stats import decode_fields, iter_fields

log = logging.getLogger(__name__)

_FD_TYPE_REG = 1
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
#: Holes shorter than this between two file ranges are read too (one request, not two).
_MERGE_GAP = 64 << 10


@dataclass(frozen=True)
class FileVma:
    start: int
    end: int
    pgoff: int
    file_id: int


def regular_files(images: Path) -> dict[int, str]:
    """File id -> path of every regular file in a dump's ``files.img``."""
    path = Path(images) / "files.img"
    if not path.exists():
        return {}
    out: dict[int, str] = {}
    for raw in _messages(path.read_bytes(), path.name):
        entry = decode_fields(raw)
        reg = entry.get(3)
        if entry.get(1) == _FD_TYPE_REG and isinstance(reg, bytes):
            fields = decode_fields(reg)
            file_id, name = fields.get(1), fields.get(6)
            if isinstance(file_id, int) and isinstance(name, bytes):
                out[file_id] = name.decode("utf-8", "surrogateescape")
    return out


def private_file_vmas(images: Path, pid: int) -> list[FileVma]:
    """The private file mappings of a task, from ``mm-<pid>.img``, sorted."""
    path = Path(images) / f"mm-{pid}.img"
    mm = next(_messages(path.read_bytes(), path.name))
    out = []
    for number, value in iter_fields(mm):
        if number != 14 or not isinstance(value, bytes):
            continue
        f = decode_fields(value)
        start, end, pgoff, shmid, flags = (f.get(k) for k in (1, 2, 3, 4, 6))
        if not all(isinstance(v, int) for v in (start, end, pgoff, shmid, flags)):
            continue
        if flags & _MAP_PRIVATE and not flags & _MAP_ANONYMOUS:  # type: ignore[operator]
            out.append(FileVma(start, end, pgoff, shmid))  # type: ignore[arg-type]
    return sorted(out, key=lambda v: v.start)


def copy_on_write_reads(
    images: Path, pids: list[int], pagemaps: Callable[[int], Pagemap] | None = None
) -> dict[str, list[tuple[int, int]]]:
    """Per file path, the (offset, length) runs CRIU's restore reads to copy-on-write dumped pages.

    ``pagemaps`` gives a task's parsed pagemap (the page server's, parsed once)."""
    pagemap_of = pagemaps or (lambda pid: read_pagemap(images, pid))
    files = regular_files(images)
    spans: dict[str, list[tuple[int, int]]] = {}
    for pid in pids:
        vmas = private_file_vmas(images, pid)
        if not vmas:
            continue
        starts = [v.start for v in vmas]
        for run in pagemap_of(pid).runs:
            if not run.flags & PE_PRESENT or run.lazy:
                continue  # lazy pages are anonymous memory: no file under them
            i = max(0, bisect.bisect_right(starts, run.vaddr) - 1)
            while i < len(vmas) and vmas[i].start < run.end:  # mappings never overlap
                vma = vmas[i]
                lo, hi = max(run.vaddr, vma.start), min(run.end, vma.end)
                if lo < hi and vma.file_id in files:
                    spans.setdefault(files[vma.file_id], []).append((vma.pgoff + lo - vma.start, hi - lo))
                i += 1
    return {path: _merge(ranges) for path, ranges in spans.items()}


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for off, length in sorted(ranges):
        if out and off <= out[-1][0] + out[-1][1] + _MERGE_GAP:
            start = out[-1][0]
            out[-1] = (start, max(out[-1][0] + out[-1][1], off + length) - start)
        else:
            out.append((off, length))
    return out


class FileReadahead:
    """Look up the dump's files and read the pages CRIU will copy-on-write, on a thread pool.

    ``root`` is the directory the tree's paths are relative to (``/``, or a
    container's root). Start it before ``criu restore``; it never fails the
    restore (an error ends it, and CRIU reads from disk as it would have).
    """

    def __init__(
        self,
        images: Path,
        pids: list[int],
        *,
        root: Path = Path("/"),
        threads: int = 16,
        pagemaps: Callable[[int], Pagemap] | None = None,
        after_lookups: Callable[[], object] | None = None,
    ) -> None:
        self.images = Path(images)
        self.pagemaps = pagemaps
        #: Waited for between the lookups and the rest (the page server's parse, which
        #: CRIU's restorer waits on, goes before this Python work).
        self.after_lookups = after_lookups
        self.pids = pids
        self.root = Path(root)
        self.threads = threads
        self.bytes = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="file-readahead", daemon=True)

    def start(self) -> FileReadahead:
        self._thread.start()
        return self

    def _path(self, name: str) -> Path:
        return self.root / name.lstrip("/")

    def _run(self) -> None:
        try:
            files = regular_files(self.images)
            with ThreadPoolExecutor(self.threads, thread_name_prefix="file-readahead") as pool:
                list(pool.map(self._look_up, files.values()))  # metadata first: CRIU opens every one
                if self.after_lookups is not None:
                    self.after_lookups()
                reads = copy_on_write_reads(self.images, self.pids, self.pagemaps)
                jobs = [(name, off, n) for name, ranges in reads.items() for off, n in ranges]
                jobs.sort(key=lambda job: -job[2])
                self.bytes = sum(pool.map(lambda job: self._read(*job), jobs))
        except Exception as exc:  # noqa: BLE001 - an optimisation: CRIU reads it itself
            log.debug("file readahead stopped: %s", exc)
        finally:
            self.done.set()

    def _look_up(self, name: str) -> None:
        try:
            os.stat(self._path(name))
        except OSError:
            pass

    def _read(self, name: str, offset: int, length: int) -> int:
        return read_in(self._path(name), offset, length)
