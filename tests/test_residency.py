"""Page-cache residency of mapped files: recorded at checkpoint, read back in on restore."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import pytest

from warmstart.host.residency import PAGE, evict, mapped_files, missing_ranges, prefetch, resident_ranges


def test_resident_ranges_follow_the_page_cache_and_prefetch_reads_them_back(tmp_path: Path) -> None:
    path = tmp_path / "lib.bin"
    path.write_bytes(os.urandom(64 * PAGE))
    evict(path)
    with open(path, "rb") as f:
        f.seek(8 * PAGE)
        f.read(4 * PAGE)  # pages 8..11 now cached (readahead may add neighbours)
    fr = resident_ranges(str(path), [(0, 64 * PAGE)])
    assert fr is not None and fr.size == 64 * PAGE
    assert any(off <= 8 * PAGE and 12 * PAGE <= off + n for off, n in fr.ranges)
    evict(path)
    evicted = resident_ranges(str(path), [(0, 64 * PAGE)])
    if evicted is not None and evicted.ranges:
        pytest.skip("this filesystem keeps pages cached after POSIX_FADV_DONTNEED")
    assert prefetch([fr]) == fr.bytes
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        back = resident_ranges(str(path), [(0, 64 * PAGE)])
        if back is not None and all(
            any(o <= off and off + n <= o + m for o, m in back.ranges) for off, n in fr.ranges
        ):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("prefetched ranges never became resident")


def test_prefetch_skips_a_file_that_changed(tmp_path: Path) -> None:
    path = tmp_path / "lib.bin"
    path.write_bytes(b"x" * (4 * PAGE))
    fr = resident_ranges(str(path), [(0, 4 * PAGE)])
    assert fr is not None
    path.write_bytes(b"y" * (5 * PAGE))
    assert prefetch([fr]) == 0


def test_mapped_files_lists_this_process_mappings(tmp_path: Path) -> None:
    path = tmp_path / "mapped.bin"
    path.write_bytes(b"z" * (3 * PAGE))
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[0] == ord("z")
        files = mapped_files([os.getpid()])
    assert files[str(path)] == [(0, 3 * PAGE)]


@pytest.mark.criu
def test_a_snapshot_records_its_trees_resident_file_pages(tree_factory, store_dir: Path) -> None:
    import json
    import sys

    from warmstart.host.process import kill_tree
    from warmstart.snapshot.checkpoint import checkpoint
    from warmstart.snapshot.prefetch import PREFETCH_FILE
    from warmstart.snapshot.restore import restore
    from warmstart.store.local import LocalStore

    tree = tree_factory(mem_mib=16)
    store = LocalStore(store_dir)
    taken = checkpoint(tree.pid, store=store, name="pf")
    tree.popen.wait(timeout=10)
    assert PREFETCH_FILE in {f.path for f in taken.manifest.files}  # checked like every file
    doc = json.loads((store.path_of("pf") / PREFETCH_FILE).read_text())
    recorded = {f["path"]: f for f in doc["files"]}
    interpreter = os.path.realpath(sys.executable)
    assert interpreter in recorded and recorded[interpreter]["ranges"]  # its text was resident
    restored = restore("pf", store=store)
    try:
        assert restored.pid == tree.pid
    finally:
        kill_tree(restored.pid)


def test_missing_ranges_are_the_spans_less_what_the_cache_holds(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(64 * PAGE))
    evict(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # read exactly what is asked
        os.pread(fd, 4 * PAGE, 8 * PAGE)
        os.pread(fd, 2 * PAGE, 40 * PAGE)
    finally:
        os.close(fd)
    spans = [(2 * PAGE, 20 * PAGE), (30 * PAGE, 30 * PAGE)]
    missing = missing_ranges(str(path), spans)
    resident = resident_ranges(str(path), spans)
    assert resident is not None

    def pages(ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> set[int]:
        return {p for off, n in ranges for p in range(off // PAGE, (off + n) // PAGE)}

    # every page of the spans is either missing or resident, never both
    assert pages(missing) | pages(resident.ranges) == pages(spans)
    assert not pages(missing) & pages(resident.ranges)
    assert {8, 9, 10, 11, 40, 41} <= pages(resident.ranges)
    assert missing  # most of it was never read
