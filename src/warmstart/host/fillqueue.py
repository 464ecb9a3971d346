"""The order in which the page server fills memory: image order, ahead of where tasks fault.

The fill cuts every task's lazy memory into chunks, in address (= image) order. Fill
threads take the next chunk nobody has taken from a shared cursor. When a running task
faults (a lazy restore, where the driver's restore thread reads its copy of device
memory while the fill goes on), the cursor jumps to the faulting chunk: the threads then
fill just ahead of a reader that walks its memory in order, instead of somewhere behind
or far ahead of it, and the reader takes few faults after the first. Chunks skipped by a
jump are taken later, from the lowest one not taken, so every chunk is taken once.

With checksums, each chunk lies inside one check piece of the pages image; a piece is
complete (and checked) when its last chunk is done. Pieces without any lazy page get one
empty chunk so that they are checked too.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Chunk:
    """``[start, end)`` of task ``key``'s memory; ``piece``: its check piece (or None)."""

    key: int
    start: int
    end: int
    piece: int | None = None
    payload: Any = None


class FillQueue:
    """Hands out chunks once each; see the module docstring for the order."""

    def __init__(self, chunks: Sequence[Chunk]) -> None:
        self._chunks = list(chunks)
        self._taken = bytearray(len(self._chunks))
        self._cursor = 0
        self._low = 0  # every chunk below it is taken
        self._lock = threading.Lock()
        self._starts: dict[int, list[int]] = {}
        self._indexes: dict[int, list[int]] = {}
        for i, c in enumerate(self._chunks):
            if c.end > c.start:
                self._starts.setdefault(c.key, []).append(c.start)
                self._indexes.setdefault(c.key, []).append(i)
        for key, starts in self._starts.items():
            if any(a > b for a, b in zip(starts, starts[1:], strict=False)):
                raise ValueError(f"chunks of {key} are not in address order")
        self._left = Counter((c.key, c.piece) for c in self._chunks if c.piece is not None)

    def __len__(self) -> int:
        return len(self._chunks)

    def take(self) -> Chunk | None:
        """The next chunk to fill, or None when every chunk was taken."""
        n = len(self._chunks)
        with self._lock:
            i = self._cursor
            while i < n and self._taken[i]:
                i += 1
            if i >= n:
                while self._low < n and self._taken[self._low]:
                    self._low += 1
                i = self._low
                if i >= n:
                    return None
            self._taken[i] = 1
            self._cursor = i + 1
            return self._chunks[i]

    def jump(self, key: int, addr: int) -> None:
        """A task (``key``) faulted at ``addr``: fill from there on next."""
        starts = self._starts.get(key)
        if not starts:
            return
        j = bisect.bisect_right(starts, addr) - 1
        if j < 0 or addr >= self._chunks[self._indexes[key][j]].end:
            j += 1  # addr lies before the first chunk or in a gap: the next chunk
        if j >= len(starts):
            return
        with self._lock:
            self._cursor = self._indexes[key][j]

    def done(self, chunk: Chunk) -> bool:
        """Record ``chunk`` as filled; True when that completed its check piece."""
        if chunk.piece is None:
            return False
        with self._lock:
            self._left[(chunk.key, chunk.piece)] -= 1
            return self._left[(chunk.key, chunk.piece)] == 0
