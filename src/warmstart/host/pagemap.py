"""Read CRIU's ``pagemap-<pid>.img``: where each dumped page of a task lives.

The image is two 32-bit magics, then length-prefixed protobuf messages: one
``pagemap_head`` (the id of the ``pages-<id>.img`` holding the data) and one
``pagemap_entry`` per run of pages (``vaddr``, ``nr_pages``, ``flags``).
Entries flagged ``PE_PRESENT`` have their bytes in the pages image, back to
back in entry order; the others (zero pages, pages in a parent image) take no
space there. ``PE_LAZY`` marks pages CRIU may leave to a lazy-pages server.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from warmstart.errors import SnapshotCorrupt
from warmstart.host.stats import decode_fields, iter_fields

PAGE_SIZE = 4096
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2


class PageRun(NamedTuple):
    """``nr_pages`` pages at ``vaddr`` in the task, ``offset`` in the pages image.

    A named tuple, not a dataclass: a worker has 12k+ runs, parsed while CRIU's
    restorer waits, and a tuple is built four times faster."""

    vaddr: int
    nr_pages: int
    flags: int
    offset: int

    @property
    def length(self) -> int:
        return self.nr_pages * PAGE_SIZE

    @property
    def end(self) -> int:
        return self.vaddr + self.length

    @property
    def lazy(self) -> bool:
        return bool(self.flags & PE_LAZY) and bool(self.flags & PE_PRESENT)


@dataclass(frozen=True)
class Pagemap:
    pid: int
    pages: Path
    runs: tuple[PageRun, ...]

    @property
    def lazy_runs(self) -> list[PageRun]:
        return [r for r in self.runs if r.lazy]

    @property
    def lazy_bytes(self) -> int:
        return sum(r.length for r in self.lazy_runs)


def _messages(data: bytes, name: str) -> Iterator[bytes]:
    if len(data) < 8:
        raise SnapshotCorrupt(f"{name} is too short", hint="the snapshot is damaged; take a new one")
    pos = 8
    while pos < len(data):
        if pos + 4 > len(data):
            raise SnapshotCorrupt(f"{name} is truncated", hint="the snapshot is damaged; take a new one")
        (length,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + length > len(data):
            raise SnapshotCorrupt(f"{name} is truncated", hint="the snapshot is damaged; take a new one")
        yield data[pos : pos + length]
        pos += length


def _entries(data: bytes, pos: int) -> Iterator[tuple[int, int, int]]:
    """(vaddr, nr_pages, flags) of each ``pagemap_entry`` from ``pos`` on: the generic
    decoder, unrolled for these four varint fields (a third of the parse time)."""
    end = len(data)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated entry")
        stop = pos + 4 + (data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16 | data[pos + 3] << 24)
        if stop > end:
            raise ValueError("truncated entry")
        pos += 4
        start = pos
        vaddr = nr = -1
        flags = 0
        while pos < stop:
            key = data[pos]
            byte = data[pos + 1]
            pos += 2
            value = byte & 0x7F
            shift = 7
            while byte & 0x80:
                if pos >= stop or shift > 63:
                    raise ValueError("bad varint")
                byte = data[pos]
                pos += 1
                value |= (byte & 0x7F) << shift
                shift += 7
            if key == 0x08:
                vaddr = value
            elif key == 0x10:
                nr = value
            elif key == 0x20:
                flags |= value
            elif key == 0x18:  # in_parent (old images)
                flags |= PE_PARENT if value else 0
            else:  # a field this loop does not know: the generic decoder takes the entry
                vaddr, nr, flags = _entry(data[start:stop])
                pos = stop
                break
        if pos != stop or vaddr < 0 or nr < 0:
            raise ValueError("bad pagemap entry")
        yield vaddr, nr, flags


def _entry(raw: bytes) -> tuple[int, int, int]:
    f = decode_fields(raw)
    vaddr, nr, flags = f.get(1), f.get(2), f.get(4, 0)
    if not (isinstance(vaddr, int) and isinstance(nr, int) and isinstance(flags, int)):
        raise ValueError("bad pagemap entry")
    return vaddr, nr, flags | (PE_PARENT if f.get(3) else 0)


def pages_image_of(images: Path, pid: int) -> Path:
    """The pages image a task's pagemap points to, from the pagemap's head alone."""
    path = Path(images) / f"pagemap-{pid}.img"
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
        pages_id = decode_fields(next(_messages(head[: 12 + struct.unpack_from("<I", head, 8)[0]], path.name))).get(1)
    except FileNotFoundError:
        raise SnapshotCorrupt(f"{path.name} is missing", hint="the snapshot is damaged; take a new one") from None
    except (ValueError, StopIteration, struct.error) as exc:
        raise SnapshotCorrupt(f"{path.name} cannot be parsed ({exc})",
                              hint="the snapshot is damaged; take a new one") from None  # fmt: skip
    if not isinstance(pages_id, int):
        raise SnapshotCorrupt(f"{path.name} cannot be parsed (no pages_id)",
                              hint="the snapshot is damaged; take a new one")  # fmt: skip
    return Path(images) / f"pages-{pages_id}.img"


def read_pagemap(images: Path, pid: int, cache: RunsCache | None = None) -> Pagemap:
    return read_pagemap_file(Path(images) / f"pagemap-{pid}.img", pid, cache)


def read_pagemap_file(path: Path, pid: int = 0, cache: RunsCache | None = None) -> Pagemap:
    """Any pagemap image (a task's, or ``pagemap-shmem-*.img``); from ``cache`` when it
    holds the runs of exactly these bytes."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SnapshotCorrupt(
            f"{path.name} is missing", hint="the snapshot is damaged; take a new one"
        ) from None
    if cache is not None and (cached := cache.pagemap(path, data, pid)) is not None:
        return cached
    return _parse_pagemap(path, data, pid)


