"""Content-defined chunking at page granularity.

CRIU writes memory as a sequence of 4 KiB pages. Two snapshots of the same
worker hold mostly the same pages, but a page touched in between shifts every
later page by 4 KiB, which would defeat fixed-size chunks. So chunk boundaries
fall only *between pages*, at pages whose content matches a pattern (a few
sampled words, mixed; one page in ``avg/4096`` on random data), with a minimum
and maximum chunk size. A shift moves the boundaries with the content; the
chunks after it are the same again. Sampling keeps the boundary search at
memory speed (numpy, ~tens of GB/s); the chunk's BLAKE3 covers every byte.
"""

from __future__ import annotations

import io
import mmap
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from warmstart.store.index import MAX_CHUNK

PAGE = 4096
_WORDS = PAGE // 8
_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xC2B2AE3D27D4EB4F)
_K3 = np.uint64(0x165667B19E3779F9)


@dataclass(frozen=True)
class ChunkParams:
    avg: int = 4 << 20
    min: int = 1 << 20
    max: int = 16 << 20
    read_block: int = 32 << 20

    def __post_init__(self) -> None:
        for v in (self.avg, self.min, self.max):
            if v % PAGE or v <= 0:
                raise ValueError("chunk sizes must be positive multiples of 4 KiB")
        if not self.min <= self.avg <= self.max <= MAX_CHUNK:
            raise ValueError(f"need min <= avg <= max <= {MAX_CHUNK >> 20} MiB")
        if self.avg & (self.avg - 1):
            raise ValueError("the average chunk size must be a power of two")

    @classmethod
    def around(cls, avg: int) -> ChunkParams:
        """Average ``avg``; min a quarter of it; max four times it (capped)."""
        return cls(avg=avg, min=max(PAGE, avg // 4), max=min(MAX_CHUNK, avg * 4))


DEFAULT_PARAMS = ChunkParams()


def candidates(block: memoryview | bytes, mask: int) -> np.ndarray:
    """Indexes of the full pages of ``block`` after which a boundary may fall."""
    n = len(block) // PAGE
    if n == 0:
        return np.empty(0, dtype=np.int64)
    words = np.frombuffer(block, dtype=np.uint64, count=n * _WORDS).reshape(n, _WORDS)
    with np.errstate(over="ignore"):
        fp = (words[:, 0] * _K1) ^ (words[:, _WORDS // 2] * _K2) ^ (words[:, -1] * _K3)
    return np.flatnonzero(((fp >> np.uint64(40)) & np.uint64(mask)) == 0)


def boundaries(view: memoryview | bytes, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[int]:
    """End offsets of the chunks of ``view``, in order; the last one is ``len(view)``."""
    mask = params.avg // PAGE - 1
    n = len(view)
    full = n // PAGE * PAGE
    start = scanned = 0
    while scanned < full:
        end = min(scanned + params.read_block, full)
        for i in candidates(view[scanned:end], mask).tolist():
            cut = scanned + (i + 1) * PAGE
            while cut - start > params.max:
                start += params.max
                yield start
            if cut - start >= params.min:
                start = cut
                yield cut
        scanned = end
    while n - start > params.max:
        start += params.max
        yield start
    if n > start:
        yield n


def chunks(f: BinaryIO, params: ChunkParams = DEFAULT_PARAMS) -> Iterator[bytes]:
    """The chunks of a file, in order; together exactly its bytes.

    A regular file is mapped (no copy but the one into each chunk); anything
    else is read whole.
    """
    try:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        mappable = stat.S_ISREG(os.fstat(fd).st_mode)
    except (AttributeError, OSError, io.UnsupportedOperation):
        mappable = False
    if not mappable:
        data = f.read()
        start = 0
        for end in boundaries(data, params):
            yield data[start:end]
            start = end
        return
    if size == 0:
        return
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            start = 0
            for end in boundaries(view, params):
                yield bytes(view[start:end])
                start = end
        finally:
            view.release()
