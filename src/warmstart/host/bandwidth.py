"""What this machine can move: the ceilings a restore's phases are held against.

``warmstart doctor --bandwidth`` measures them once and caches the result
(``$WARMSTART_CACHE/bandwidth.json``, default ``/var/cache/warmstart``); a
restore's timing table then shows each phase's GB/s next to its ceiling:

* ``populate``: copying into *fresh* anonymous memory, which is what a page
  restore does (each 4 KiB page faulted in, zeroed, copied) — one thread and
  all threads;
* ``memcpy``: copying between memory already mapped;
* ``pagecache_read``: reading a file that is in the page cache;
* ``disk_read``: reading it after it was dropped from the cache, with many
  threads (what a cold restore from the store's disk can reach);
* ``h2d_pinned``: host-to-device copies from pinned memory, per GPU (filled in
  by :mod:`warmstart.gpu.bandwidth`).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from warmstart.host.residency import evict

GB = 1e9
_CHUNK = 8 << 20


def cache_path() -> Path:
    return Path(os.environ.get("WARMSTART_CACHE", "/var/cache/warmstart")) / "bandwidth.json"


@dataclass
class Bandwidth:
    """GB/s figures of one machine (``None``: not measured)."""

    threads: int
    memcpy_1t: float
    memcpy_nt: float
    populate_1t: float
    populate_nt: float
    pagecache_read_nt: float
    disk_read_nt: float | None = None
    h2d_pinned: dict[str, float] = field(default_factory=dict)
    measured_at: float = field(default_factory=time.time)

    def save(self, path: Path | None = None) -> Path:
        path = path or cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path | None = None) -> Bandwidth | None:
        try:
            return cls(**json.loads((path or cache_path()).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def ceilings(self) -> dict[str, float]:
        """Restore phase name -> the GB/s that bounds it on this machine."""
        out = {"criu-restore": self.populate_1t, "page-fill": self.populate_nt}
        if self.h2d_pinned:
            out["gpu-restore"] = max(self.h2d_pinned.values())
        return out


def _timed(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    moved = fn()
    return moved / (time.perf_counter() - t0) / GB


def _split(total: int, threads: int) -> list[tuple[int, int]]:
    step = -(-total // threads)
    step += -step % 4096
    return [(off, min(step, total - off)) for off in range(0, total, step)]


def _copy_rate(size: int, threads: int, *, src_size: int, fresh: bool) -> float:
    """GB/s of ``threads`` threads copying ``size`` bytes into one buffer, from a
    ``src_size`` source; ``fresh``: into memory never touched (page faults included)."""
    src, dst = mmap.mmap(-1, src_size), mmap.mmap(-1, size)
    s = ctypes.addressof(ctypes.c_char.from_buffer(src))
    d = ctypes.addressof(ctypes.c_char.from_buffer(dst))
    ctypes.memset(s, 1, src_size)
    if not fresh:
        ctypes.memset(d, 0, size)

    def fill(part: tuple[int, int]) -> None:
        off, length = part
        for pos in range(off, off + length, _CHUNK):
            ctypes.memmove(d + pos, s + pos % src_size, min(_CHUNK, off + length - pos))

    def run() -> int:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, _split(size, threads)))
        return size

    try:
        return _timed(run)
    finally:
        del s, d
        src.close()
        dst.close()


def memcpy(size: int, threads: int) -> float:
    """GB/s copying between two mapped (already faulted-in) buffers."""
    return _copy_rate(size, threads, src_size=size, fresh=False)


def populate(size: int, threads: int) -> float:
    """GB/s copying into fresh anonymous memory (page faults included), as a page restore does."""
    return _copy_rate(size, threads, src_size=_CHUNK, fresh=True)


def read_file(path: Path, threads: int) -> float:
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)

    def one(off: int) -> int:
        buf = bytearray(_CHUNK)
        return os.preadv(fd, [buf], off)

    def run() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(one, range(0, size, _CHUNK)))

    try:
        return _timed(run)
    finally:
        os.close(fd)


def _drop_from_cache(path: Path) -> bool:
    evict(path)
    return True


def measure(directory: Path, *, size: int = 1 << 30, threads: int | None = None) -> Bandwidth:
    """Measure host bandwidths; ``directory`` holds a temporary ``size``-byte file."""
    threads = threads or min(32, os.cpu_count() or 1)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".bandwidth-") as f:
        block = os.urandom(1 << 20) * (_CHUNK >> 20)
        for _ in range(size // _CHUNK):
            f.write(block)
        f.flush()
        path = Path(f.name)
        read_file(path, threads)  # into the page cache
        cached = read_file(path, threads)
        disk = read_file(path, threads) if _drop_from_cache(path) else None
    return Bandwidth(
        threads=threads,
        memcpy_1t=memcpy(size, 1),
        memcpy_nt=memcpy(size, threads),
        populate_1t=populate(size, 1),
        populate_nt=populate(size, threads),
        pagecache_read_nt=cached,
        disk_read_nt=disk,
    )