def _parse_pagemap(path: Path, data: bytes, pid: int) -> Pagemap:
    images = path.parent
    try:
        messages = _messages(data, path.name)
        head = decode_fields(next(messages))
        pages_id = head.get(1)
        if not isinstance(pages_id, int):
            raise ValueError("no pages_id")
        runs: list[PageRun] = []
        offset = 0
        for vaddr, nr, flags in _entries(data, 12 + struct.unpack_from("<I", data, 8)[0]):
            runs.append(PageRun(vaddr, nr, flags, offset))
            if flags & PE_PRESENT:
                offset += nr * PAGE_SIZE
    except (ValueError, StopIteration, struct.error) as exc:
        raise SnapshotCorrupt(
            f"{path.name} cannot be parsed ({exc})", hint="the snapshot is damaged; take a new one"
        ) from None
    return Pagemap(pid=pid, pages=Path(images) / f"pages-{pages_id}.img", runs=tuple(runs))


def read_vmas(images: Path, pid: int) -> list[tuple[int, int]]:
    """The (start, end) of every mapping of a task, from ``mm-<pid>.img``, sorted."""
    path = Path(images) / f"mm-{pid}.img"
    try:
        mm = next(_messages(path.read_bytes(), path.name))
        vmas = []
        for number, value in iter_fields(mm):
            if number == 14 and isinstance(value, bytes):
                f = decode_fields(value)
                start, end = f.get(1), f.get(2)
                if isinstance(start, int) and isinstance(end, int):
                    vmas.append((start, end))
    except (OSError, ValueError, StopIteration, struct.error) as exc:
        raise SnapshotCorrupt(
            f"{path.name} cannot be read ({exc})", hint="the snapshot is damaged; take a new one"
        ) from None
    return sorted(vmas)


