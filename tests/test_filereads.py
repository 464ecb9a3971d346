"""Reading ahead what CRIU's restore reads of the tree's own files."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from warmstart.host.filereads import FileReadahead, copy_on_write_reads, regular_files
from warmstart.host.pageserver import task_pids
from warmstart.host.residency import PAGE, evict, resident_ranges
from warmstart.snapshot.checkpoint import checkpoint
from warmstart.snapshot.manifest import IMAGES_DIR
from warmstart.store.local import LocalStore

# Maps DATA privately, writes to pages 3 and 10 (copy-on-write: dumped), reads page 20 (clean: not dumped).
_WRITER = """
import mmap, sys, time
f = open(sys.argv[1], "r+b")
m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
m[3 * 4096] = 1
m[10 * 4096 + 5] = 2
_ = m[20 * 4096]
open(sys.argv[2], "w").write("ready")
time.sleep(600)
"""


@pytest.mark.criu
def test_readahead_reads_the_file_pages_under_dumped_private_pages(tmp_path: Path, store_dir: Path) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * (64 * PAGE // 256))
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(data), str(ready)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        store = LocalStore(store_dir)
        checkpoint(proc.pid, store=store, name="cow")
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    images = store.path_of("cow") / IMAGES_DIR
    assert str(data) in regular_files(images).values()
    reads = copy_on_write_reads(images, sorted(task_pids(images)))
    pages = {off // PAGE + i for off, n in reads[str(data)] for i in range(n // PAGE)}
    assert {3, 10} <= pages and 20 not in pages  # dumped pages only, never the clean one
    assert any(name.endswith(Path(sys.executable).resolve().name) or "python" in name for name in reads)

    evict(data)
    cached = resident_ranges(str(data), [(0, 64 * PAGE)])
    assert cached is not None and not cached.ranges
    fr = FileReadahead(images, sorted(task_pids(images))).start()
    assert fr.done.wait(30)
    assert fr.bytes > 0
    after = resident_ranges(str(data), [(3 * PAGE, PAGE), (10 * PAGE, PAGE)])
    assert after is not None and sum(n for _, n in after.ranges) == 2 * PAGE
    # a container restore: the same paths, under the container's root
    root = tmp_path / "rootfs"
    inside = root / str(data).lstrip("/")
    inside.parent.mkdir(parents=True)
    inside.write_bytes(data.read_bytes())
    evict(inside)
    fr = FileReadahead(images, sorted(task_pids(images)), root=root).start()
    assert fr.done.wait(30)
    moved = resident_ranges(str(inside), [(3 * PAGE, PAGE), (10 * PAGE, PAGE)])
    assert moved is not None and sum(n for _, n in moved.ranges) == 2 * PAGE
