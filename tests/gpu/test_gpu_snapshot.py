"""GPU end to end: a CUDA process tree checkpointed and restored with warmstart.

Run on a GPU machine as root (see docs/gpu-testing.md). Skipped without one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from _support import WORKLOADS, Tree, wait_for
from warmstart.host.process import kill_tree
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.restore import restore
from warmstart.store.local import LocalStore

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.criu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def start(state: Path, gib: float, child: bool = False) -> Tree:
    state.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(WORKLOADS / "cuda_tree.py"), str(state), str(gib)]
    popen = subprocess.Popen(
        args + (["--child"] if child else []),
        stdin=subprocess.DEVNULL, stdout=open(state / "out", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    tree = Tree(state, popen, popen.pid)
    wait_for(tree.started, 180, what="CUDA workload start")
    return tree


def verify_equal(tree: Tree) -> bool:
    before = tree.counter()
    (tree.state / "verify").touch()
    wait_for(lambda: not (tree.state / "verify").exists() and tree.counter() > before + 1, 120, what="verify")
    return tree.status()["equal"]


@pytest.mark.parametrize("leave_running", [False, True])
def test_cuda_process_restores_bit_identical(tmp_path: Path, leave_running: bool) -> None:
    tree = start(tmp_path / "w", 4.0)
    assert verify_equal(tree)
    store = LocalStore(tmp_path / "store")
    result = checkpoint(tree.pid, store=store, name="gpu", options=CheckpointOptions(leave_running=leave_running))
    print(result.timer.phases)
    assert len(result.manifest.gpus) == 1
    g = result.manifest.gpus[0]
    assert g.device_memory_bytes >= 4 << 30 and g.gpu_uuid.startswith("GPU-")
    if leave_running:
        tree.wait_progress(60)
        assert verify_equal(tree)
        tree.kill()
    else:
        tree.popen.wait(timeout=30)
    at = tree.status()["counter"]
    r = restore("gpu", store=store)
    print(r.timer.phases)
    back = Tree(tree.state, None, r.pid)
    try:
        assert back.wait_progress(60)["counter"] > (0 if leave_running else at)
        assert verify_equal(back)
    finally:
        kill_tree(r.pid)


def test_two_cuda_processes_in_one_tree(tmp_path: Path) -> None:
    tree = start(tmp_path / "w", 1.0, child=True)
    child_state = tmp_path / "w" / "child"
    wait_for(lambda: (child_state / "status.json").exists(), 120, what="child")
    child = Tree(child_state, None, tree.status()["child_pid"])
    wait_for(child.started, 120, what="child start")
    store = LocalStore(tmp_path / "store")
    result = checkpoint(tree.pid, store=store, name="two")
    assert {g.pid for g in result.manifest.gpus} == {tree.pid, child.pid}
    tree.popen.wait(timeout=30)
    wait_for(lambda: not psutil.pid_exists(child.pid), 30, what="child gone")
    r = restore("two", store=store)
    try:
        Tree(tree.state, None, r.pid).wait_progress(60)
        child.wait_progress(60)
        assert verify_equal(Tree(tree.state, None, r.pid))
        assert verify_equal(child)
    finally:
        kill_tree(r.pid)


@pytest.mark.parametrize(("codec", "lazy"), [(None, False), ("zstd", False), (None, True)],
                         ids=["plain", "zstd", "lazy"])  # fmt: skip
def test_cuda_process_restores_through_the_page_server(tmp_path: Path, codec: str | None, lazy: bool) -> None:
    """The parallel page server fills the driver's checkpointed device memory back
    (it lives in private anonymous pages) before the GPU restore reads it; with
    ``lazy`` the GPU restore reads it while the fill still runs (faults served)."""
    from warmstart.snapshot.restore import RestoreRequest

    tree = start(tmp_path / "w", 2.0)
    assert verify_equal(tree)
    store = LocalStore(tmp_path / "store")
    checkpoint(tree.pid, store=store, name="pages", options=CheckpointOptions(compress=codec))
    tree.popen.wait(timeout=30)
    r = restore("pages", store=store, request=RestoreRequest(parallel_pages=True, lazy=lazy))
    print(r.timer.phases)
    fill = next(p for p in r.timer.phases if p.name == ("page-fill-wait" if lazy else "page-fill"))
    assert fill.bytes and fill.bytes >= 2 << 30
    back = Tree(tree.state, None, r.pid)
    try:
        back.wait_progress(60)
        assert verify_equal(back)
    finally:
        kill_tree(r.pid)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_one_gpu_process_restores_onto_the_other_gpu(tmp_path: Path) -> None:
    """`--gpu-map 0=1` for a worker on GPU 0 that can see both GPUs: the driver
    gets the whole map (1 -> 0 too) and the worker's memory lands on GPU 1."""
    from warmstart.gpu.devices import get_inventory, gpu_usage_by_pid
    from warmstart.gpu.driver import normalize_uuid
    from warmstart.snapshot.restore import RestoreRequest

    tree = start(tmp_path / "w", 1.0)
    assert verify_equal(tree)
    store = LocalStore(tmp_path / "store")
    taken = checkpoint(tree.pid, store=store, name="moved")
    inv = get_inventory()
    assert len(taken.manifest.gpus[0].visible_uuids) == len(inv.devices)
    tree.popen.wait(timeout=30)
    r = restore("moved", store=store, request=RestoreRequest(gpu_map=("0=1",)))
    back = Tree(tree.state, None, r.pid)
    try:
        back.wait_progress(60)
        assert verify_equal(back)
        on = {normalize_uuid(u.uuid) for u in gpu_usage_by_pid([r.pid], inv).get(r.pid, ())}
        assert on == {normalize_uuid(next(d.uuid for d in inv.devices if d.index == 1))}
    finally:
        kill_tree(r.pid)
