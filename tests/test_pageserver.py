"""warmstart's page server for ``criu restore --lazy-pages``, with real CRIU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from _support import Tree, assert_continues, wait_for
from warmstart.errors import CriuError, SnapshotCorrupt
from warmstart.host.process import kill_tree
from warmstart.host.pageserver import SMALL_RUN, task_pids
from warmstart.host.pagemap import PAGE_SIZE, PE_LAZY, PE_PRESENT, PageRun, read_pagemap, read_vmas, split_at_vmas
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.manifest import IMAGES_DIR, RUNS_FILE
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store.local import LocalStore


@pytest.mark.criu
def test_pagemap_accounts_for_every_byte_of_the_pages_image(tree_factory, store_dir: Path) -> None:
    tree = tree_factory(mem_mib=64)
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="pm")
    images = store.path_of("pm") / IMAGES_DIR
    pm = read_pagemap(images, result.manifest.tree.root_pid)
    present = sum(r.length for r in pm.runs if r.flags & PE_PRESENT)
    assert present == pm.pages.stat().st_size
    # the 64 MiB pattern is private anonymous memory: lazy, so the page server's job
    assert pm.lazy_bytes >= 64 << 20
    vmas = read_vmas(images, result.manifest.tree.root_pid)
    for run in split_at_vmas(pm.lazy_runs, vmas):
        assert any(s <= run.vaddr and run.end <= e for s, e in vmas), hex(run.vaddr)


@pytest.mark.criu
def test_missing_pages_fail_the_restore_and_nothing_runs(tree_factory, store_dir: Path, monkeypatch) -> None:
    """A page source that cannot deliver must fail the restore, never hand out zeros."""
    # restore refuses a file of the wrong size up front; take that away to reach the page server
    monkeypatch.setattr("warmstart.snapshot.restore.check_size", lambda root, e: None)
    tree = tree_factory(mem_mib=64)
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="short")
    tree.popen.wait(timeout=10)
    pm = read_pagemap(store.path_of("short") / IMAGES_DIR, result.manifest.tree.root_pid)
    last = max(pm.lazy_runs, key=lambda r: r.offset)
    # CRIU reads the non-lazy pages itself: cut only bytes that are the page server's
    assert all(r.offset < last.offset for r in pm.runs if r.flags & PE_PRESENT and not r.lazy)
    with open(pm.pages, "r+b") as f:
        f.truncate(last.offset + last.length // 2)
    with pytest.raises(CriuError, match="shorter than its pagemap"):
        restore("short", store=store, request=RestoreRequest(parallel_pages=True, verify=False))
    assert not psutil.pid_exists(tree.pid) or psutil.Process(tree.pid).status() == psutil.STATUS_ZOMBIE
    assert not Tree(tree.state, None, tree.pid).alive()


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), min_size=1, max_size=20),
    st.lists(st.integers(0, 300), max_size=20),
)
def test_split_at_vmas_keeps_every_byte_and_its_offset(runs_spec, cuts) -> None:
    runs, addr, offset = [], 0, 0
    for gap, n in runs_spec:
        addr += gap * PAGE_SIZE
        runs.append(PageRun(addr, n, PE_PRESENT | PE_LAZY, offset))
        addr += n * PAGE_SIZE
        offset += n * PAGE_SIZE
    bounds = sorted({c * PAGE_SIZE for c in cuts} | {0, addr})
    vmas = list(zip(bounds, bounds[1:]))
    pieces = split_at_vmas(runs, vmas)
    assert sum(p.length for p in pieces) == sum(r.length for r in runs)
    for p in pieces:
        src = next(r for r in runs if r.vaddr <= p.vaddr < r.end)
        assert p.end <= src.end
        assert p.offset == src.offset + (p.vaddr - src.vaddr)
        assert not any(p.vaddr < b < p.end for b in bounds)


@pytest.mark.criu
@pytest.mark.parametrize("codec", ["zstd", "lz4"])
@pytest.mark.parametrize("parallel", [True, False], ids=["page-server", "criu-pages"])
def test_compressed_snapshot_restores_the_same_memory(
    tree_factory, store_dir: Path, codec: str, parallel: bool
) -> None:
    tree = tree_factory(mem_mib=64)
    before = tree.digests()
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="z", options=CheckpointOptions(compress=codec))
    tree.popen.wait(timeout=10)
    images = store.path_of("z") / IMAGES_DIR
    assert result.manifest.compression == codec
    assert not list(images.glob("pages-*.img")) and list(images.glob(f"pages-*.img.{codec}"))
    raw = sum(r.length for r in read_pagemap(images, tree.pid).runs if r.flags & PE_PRESENT)
    assert result.manifest.total_bytes < raw  # the patterned memory compresses
    restored = restore("z", store=store, request=RestoreRequest(parallel_pages=parallel))
    assert_continues(tree, restored.pid, before)


@pytest.mark.criu
def test_corrupt_compressed_chunk_is_refused_before_anything_runs(tree_factory, store_dir: Path) -> None:
    tree = tree_factory(mem_mib=16)
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="zc", options=CheckpointOptions(compress="zstd"))
    tree.popen.wait(timeout=10)
    packed = max((store.path_of("zc") / IMAGES_DIR).glob("pages-*.img.zstd"), key=lambda p: p.stat().st_size)
    with open(packed, "r+b") as f:
        f.seek(packed.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotCorrupt):
        restore("zc", store=store)
    assert not Tree(tree.state, None, tree.pid).alive()


@given(st.binary(max_size=3 * 4096), st.integers(0, 3 * 4096), st.integers(0, 4096))
def test_compressed_pages_read_any_range(tmp_path_factory, data: bytes, offset: int, length: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from warmstart.store import compress

    d = tmp_path_factory.mktemp("z")
    raw = d / "pages-1.img"
    raw.write_bytes(data)
    old = compress.CHUNK
    compress.CHUNK = 4096  # several chunks out of a small file
    try:
        with ThreadPoolExecutor(2) as pool:
            packed, size, digest = compress.compress_file(raw, "zstd", pool)
    finally:
        compress.CHUNK = old
    assert not raw.exists() and packed.stat().st_size == size and digest.startswith("xxh3-128:")
    reader = compress.CompressedPages(packed)
    try:
        buf = bytearray(length)
        got = reader.readinto(memoryview(buf), offset)
        assert bytes(buf[:got]) == data[offset : offset + length]
    finally:
        reader.close()


@pytest.mark.criu
def test_lazy_restore_runs_while_filling_and_keeps_every_byte(tree_factory, store_dir: Path) -> None:
    tree = tree_factory(mem_mib=128)
    before = tree.digests()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="lazy")
    tree.popen.wait(timeout=10)
    restored = restore("lazy", store=store, request=RestoreRequest(lazy=True))
    try:
        names = [p.name.strip() for p in restored.timer.phases]
        # the tree was let run before the fill was over, and the fill still finished
        assert names.index("resume") < names.index("page-fill-wait")
        assert "page-fill" not in names
        back = Tree(tree.state, None, restored.pid)
        back.wait_progress()
        assert back.digests() == before
    finally:
        kill_tree(restored.pid)


@pytest.mark.criu
@pytest.mark.parametrize("lazy", [False, True], ids=["fill", "lazy"])
def test_thousands_of_small_runs_beside_big_ones_keep_every_byte(tree_factory, store_dir: Path, lazy: bool) -> None:
    # Small runs go to one batch lane while the other threads fill the big runs.
    tree = tree_factory(mem_mib=64, scatter_runs=3000)
    before = tree.digests()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="scattered")
    tree.popen.wait(timeout=10)
    pm = read_pagemap(store.path_of("scattered") / IMAGES_DIR, tree.pid)
    assert sum(r.length < SMALL_RUN for r in pm.lazy_runs) >= 3000
    restored = restore("scattered", store=store, request=RestoreRequest(lazy=lazy, page_threads=4))
    assert_continues(tree, restored.pid, before)


class _FailingPages:
    """A pages image whose storage goes away after a few reads."""

    def __init__(self, path: Path, reads_left: int) -> None:
        from warmstart.host.pageserver import PlainPages

        self._inner = PlainPages(path)
        self._left = reads_left

    def readinto(self, view: memoryview, offset: int) -> int:
        if self._left <= 0:
            raise OSError(5, "Input/output error")
        self._left -= 1
        return self._inner.readinto(view, offset)

    def close(self) -> None:
        self._inner.close()


@pytest.mark.criu
def test_lazy_restore_whose_page_source_disappears_kills_the_worker(
    tree_factory, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tree already runs when the source fails: it must die, not read zeros."""
    import warmstart.snapshot.restore as restore_mod

    tree = tree_factory(mem_mib=128)
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="gone")
    tree.popen.wait(timeout=10)
    monkeypatch.setattr(restore_mod, "open_pages", lambda path: _FailingPages(path, reads_left=3))
    with pytest.raises(CriuError, match="Input/output error"):
        restore("gone", store=store, request=RestoreRequest(lazy=True, verify=False))
    assert not psutil.pid_exists(tree.pid) or psutil.Process(tree.pid).status() == psutil.STATUS_ZOMBIE
    assert not Tree(tree.state, None, tree.pid).alive()


