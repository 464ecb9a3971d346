"""Sparse page images: zero runs punched out at checkpoint, zero pages mapped on restore."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from _support import assert_continues
from hypothesis import given, settings
from hypothesis import strategies as st

from warmstart.host.sparse import MIN_HOLE, HoleMap, ZeroRuns, punch_hole, write_sparse
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.manifest import IMAGES_DIR
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store.integrity import Expected, FollowingDigester, digest_file, verify_files
from warmstart.store.local import LocalStore

BLOCK = MIN_HOLE


def _holes_supported(path: Path) -> bool:
    probe = path / "probe"
    probe.write_bytes(b"x" * (2 * BLOCK))
    fd = os.open(probe, os.O_WRONLY)
    try:
        return punch_hole(fd, 0, BLOCK)
    finally:
        os.close(fd)
        probe.unlink()


@pytest.fixture
def holes_dir(tmp_path: Path) -> Path:
    if not _holes_supported(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem keeps no holes")
    return tmp_path


# A file as blocks: 0 = a zero block, 1 = a data block, 2 = a zero block with one byte set.
layouts = st.lists(st.sampled_from([0, 0, 1, 2]), min_size=1, max_size=24)


def _render(layout: list[int], tail: int) -> bytes:
    out = bytearray()
    for i, kind in enumerate(layout):
        block = bytearray(BLOCK)
        if kind == 1:
            block[:] = bytes([i % 250 + 1]) * BLOCK
        elif kind == 2:
            block[BLOCK // 2] = 7
        out += block
    return bytes(out) + b"\x09" * tail


@settings(max_examples=40, deadline=None)
@given(layout=layouts, cuts=st.lists(st.integers(1, 24 * BLOCK), max_size=5), tail=st.integers(0, 5000))
def test_zero_runs_are_exactly_the_zero_blocks_however_the_stream_is_cut(layout, cuts, tail) -> None:
    data = _render(layout, tail)
    view = memoryview(data)
    runs: list[tuple[int, int]] = []
    finder = ZeroRuns()
    edges = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    for a, b in zip(edges, edges[1:], strict=False):
        runs += finder.feed(a, view[a:b])
    runs += finder.finish()
    zero_blocks = {i for i, kind in enumerate(layout) if kind == 0}
    found = {i for s, e in runs for i in range(s // BLOCK, e // BLOCK)}
    assert found <= zero_blocks  # never a block that holds data
    assert all(s % BLOCK == 0 and e % BLOCK == 0 and e > s for s, e in runs)
    assert all(a[1] < b[0] for a, b in zip(runs, runs[1:], strict=False))  # ordered, disjoint, merged
    if len(edges) == 2:  # one feed: every zero block is found
        assert found == zero_blocks


def test_following_digester_punches_zero_runs_and_keeps_the_bytes(holes_dir: Path) -> None:
    layout = [1, 0, 0, 0, 2, 1, 0, 0, 1] * 40 + [0] * 30
    data = _render(layout, tail=1234)
    root = holes_dir / "images"
    root.mkdir()
    path = root / "pages-1.img"
    digester = FollowingDigester(root, sparse=True).start()

    def write() -> None:  # appended in odd pieces, as a writer that is not us would
        with open(path, "wb", buffering=0) as f:
            for pos in range(0, len(data), 300_001):
                f.write(data[pos : pos + 300_001])

    writer = threading.Thread(target=write)
    writer.start()
    writer.join()
    result = digester.finish()
    assert path.read_bytes() == data
    assert result["pages-1.img"] == digest_file(path)
    holes = HoleMap.of(path)
    assert holes.hole_bytes == digester.punched
    assert digester.punched >= 30 * BLOCK  # at least the zero tail, whole blocks never split
    for start, length, is_hole in holes.split(0, len(data)):
        if is_hole:
            assert data[start : start + length] == bytes(length)
    assert os.stat(path).st_blocks * 512 <= len(data) - digester.punched + BLOCK


@settings(max_examples=30, deadline=None)
@given(layout=layouts, offset=st.integers(0, 24 * BLOCK), length=st.integers(0, 24 * BLOCK))
def test_hole_map_split_covers_the_range_and_holes_read_zero(tmp_path_factory, layout, offset, length) -> None:
    where = tmp_path_factory.mktemp("split")
    if not _holes_supported(where):
        pytest.skip("no holes on this filesystem")
    data = _render(layout, tail=100)
    path = where / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_WRONLY)
    for i, kind in enumerate(layout):
        if kind == 0:
            punch_hole(fd, i * BLOCK, BLOCK)
    os.close(fd)
    offset = min(offset, len(data))
    length = min(length, len(data) - offset)
    parts = list(HoleMap.of(path).split(offset, length))
    with open(path, "rb") as f:  # a map of just the range splits it the same way
        assert list(HoleMap(f.fileno(), offset + length, start=offset).split(offset, length)) == parts
    pos = offset
    for start, size, is_hole in parts:
        assert start == pos and size > 0
        if is_hole:
            assert start % 4096 == 0 and size % 4096 == 0
            assert data[start : start + size] == bytes(size)
        pos += size
    assert pos == offset + length


def test_pieces_of_a_sparse_file_verify_and_a_changed_byte_is_caught(holes_dir: Path) -> None:
    data = _render([0] * 1100 + [1] + [0] * 50, tail=0)  # > one 64 MiB piece, mostly holes
    root = holes_dir / "images"
    root.mkdir()
    (root / "pages-1.img").write_bytes(data)
    digester = FollowingDigester(root, sparse=True).start()
    size, digest = digester.finish()["pages-1.img"]
    expected = Expected("pages-1.img", size, digest, tuple(digester.pieces()["pages-1.img"]))
    assert digester.punched > 1000 * BLOCK
    assert verify_files(root, [expected]) == size
    with open(root / "pages-1.img", "r+b") as f:  # a byte written into a hole
        f.seek(5 * BLOCK + 17)
        f.write(b"\x01")
    with pytest.raises(Exception, match="fails its checksum"):
        verify_files(root, [expected])


@pytest.mark.criu
@pytest.mark.parametrize("lazy", [False, True], ids=["fill", "lazy"])
def test_sparse_snapshot_restores_every_byte(tree_factory, store_dir: Path, lazy: bool) -> None:
    tree = tree_factory(mem_mib=16, zero_mib=48)
    before = tree.digests()
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="sparse")
    tree.popen.wait(timeout=10)
    images = store.path_of("sparse") / IMAGES_DIR
    if not _holes_supported(images):
        pytest.skip("the store's filesystem keeps no holes")
    assert result.manifest.sparse_bytes >= 40 << 20  # the zeros, less the blocks with a data byte
    assert sum(HoleMap.of(p).hole_bytes for p in images.glob("pages-*.img")) == result.manifest.sparse_bytes
    restored = restore("sparse", store=store, request=RestoreRequest(lazy=lazy))
    assert_continues(tree, restored.pid, before)


@pytest.mark.criu
def test_sparse_off_keeps_every_zero_page_as_data(tree_factory, store_dir: Path) -> None:
    tree = tree_factory(mem_mib=4, zero_mib=16)
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="dense", options=CheckpointOptions(sparse=False))
    tree.popen.wait(timeout=10)
    assert result.manifest.sparse_bytes == 0
    images = store.path_of("dense") / IMAGES_DIR
    assert not any(HoleMap.of(p) for p in images.glob("pages-*.img"))


@settings(max_examples=30, deadline=None)
@given(layout=layouts, at=st.integers(0, 3), stale=st.booleans())
def test_write_sparse_keeps_the_bytes_and_leaves_zero_blocks_as_holes(
    tmp_path_factory, layout, at: int, stale: bool
) -> None:
    where = tmp_path_factory.mktemp("ws")
    if not _holes_supported(where):
        pytest.skip("no holes on this filesystem")
    data = _render(layout, tail=777)
    offset = at * 4096  # a chunk need not start on a block
    path = where / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, offset + len(data))
        if stale:  # an earlier, different write there: must not show through
            os.pwrite(fd, b"\xee" * len(data), offset)
        write_sparse(fd, data, offset)
    finally:
        os.close(fd)
    assert path.read_bytes()[offset:] == data
    holes = HoleMap.of(path)
    for start, size, hole in holes.split(offset, len(data)):
        if hole:  # only zeros went into holes
            assert data[start - offset : start - offset + size] == bytes(size)
    if offset == 0:  # blocks line up: every zero block is a hole
        for i, kind in enumerate(layout):
            if kind == 0:
                assert holes.is_hole(i * BLOCK, BLOCK)


@pytest.mark.criu
def test_a_pulled_snapshot_keeps_its_holes(tree_factory, tmp_path: Path) -> None:
    from warmstart.store.remote import RemoteStore
    from warmstart.store.signing import TrustPolicy

    tree = tree_factory(mem_mib=4, zero_mib=32)
    src, dst = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    result = checkpoint(tree.pid, store=src, name="s")
    tree.popen.wait(timeout=10)
    if not result.manifest.sparse_bytes:
        pytest.skip("the store's filesystem keeps no holes")
    remote = RemoteStore.open(f"file://{tmp_path / 'remote'}")
    remote.push(src, "s")
    pulled = remote.pull("s", dst, trust=TrustPolicy([]))
    for original in (src.path_of("s") / IMAGES_DIR).glob("pages-*.img"):
        copy = pulled.path / IMAGES_DIR / original.name
        assert copy.read_bytes() == original.read_bytes()
        assert HoleMap.of(copy).hole_bytes >= HoleMap.of(original).hole_bytes // 2
    assert sum(HoleMap.of(p).hole_bytes for p in (pulled.path / IMAGES_DIR).glob("pages-*.img")) >= 24 << 20


def test_keeps_holes_probes_the_nearest_existing_directory_and_leaves_nothing(tmp_path: Path) -> None:
    from warmstart.host.sparse import keeps_holes

    expected = _holes_supported(tmp_path)
    assert keeps_holes(tmp_path / "not" / "yet" / "there") is expected
    assert list(tmp_path.iterdir()) == []  # the probe file is gone, no directory was made