def split_at_vmas(runs: list[PageRun], vmas: list[tuple[int, int]]) -> list[PageRun]:
    """Cut runs where mappings end: one UFFDIO_COPY may not cross a mapping."""
    out: list[PageRun] = []
    bounds = sorted({b for vma in vmas for b in vma})
    after = bisect.bisect_right
    n = len(bounds)
    for run in runs:
        start = run.vaddr
        i = after(bounds, start)
        if i == n or bounds[i] >= start + run.nr_pages * PAGE_SIZE:
            out.append(run)  # inside one mapping: most runs
            continue
        while start < run.end:
            end = min(run.end, bounds[i]) if i < len(bounds) else run.end
            out.append(
                PageRun(start, (end - start) // PAGE_SIZE, run.flags, run.offset + start - run.vaddr)
            )
            start = end
            i += 1
    return out


class RunsCache:
    """The runs of every pagemap image of a snapshot, decoded once at checkpoint.

    A restore's page server must know a task's runs before CRIU's restorer can
    take its first fault; decoding a worker's 12k protobuf entries in Python
    takes 20-40 ms, and much longer beside the restore's other threads. This
    file holds them as plain integers, loaded in about a millisecond. Each
    pagemap's entry carries the image's size and BLAKE2b digest: a pagemap
    whose bytes differ is decoded from the image as before, so a stale or
    foreign cache is never used. The file itself is one of the snapshot's
    checked files.

    Layout (little-endian): ``MAGIC``, u32 count, then per pagemap: u16 name
    length, the name, u64 image size, 16-byte digest, u64 pages image id, u64
    run count, and per run four u64 (vaddr, nr_pages, flags, offset in the
    pages image).
    """

    MAGIC = b"WSPMRUN1"
    _HEAD = struct.Struct("<Q16sQQ")

    def __init__(self, entries: dict[str, tuple[int, bytes, int, array[int]]]) -> None:
        #: image name -> (size, digest, pages id, flat runs)
        self.entries = entries

    @staticmethod
    def digest(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    @classmethod
    def write(cls, images: Path, out: Path) -> int:
        """Decode every ``pagemap-*.img`` in ``images`` into ``out``; returns the count."""
        parts = [b""]
        count = 0
        for path in sorted(Path(images).glob("pagemap-*.img")):
            data = path.read_bytes()
            pagemap = _parse_pagemap(path, data, 0)
            pages_id = int(pagemap.pages.name[len("pages-") : -len(".img")])
            flat = array("Q", [v for r in pagemap.runs for v in r])
            if sys.byteorder != "little":
                flat.byteswap()
            name = path.name.encode()
            parts += [struct.pack("<H", len(name)), name,
                      cls._HEAD.pack(len(data), cls.digest(data), pages_id, len(pagemap.runs)), flat.tobytes()]  # fmt: skip
            count += 1
        parts[0] = cls.MAGIC + struct.pack("<I", count)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(parts))
        os.replace(tmp, out)
        return count

    @classmethod
    def load(cls, path: Path) -> RunsCache | None:
        """The cache at ``path``; None when there is none or it cannot be read (the
        pagemaps are decoded from the images then)."""
        try:
            data = Path(path).read_bytes()
            if data[:8] != cls.MAGIC:
                return None
            (count,) = struct.unpack_from("<I", data, 8)
            pos = 12
            entries: dict[str, tuple[int, bytes, int, array[int]]] = {}
            for _ in range(count):
                (n,) = struct.unpack_from("<H", data, pos)
                name = data[pos + 2 : pos + 2 + n].decode()
                pos += 2 + n
                size, digest, pages_id, nruns = cls._HEAD.unpack_from(data, pos)
                pos += cls._HEAD.size
                end = pos + nruns * 32
                if end > len(data):
                    return None
                flat = array("Q")
                flat.frombytes(data[pos:end])
                if sys.byteorder != "little":
                    flat.byteswap()
                entries[name] = (size, digest, pages_id, flat)
                pos = end
        except (OSError, struct.error, UnicodeDecodeError, ValueError):
            return None
        return cls(entries) if pos == len(data) else None

    def pagemap(self, path: Path, data: bytes, pid: int) -> Pagemap | None:
        """The pagemap of image ``path`` whose bytes are ``data``, if cached for them."""
        entry = self.entries.get(path.name)
        if entry is None or entry[0] != len(data) or entry[1] != self.digest(data):
            return None
        flat = entry[3]
        runs = tuple(map(PageRun, flat[0::4], flat[1::4], flat[2::4], flat[3::4]))
        return Pagemap(pid=pid, pages=path.parent / f"pages-{entry[2]}.img", runs=runs)