@pytest.mark.criu
@pytest.mark.parametrize("lazy", [False, True], ids=["fill", "lazy"])
def test_pages_are_checked_by_the_fill_and_a_bad_byte_kills_the_restore(
    tree_factory, store_dir: Path, lazy: bool
) -> None:
    tree = tree_factory(mem_mib=96)
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="fc")
    tree.popen.wait(timeout=10)
    images = store.path_of("fc") / IMAGES_DIR
    pm = read_pagemap(images, result.manifest.tree.root_pid)
    ok = restore("fc", store=store, request=RestoreRequest(lazy=lazy))
    try:  # every byte of the snapshot was checked, the pages image by the fill
        verified = {p.name.strip(): p.bytes for p in ok.timer.phases}.get("verified")
        assert verified == result.manifest.total_bytes
    finally:
        kill_tree(ok.pid)
    run = max(pm.lazy_runs, key=lambda r: r.length)  # a byte only the page server copies
    with open(pm.pages, "r+b") as f:
        f.seek(run.offset + run.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x5A]))
    with pytest.raises(SnapshotCorrupt, match="fails its checksum"):
        restore("fc", store=store, request=RestoreRequest(lazy=lazy))
    assert not psutil.pid_exists(result.manifest.tree.root_pid) or (
        psutil.Process(result.manifest.tree.root_pid).status() == psutil.STATUS_ZOMBIE
    )


