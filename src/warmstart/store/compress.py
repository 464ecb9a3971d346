"""Compressed page images that can still be read at any offset, in parallel.

``checkpoint --compress zstd|lz4`` replaces each ``pages-<id>.img`` with
``pages-<id>.img.<codec>``: the raw file cut into 8 MiB chunks, each
compressed on its own by a thread pool (both codecs release the GIL), behind
a small header and a table of the chunks' offsets. A reader can therefore
decompress exactly the chunks a range needs: warmstart's page server serves
CRIU's lazy pages straight from the compressed file, and a plain restore
decompresses the whole file with every core.

Layout (little-endian)::

    magic "WSPZ" | version u32 | codec u32 | chunk size u64 | raw size u64 | chunks u64
    chunks x (offset u64, length u64)     -- of each compressed chunk in this file
    chunk data ...
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import xxhash

from warmstart.errors import SnapshotCorrupt, UsageError
from warmstart.host.pageserver import PlainPages

MAGIC = b"WSPZ"
VERSION = 1
CHUNK = 8 << 20
_HEAD = struct.Struct("<4sIIQQQ")
_ENTRY = struct.Struct("<QQ")
CODECS = ("zstd", "lz4")
_CODEC_IDS = {"zstd": 1, "lz4": 2}
_CORRUPT_HINT = "the snapshot is damaged; take a new one"


def check_codec(name: str) -> str | None:
    """Normalise a ``--compress`` value: None for no compression."""
    if name in ("", "none"):
        return None
    if name not in CODECS:
        raise UsageError(f"unknown compression {name!r}", hint="use one of: none, zstd, lz4")
    return name


def suffix(codec: str) -> str:
    return f".{codec}"


def _compressor(codec: str) -> Callable[[bytes], bytes]:
    if codec == "zstd":
        import zstandard

        local = threading.local()

        def zstd(data: bytes) -> bytes:
            c = getattr(local, "c", None)
            if c is None:
                c = local.c = zstandard.ZstdCompressor(level=1)
            return c.compress(data)

        return zstd
    import lz4.block

    return lambda data: lz4.block.compress(data, store_size=False)


def _decompressor(codec: str) -> Callable[[bytes, int], bytes]:
    if codec == "zstd":
        import zstandard

        local = threading.local()

        def zstd(data: bytes, size: int) -> bytes:
            d = getattr(local, "d", None)
            if d is None:
                d = local.d = zstandard.ZstdDecompressor()
            return d.decompress(data, max_output_size=size)

        return zstd
    import lz4.block

    return lambda data, size: lz4.block.decompress(data, uncompressed_size=size)


def _chunks(size: int) -> Iterator[tuple[int, int]]:
    for off in range(0, size, CHUNK):
        yield off, min(CHUNK, size - off)


def compress_file(src: Path, codec: str, pool: Executor) -> tuple[Path, int, str]:
    """Write ``src`` + ``.codec`` and remove ``src``. Returns (path, size, xxh3-128 digest)."""
    from warmstart.store.integrity import format_digest

    compress = _compressor(codec)
    dst = src.with_name(src.name + suffix(codec))
    raw_size = src.stat().st_size
    fd = os.open(src, os.O_RDONLY)
    try:

        def one(job: tuple[int, int]) -> bytes:
            off, length = job
            return compress(os.pread(fd, length, off))

        n = -(-raw_size // CHUNK)
        table_end = _HEAD.size + n * _ENTRY.size
        entries: list[tuple[int, int]] = []
        with open(dst, "wb") as out:
            out.seek(table_end)
            pos = table_end
            for blob in pool.map(one, _chunks(raw_size)):
                out.write(blob)
                entries.append((pos, len(blob)))
                pos += len(blob)
            header = _HEAD.pack(MAGIC, VERSION, _CODEC_IDS[codec], CHUNK, raw_size, n)
            header += b"".join(_ENTRY.pack(o, ln) for o, ln in entries)
            out.seek(0)
            out.write(header)
        # the digest covers the file as stored: header and table, then the chunks
        h = xxhash.xxh3_128(header)
        _hash_from(h, dst, table_end)
    finally:
        os.close(fd)
    src.unlink()
    return dst, dst.stat().st_size, format_digest(h)


def _hash_from(h: xxhash.xxh3_128, path: Path, start: int) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])


@dataclass(frozen=True)
class _Table:
    codec: str
    chunk: int
    raw_size: int
    entries: tuple[tuple[int, int], ...]


class CompressedPages:
    """Random access to the raw bytes of a compressed pages image."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._table = self._read_table()
        except BaseException:
            os.close(self._fd)
            raise
        self._decompress = _decompressor(self._table.codec)
        self._local = threading.local()

    def _pread(self, length: int, offset: int) -> bytes:
        """Stored bytes of this file (a streaming reader waits for them to arrive first)."""
        return os.pread(self._fd, length, offset)

    @property
    def raw_size(self) -> int:
        return self._table.raw_size

    def _read_table(self) -> _Table:
        head = self._pread(_HEAD.size, 0)
        if len(head) != _HEAD.size:
            raise SnapshotCorrupt(f"{self.path.name} is truncated", hint=_CORRUPT_HINT)
        magic, version, codec_id, chunk, raw, n = _HEAD.unpack(head)
        codecs = {v: k for k, v in _CODEC_IDS.items()}
        if magic != MAGIC or version != VERSION or codec_id not in codecs or chunk <= 0:
            raise SnapshotCorrupt(f"{self.path.name} is not a warmstart compressed image", hint=_CORRUPT_HINT)
        if n != -(-raw // chunk):
            raise SnapshotCorrupt(f"{self.path.name} has a bad chunk table", hint=_CORRUPT_HINT)
        table = self._pread(n * _ENTRY.size, _HEAD.size)
        if len(table) != n * _ENTRY.size:
            raise SnapshotCorrupt(f"{self.path.name} is truncated", hint=_CORRUPT_HINT)
        entries = tuple(_ENTRY.unpack_from(table, i * _ENTRY.size) for i in range(n))
        return _Table(codecs[codec_id], chunk, raw, entries)

    def chunk(self, index: int) -> bytes:
        """The raw bytes of chunk ``index`` (the last one decoded is cached per thread)."""
        cached = getattr(self._local, "cached", None)
        if cached is not None and cached[0] == index:
            return cached[1]
        t = self._table
        off, length = t.entries[index]
        size = min(t.chunk, t.raw_size - index * t.chunk)
        blob = self._pread(length, off)
        try:
            data = self._decompress(blob, size)
        except Exception as exc:  # noqa: BLE001 - any codec error is corruption
            raise SnapshotCorrupt(
                f"{self.path.name}: chunk {index} does not decompress ({exc})", hint=_CORRUPT_HINT
            ) from None
        if len(data) != size:
            raise SnapshotCorrupt(f"{self.path.name}: chunk {index} has the wrong size", hint=_CORRUPT_HINT)
        self._local.cached = (index, data)
        return data

    def readinto(self, view: memoryview, offset: int) -> int:
        """Fill ``view`` with raw bytes from ``offset``; return how many there were."""
        t = self._table
        done = 0
        want = min(len(view), max(0, t.raw_size - offset))
        while done < want:
            pos = offset + done
            index, within = divmod(pos, t.chunk)
            data = self.chunk(index)
            n = min(want - done, len(data) - within)
            view[done : done + n] = data[within : within + n]
            done += n
        return done

    def decompress_to(self, dest: Path, pool: Executor) -> int:
        """Write the whole raw image to ``dest`` with the pool; return its size."""
        t = self._table
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, t.raw_size)

            def one(index: int) -> int:
                return os.pwrite(fd, self.chunk(index), index * t.chunk)

            return sum(pool.map(one, range(len(t.entries))))
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self._fd)


def open_pages(path: Path) -> PlainPages | CompressedPages:
    """The pages image at ``path``, or its compressed form (``.zstd``/``.lz4``) beside it."""
    if path.exists():
        return PlainPages(path)
    for codec in CODECS:
        packed = path.with_name(path.name + suffix(codec))
        if packed.exists():
            return CompressedPages(packed)
    raise SnapshotCorrupt(f"{path.name} is missing", hint=_CORRUPT_HINT)
