"""Checkpoint and restore real process trees with real CRIU (root)."""

from __future__ import annotations

import os
import time
import signal
import subprocess
from pathlib import Path

import psutil
import pytest

from _support import Tree, wait_for, warmstart_cmd
from warmstart.errors import SnapshotCorrupt
from warmstart.host.process import kill_tree
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store.local import LocalStore

pytestmark = pytest.mark.criu


def _reap(tree: Tree) -> None:
    """The original is gone: reap it so its PID is free for the restore."""
    if tree.popen is not None:
        tree.popen.wait(timeout=10)


def _restored(tree: Tree, pid: int) -> Tree:
    return Tree(tree.state, None, pid)


@pytest.mark.parametrize("parallel", [True, False], ids=["page-server", "criu-pages"])
def test_restored_tree_continues_with_all_its_state(
    tree_factory, store_dir: Path, parallel: bool
) -> None:
    tree = tree_factory(mem_mib=256)
    before = tree.digests()
    store = LocalStore(store_dir)

    result = checkpoint(tree.pid, store=store, name="t1")
    _reap(tree)
    assert not tree.alive()
    at_checkpoint = tree.status()
    assert result.manifest.total_bytes > 256 << 20
    assert {p.name for p in result.timer.phases} >= {"dump", "checksum", "publish"}

    restored = restore("t1", store=store, request=RestoreRequest(parallel_pages=parallel))
    phases = {p.name for p in restored.timer.phases}
    assert ("page-fill" in phases) == parallel
    back = _restored(tree, restored.pid)
    try:
        now = back.wait_progress()
        # the counter continues from where it stopped, not from zero
        assert now["counter"] > at_checkpoint["counter"]
        assert now["pid"] == tree.pid
        assert now["thread_counter"] > at_checkpoint["thread_counter"]
        assert now["child_alive"] and psutil.pid_exists(now["child_pid"])
        assert now["echoed"] == now["counter"]
        assert back.digests() == before
        # the appended file and the grandchild's pipe continue without a gap
        for log in ("counter.log", "child.log"):
            values = [int(x) for x in (tree.state / log).read_text().split()]
            assert values == list(range(1, len(values) + 1)), log
            assert values[-1] > at_checkpoint["counter"]
    finally:
        kill_tree(restored.pid)


def test_same_snapshot_restores_twice(tree_factory, store_dir: Path) -> None:
    tree = tree_factory()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="twice")
    _reap(tree)
    counters = []
    for _ in range(2):
        r = restore("twice", store=store)
        back = _restored(tree, r.pid)
        counters.append(back.wait_progress()["counter"])
        kill_tree(r.pid)
        wait_for(lambda: not psutil.pid_exists(r.pid), what="restored tree gone")
    assert all(c > 0 for c in counters)


def test_leave_running_keeps_original_and_snapshot_restores(tree_factory, store_dir: Path) -> None:
    tree = tree_factory()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="live", options=CheckpointOptions(leave_running=True))
    assert tree.alive()
    assert psutil.Process(tree.pid).status() != psutil.STATUS_STOPPED
    tree.wait_progress()
    tree.kill()
    r = restore("live", store=store)
    try:
        assert _restored(tree, r.pid).wait_progress()["counter"] > 0
    finally:
        kill_tree(r.pid)


def test_corrupt_image_byte_is_refused_and_nothing_runs(tree_factory, store_dir: Path) -> None:
    tree = tree_factory()
    store = LocalStore(store_dir)
    checkpoint(tree.pid, store=store, name="bad")
    _reap(tree)
    pages = sorted((store_dir / "bad" / "images").glob("pages-*.img"))[0]
    with open(pages, "r+b") as f:
        f.seek(pages.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(SnapshotCorrupt, match="fails its checksum"):
        restore("bad", store=store)
    assert not psutil.pid_exists(tree.pid) or psutil.Process(tree.pid).status() == psutil.STATUS_ZOMBIE


def test_killing_warmstart_mid_dump_leaves_original_running(tree_factory, store_dir: Path) -> None:
    tree = tree_factory(mem_mib=1024)
    tree_pids = [tree.pid, tree.status()["child_pid"]]
    cmd = [*warmstart_cmd(), "checkpoint", "--pid", str(tree.pid), "--name", "killed", "--store", str(store_dir)]
    ws = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # wait until CRIU is writing page images, then kill warmstart outright
    wait_for(lambda: list(store_dir.glob(".staging/*/images/pages-*.img")), 60, 0.005, "dump to start")
    os.killpg(ws.pid, signal.SIGKILL)
    ws.wait()
    # CRIU finishes on its own with --leave-running; the tree must then run on
    wait_for(lambda: not any(p.name() == "criu" for p in psutil.process_iter(["name"])), 60, what="criu exit")
    # the guard resumes every process of the tree once CRIU is gone
    running = (psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING)
    wait_for(lambda: all(psutil.Process(p).status() in running for p in tree_pids), 10, what="tree resumed")
    tree.wait_progress()
    store = LocalStore(store_dir)
    assert [e.name for e in store.entries()] == []
    store.sweep()
    assert list((store_dir / ".staging").iterdir()) == []


def test_old_restore_run_dirs_are_pruned_and_recent_ones_kept(tmp_path: Path) -> None:
    from warmstart.snapshot.restore import prune_run_dirs

    now = time.time()
    for i in range(30):
        d = tmp_path / f"restore-x-{i:02d}"
        d.mkdir()
        age = 7200 if i < 25 else 10  # the last five are still young
        os.utime(d, (now - age + i, now - age + i))
    (tmp_path / "other").mkdir()
    removed = prune_run_dirs(tmp_path, keep=8, min_age_s=3600)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert removed == 22
    assert "other" in left
    # the five young ones and the three newest old ones stay
    assert [n for n in left if n.startswith("restore-")] == [f"restore-x-{i:02d}" for i in range(22, 30)]