@pytest.mark.criu
def test_snapshot_in_a_tmpfs_store_restores_every_byte(tree_factory, tmp_path: Path) -> None:
    """The tmpfs mode: a store on tmpfs (images pre-populated in memory), holes included."""
    import shutil
    import uuid

    shm = Path("/dev/shm")
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    if not any(m[1] == str(shm) and m[2] == "tmpfs" for m in mounts if len(m) > 2):
        pytest.skip("no tmpfs at /dev/shm")
    root = shm / f"warmstart-test-{uuid.uuid4().hex[:8]}"
    try:
        tree = tree_factory(mem_mib=32, zero_mib=16)
        before = tree.digests()
        store = LocalStore(root)
        result = checkpoint(tree.pid, store=store, name="shm")
        tree.popen.wait(timeout=10)
        assert result.manifest.sparse_bytes > 0  # tmpfs keeps holes too
        restored = restore("shm", store=store)
        assert_continues(tree, restored.pid, before)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.criu
def test_a_shortened_pages_image_is_refused_by_size_and_nothing_runs(tree_factory, store_dir: Path) -> None:
    tree = tree_factory(mem_mib=96)
    store = LocalStore(store_dir)
    result = checkpoint(tree.pid, store=store, name="short")
    tree.popen.wait(timeout=10)
    pm = read_pagemap(store.path_of("short") / IMAGES_DIR, result.manifest.tree.root_pid)
    os.truncate(pm.pages, pm.pages.stat().st_size - (70 << 20))  # more than a whole 64 MiB piece
    with pytest.raises(SnapshotCorrupt, match="bytes, manifest says"):
        restore("short", store=store)
    assert not psutil.pid_exists(result.manifest.tree.root_pid) or (
        psutil.Process(result.manifest.tree.root_pid).status() == psutil.STATUS_ZOMBIE
    )


