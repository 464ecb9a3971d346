"""The pagemap decoder: its unrolled fast path against the generic protobuf one."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmstart.errors import SnapshotCorrupt
from warmstart.host.pagemap import PAGE_SIZE, PE_PARENT, PE_PRESENT, read_pagemap_file


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def image(head: bytes, entries: list[bytes]) -> bytes:
    body = b"".join(struct.pack("<I", len(m)) + m for m in [head, *entries])
    return struct.pack("<II", 0x56084025, 0x3D3B0C18) + body


entry = st.tuples(
    st.integers(0, (1 << 48) - 1),  # vaddr
    st.integers(0, (1 << 32) - 1),  # nr_pages
    st.one_of(st.none(), st.integers(0, 1 << 20)),  # flags (absent in old images)
    st.booleans(),  # in_parent (old images)
    st.booleans(),  # an unknown field, as a newer CRIU might add
    st.permutations([0, 1, 2]),  # field order
)


@given(st.lists(entry, max_size=40))
def test_fast_decoder_reads_what_the_generic_protobuf_decoder_reads(tmp_path_factory, entries) -> None:
    raw, want, offset = [], [], 0
    for vaddr, nr, flags, parent, unknown, order in entries:
        parts = [field(1, vaddr), field(2, nr), field(4, flags) if flags is not None else b""]
        msg = b"".join(parts[i] for i in order) + (field(3, 1) if parent else b"") + (field(9, 7) if unknown else b"")
        raw.append(msg)
        f = (flags or 0) | (PE_PARENT if parent else 0)
        want.append((vaddr, nr, f, offset))
        if f & PE_PRESENT:
            offset += nr * PAGE_SIZE
    path = tmp_path_factory.mktemp("pm") / "pagemap-1.img"
    path.write_bytes(image(field(1, 3), raw))
    pm = read_pagemap_file(path, 1)
    assert pm.pages.name == "pages-3.img"
    assert [tuple(r) for r in pm.runs] == want


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_a_truncated_entry_is_refused(tmp_path: Path, cut: int) -> None:
    data = image(field(1, 3), [field(1, 1 << 40) + field(2, 5) + field(4, PE_PRESENT)])
    path = tmp_path / "pagemap-1.img"
    path.write_bytes(data[:-cut])
    with pytest.raises(SnapshotCorrupt, match="cannot be parsed|truncated"):
        read_pagemap_file(path, 1)
