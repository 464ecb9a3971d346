"""Read CRIU's ``stats-dump`` / ``stats-restore`` images.

They are tiny protobuf messages (``stats.proto``): two 32-bit magics, a 32-bit
length, then a ``stats_entry`` with a ``dump`` (field 1) or ``restore``
(field 2) sub-message. Times are in microseconds. Decoding the handful of
varint fields by hand keeps protobuf out of our dependencies.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def iter_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield the top-level (field number, value) pairs of a protobuf message, repeats included."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value = buf[pos : pos + length]
            pos += length
        elif wire == 5:
            value = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        elif wire == 1:
            value = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, value


def decode_fields(buf: bytes) -> dict[int, int | bytes]:
    """Decode the top level of a protobuf message (the last value of a repeated field wins)."""
    return dict(iter_fields(buf))


def _entry(path: Path, field: int) -> dict[int, int | bytes]:
    data = path.read_bytes()
    if len(data) < 12:
        raise ValueError(f"{path.name} is too short")
    (length,) = struct.unpack_from("<I", data, 8)
    sub = decode_fields(data[12 : 12 + length]).get(field)
    if not isinstance(sub, bytes):
        raise ValueError(f"{path.name} has no entry {field}")
    return decode_fields(sub)


def _int(fields: dict[int, int | bytes], number: int) -> int:
    value = fields.get(number, 0)
    return value if isinstance(value, int) else 0


@dataclass(frozen=True)
class DumpStats:
    freezing_s: float
    frozen_s: float
    memdump_s: float
    memwrite_s: float
    pages_scanned: int
    pages_written: int

    @classmethod
    def read(cls, images_dir: Path) -> DumpStats | None:
        try:
            f = _entry(Path(images_dir) / "stats-dump", 1)
        except (OSError, ValueError):
            return None
        return cls(
            freezing_s=_int(f, 1) / 1e6,
            frozen_s=_int(f, 2) / 1e6,
            memdump_s=_int(f, 3) / 1e6,
            memwrite_s=_int(f, 4) / 1e6,
            pages_scanned=_int(f, 5),
            pages_written=_int(f, 7),
        )


@dataclass(frozen=True)
class RestoreStats:
    forking_s: float
    restore_s: float
    pages_restored: int

    @classmethod
    def read(cls, images_dir: Path) -> RestoreStats | None:
        try:
            f = _entry(Path(images_dir) / "stats-restore", 2)
        except (OSError, ValueError):
            return None
        return cls(forking_s=_int(f, 3) / 1e6, restore_s=_int(f, 4) / 1e6, pages_restored=_int(f, 5))