#: A witness for zero pages: MIB of patterned pages, one page checked every 10 ms in a stride
#: order (so neither the fill nor the fault-around gets ahead of it); a wrong byte is written to
#: STATE/CORRUPT, the count of checks to STATE/count.
_WITNESS = """
import os, sys, time
state, mib = sys.argv[1], int(sys.argv[2])
PAGE = 4096
n = (mib << 20) // PAGE
memory = bytearray(bytes(range(256)) * 16 * n)

def header(i):
    return (i * 0x9E3779B97F4A7C15 + 1 & (1 << 64) - 1).to_bytes(8, "little")

for i in range(n):
    memory[i * PAGE : i * PAGE + 8] = header(i)
status = os.open(os.path.join(state, "count"), os.O_RDWR | os.O_CREAT, 0o644)
count = i = 0
while True:
    i = (i + 7919) % n
    at = i * PAGE
    if memory[at : at + 8] != header(i) or memory[at + PAGE - 1] != 255:
        with open(os.path.join(state, "CORRUPT"), "a") as f:
            f.write(f"page {i}: {bytes(memory[at : at + 8]).hex()}\\n")
    count += 1
    os.pwrite(status, str(count).encode().ljust(20), 0)
    time.sleep(0.01)
"""

#: A lazy restore whose fill takes 0.5 s per chunk (faults are served at full speed); it writes
#: the PIDs of the tasks to MARKER once they run.
_SLOW_RESTORE = """
import sys, time
from pathlib import Path
from warmstart.host.pageserver import PageServer
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store.local import LocalStore

store, name, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
copy, resumed = PageServer._copy, PageServer.tasks_resumed

def slow_copy(self, *args, wait=True, **kwargs):
    if wait:  # the fill's copies, not the event thread's
        time.sleep(0.5)
    return copy(self, *args, wait=wait, **kwargs)

def tasks_resumed(self):
    resumed(self)
    marker.write_text(" ".join(map(str, sorted(self.task_fds()))))

PageServer._copy = slow_copy
PageServer.tasks_resumed = tasks_resumed
restore(name, store=LocalStore(store), request=RestoreRequest(lazy=True, verify=False, page_threads=1))
"""


#: Runs argv[2:] (the restore) as a child subreaper, so the restored tree becomes its child
#: once CRIU exits: it prints the restore's PID and writes "PID STATUS" to argv[1] for each exit.
_REAPER = """
import ctypes, os, subprocess, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
print(subprocess.Popen(sys.argv[2:]).pid, flush=True)
with open(sys.argv[1], "a", buffering=1) as out:
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        out.write(f"{pid} {status}\\n")
"""


def _count(state: Path) -> int:
    try:
        return int((state / "count").read_bytes().strip() or 0)
    except (OSError, ValueError):
        return 0


def _exits(path: Path) -> dict[int, int]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    return {int(pid): int(status) for pid, status in (line.split() for line in lines if line.strip())}


