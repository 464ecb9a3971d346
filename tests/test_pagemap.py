"""The pagemap decoder: its unrolled fast path against the generic protobuf one."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmstart.errors import SnapshotCorrupt
from warmstart.host.pagemap import PAGE_SIZE, PE_PARENT, PE_PRESENT, RunsCache, read_pagemap, read_pagemap_file


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


runs_entry = st.tuples(st.integers(0, (1 << 48) - 1), st.integers(0, (1 << 32) - 1), st.integers(0, 7))


@given(st.lists(st.lists(runs_entry, max_size=30), min_size=1, max_size=4))
def test_the_runs_cache_gives_back_what_the_images_decode_to(tmp_path_factory, tasks) -> None:
    images = tmp_path_factory.mktemp("images")
    for pid, entries in enumerate(tasks, start=1):
        raw = [field(1, v) + field(2, n) + field(4, f) for v, n, f in entries]
        (images / f"pagemap-{pid}.img").write_bytes(image(field(1, 10 + pid), raw))
    cache_file = images.parent / "runs.bin"
    assert RunsCache.write(images, cache_file) == len(tasks)
    cache = RunsCache.load(cache_file)
    assert cache is not None
    for pid in range(1, len(tasks) + 1):
        path = images / f"pagemap-{pid}.img"
        cached = cache.pagemap(path, path.read_bytes(), pid)
        assert cached is not None and cached == read_pagemap_file(path, pid)
        assert read_pagemap(images, pid, cache) == cached


def test_the_runs_cache_is_not_used_for_other_bytes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    pm = images / "pagemap-7.img"
    pm.write_bytes(image(field(1, 3), [field(1, 1 << 30) + field(2, 4) + field(4, PE_PRESENT)]))
    RunsCache.write(images, tmp_path / "runs.bin")
    cache = RunsCache.load(tmp_path / "runs.bin")
    assert cache is not None
    # the same size, another run: decoded from the image, never taken from the cache
    pm.write_bytes(image(field(1, 3), [field(1, 1 << 31) + field(2, 4) + field(4, PE_PRESENT)]))
    assert cache.pagemap(pm, pm.read_bytes(), 7) is None
    assert read_pagemap(images, 7, cache).runs[0].vaddr == 1 << 31


@pytest.mark.parametrize("damage", ["truncate", "magic", "extra", "missing"])
def test_a_damaged_or_missing_runs_cache_is_ignored(tmp_path: Path, damage: str) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "pagemap-7.img").write_bytes(image(field(1, 3), [field(1, 4096) + field(2, 1) + field(4, PE_PRESENT)]))
    out = tmp_path / "runs.bin"
    RunsCache.write(images, out)
    data = out.read_bytes()
    if damage == "truncate":
        out.write_bytes(data[:-5])
    elif damage == "magic":
        out.write_bytes(b"X" + data[1:])
    elif damage == "extra":
        out.write_bytes(data + b"\0")
    else:
        out.unlink()
    assert RunsCache.load(out) is None
    assert read_pagemap(images, 7, None).runs[0].vaddr == 4096