@pytest.mark.criu
def test_lazy_restore_whose_restorer_is_killed_mid_fill_kills_the_tree_before_it_reads_zeros(
    tmp_path: Path, store_dir: Path
) -> None:
    """``warmstart restore --lazy`` SIGKILLed mid-fill: its keeper kills the tree, which reads no zeros."""
    state = tmp_path / "witness"
    state.mkdir()
    original = subprocess.Popen(
        [sys.executable, "-c", _WITNESS, str(state), "128"],
        stdin=subprocess.DEVNULL,
        stdout=open(state / "stdout", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    reaper: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: _count(state) > 5, 60, what="the witness to start")
        store = LocalStore(store_dir)
        checkpoint(original.pid, store=store, name="kept")
        original.wait(timeout=10)
        marker, exits = tmp_path / "resumed", tmp_path / "exits"
        reaper = subprocess.Popen(
            [sys.executable, "-c", _REAPER, str(exits),
             sys.executable, "-c", _SLOW_RESTORE, str(store_dir), "kept", str(marker)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "restorer.log", "ab"),
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
        )  # fmt: skip
        assert reaper.stdout is not None
        restorer = int(reaper.stdout.readline())
        wait_for(lambda: marker.exists() and marker.read_text().strip(), 60, what="the tasks to resume")
        pids = [int(p) for p in marker.read_text().split()]
        assert pids == [original.pid]
        start = _count(state)
        wait_for(lambda: _count(state) > start + 5, 10, what="the restored witness to run")
        assert restorer not in _exits(exits), (tmp_path / "restorer.log").read_text()  # still filling
        os.kill(restorer, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while not set(pids) <= _exits(exits).keys() and time.monotonic() < deadline:
            time.sleep(0.02)
        corrupt = state / "CORRUPT"
        assert not corrupt.exists(), f"the witness read zero pages: {corrupt.read_text()[:200]}"
        status = _exits(exits).get(original.pid)
        assert status is not None, "the restored tree outlived its restore"
        # killed (by the keeper), not crashed on a zero page of its own (SIGSEGV without it)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
            f"the witness ended with wait status {status:#x}, not SIGKILL"
        )
    finally:
        if reaper is not None:
            kill_tree(reaper.pid)  # the restore, its keeper, the restored tree (the reaper's now)
            reaper.wait()
        kill_tree(original.pid)
        if original.poll() is None:
            original.kill()
            original.wait()


@given(st.lists(st.tuples(st.integers(1, 40), st.booleans()), max_size=30))
def test_short_holes_are_copied_as_data_and_long_ones_kept(parts: list[tuple[int, bool]]) -> None:
    from warmstart.host.pageserver import SMALL_HOLE, _coarse

    unit = 64 << 10
    split, pos = [], 0
    for blocks, is_hole in parts:  # what HoleMap.split gives: alternating, contiguous
        if split and split[-1][2] == is_hole:
            is_hole = not is_hole
        split.append((pos, blocks * unit, is_hole))
        pos += blocks * unit
    got = _coarse(split)
    assert [o for o, _, _ in got] == sorted({o for o, _, _ in got})
    assert sum(n for _, n, _ in got) == pos and (not got or got[0][0] == 0)
    assert all(a[0] + a[1] == b[0] and a[2] != b[2] for a, b in zip(got, got[1:], strict=False))
    long_holes = {(o, n) for o, n, h in split if h and n >= SMALL_HOLE}
    assert {(o, n) for o, n, h in got if h} == long_holes


def test_a_trace_that_cannot_be_written_does_not_fail_the_restore(tmp_path: Path, monkeypatch, caplog) -> None:
    from warmstart.host.pageserver import PageServer

    monkeypatch.setenv("WARMSTART_PAGES_TRACE", str(tmp_path / "missing" / "trace.json"))
    with PageServer(tmp_path, tmp_path):
        pass
    assert "cannot write the trace" in caplog.text


@pytest.mark.criu
def test_a_trace_records_every_filled_byte(tree_factory, store_dir: Path, tmp_path: Path) -> None:
    import json

    tree = tree_factory(mem_mib=32, scatter_runs=200)
    before = tree.digests()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="traced", options=CheckpointOptions(sparse=False))
    tree.popen.wait(timeout=10)
    images = store.path_of("traced") / IMAGES_DIR
    lazy = sum(read_pagemap(images, pid).lazy_bytes for pid in task_pids(images))  # the root and its child
    restored = restore("traced", store=store,
                       request=RestoreRequest(page_threads=2, pages_trace=tmp_path / "trace.json"))  # fmt: skip
    assert_continues(tree, restored.pid, before)
    events = json.loads((tmp_path / "trace.json").read_text())["events"]
    chunks = [e for e in events if e["kind"] == "chunk"]
    faults = [e for e in events if e["kind"] == "fault"]  # CRIU's restorer, before the fill
    # every lazy byte placed once, by the fill or by a fault; batches of the small runs among them
    assert sum(e["bytes"] for e in chunks) + sum(e["bytes"] for e in faults) == lazy
    assert sum(e["runs"] for e in chunks) >= 200
    assert all(e["began"] <= e["ended"] and e["start"] < e["end"] for e in chunks if e["bytes"])
    # the timeline: CRIU started, every task's userfaultfd arrived, CRIU finished, then the fill
    at = {e.get("name", e["kind"]): e["at"] for e in events if e["kind"] in ("mark", "finished")}
    arrived = {e["pid"]: e["at"] for e in events if e["kind"] == "task"}
    assert set(arrived) == task_pids(images)
    assert at["criu-start"] < min(arrived.values()) <= max(arrived.values()) < at["finished"] <= at["criu-returned"]
    assert at["criu-returned"] <= min(e["began"] for e in chunks)


@pytest.mark.criu
def test_restore_cli_writes_the_trace_it_is_asked_for(tree_factory, store_dir: Path, tmp_path: Path) -> None:
    import json

    from _support import warmstart_cmd

    tree = tree_factory(mem_mib=16)
    before = tree.digests()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="cli-traced")
    tree.popen.wait(timeout=10)
    trace = tmp_path / "trace.json"
    out = subprocess.run([*warmstart_cmd(), "restore", "cli-traced", "--trace-pages", str(trace), "--json",
                          "--store", str(store_dir)], capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert_continues(tree, json.loads(out.stdout)["pid"], before)
    chunks = [e for e in json.loads(trace.read_text())["events"] if e["kind"] == "chunk"]
    assert sum(e["bytes"] for e in chunks) >= 16 << 20  # the patterned memory, filled by the page server


def test_page_servers_shorten_the_switch_interval_while_any_runs(tmp_path: Path) -> None:
    from warmstart.host.pageserver import SWITCH_INTERVAL, PageServer

    before = sys.getswitchinterval()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = PageServer(tmp_path, tmp_path / "a").__enter__()
    second = PageServer(tmp_path, tmp_path / "b").__enter__()
    try:
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))
        first.close()
        first.close()  # closing twice counts once
        assert sys.getswitchinterval() == pytest.approx(min(before, SWITCH_INTERVAL))  # the second still runs
    finally:
        second.close()
    assert sys.getswitchinterval() == pytest.approx(before)


@pytest.mark.criu
def test_the_pages_image_of_a_task_is_read_from_the_pagemap_head(tree_factory, store_dir: Path) -> None:
    from warmstart.host.pagemap import pages_image_of

    tree = tree_factory(mem_mib=16)
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="heads", options=CheckpointOptions(leave_running=True))
    images = store.path_of("heads") / IMAGES_DIR
    pids = task_pids(images)
    assert len(pids) >= 2  # the root and its child
    for pid in pids:
        assert pages_image_of(images, pid) == read_pagemap(images, pid).pages
    (images / f"pagemap-{min(pids)}.img").write_bytes(b"\0" * 6)
    with pytest.raises(SnapshotCorrupt, match="cannot be parsed"):
        pages_image_of(images, min(pids))


@pytest.mark.criu
def test_the_page_server_parses_every_task_before_criu_hands_it_over(tree_factory, store_dir: Path,
                                                                     tmp_path: Path) -> None:
    from warmstart.host.pageserver import PageServer

    tree = tree_factory(mem_mib=32, scatter_runs=500)
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="ahead", options=CheckpointOptions(leave_running=True))
    images = store.path_of("ahead") / IMAGES_DIR
    runs = store.path_of("ahead") / RUNS_FILE
    assert RUNS_FILE in {f.path for f in store.manifest("ahead").files}  # written and checked with the rest
    with PageServer(images, tmp_path, check=lambda *_: None, runs_cache=runs) as server:
        server.wait_prepared()
        assert server._listed.wait(10)  # the fill's chunks are listed after the parse
        assert server._runs is not None and set(server._runs.entries) >= {f"pagemap-{p}.img" for p in task_pids(images)}
        for pid in task_pids(images):
            pagemap, task = server._prepared[pid].result()
            assert server.pagemap(pid) == pagemap == read_pagemap(images, pid)
            want = sorted(split_at_vmas(pagemap.lazy_runs, read_vmas(images, pid)), key=lambda r: r.vaddr)
            assert task.runs == want and task.fd == -1  # no userfaultfd yet: CRIU has not run
            assert task.chunks is not None
            listed = [r for c in task.chunks if c.payload[1] is not None
                      for r in (c.payload[1] if isinstance(c.payload[1], list) else [c.payload[1]])]  # fmt: skip
            assert {r.vaddr for r in want} <= {r.vaddr for r in listed}  # every run has its chunk
