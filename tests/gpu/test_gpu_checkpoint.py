"""The CUDA checkpoint API on a real GPU against a child process holding torch
tensors: state transitions, device files released while checkpointed, data
bit-identical afterwards, rollback, VMM release across a checkpoint."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from warmstart.errors import GpuError
from warmstart.gpu.discovery import find_cuda_processes, nvidia_fds
from warmstart.gpu.driver import ProcessState
from warmstart.gpu.session import GpuCheckpointSession

pytestmark = pytest.mark.gpu


def test_lock_checkpoint_restore_unlock(cuda_driver: Any, cuda_child: Any) -> None:
    drv, child = cuda_driver, cuda_child
    before = child.ask("sum")
    computed = child.ask("compute")
    assert drv.state(child.pid) is ProcessState.RUNNING
    assert nvidia_fds(child.pid), "a CUDA process holds /dev/nvidia* open"
    assert find_cuda_processes([child.pid]) == [child.pid]

    drv.lock(child.pid, timeout_ms=10_000)
    assert drv.state(child.pid) is ProcessState.LOCKED
    drv.checkpoint(child.pid)
    assert drv.state(child.pid) is ProcessState.CHECKPOINTED
    assert nvidia_fds(child.pid) == []  # GPU released: CRIU could dump it now
    assert find_cuda_processes([child.pid]) == [child.pid]  # libcuda still mapped
    assert drv.restore_thread_id(child.pid) > 0

    drv.restore(child.pid)
    assert drv.state(child.pid) is ProcessState.LOCKED
    drv.unlock(child.pid)
    assert drv.state(child.pid) is ProcessState.RUNNING
    assert child.ask("sum") == before
    assert child.ask("compute") == computed


def test_restore_with_explicit_identity_pairs(cuda_driver: Any, cuda_child: Any) -> None:
    """The CUcheckpointRestoreArgs layout with GPU pairs is accepted (CUDA 13+)."""
    drv, child = cuda_driver, cuda_child
    if not drv.supports_remap():
        pytest.skip("driver < 580: no GPU pairs on restore")
    # one pair per GPU the child can see: the driver refuses a partial map
    # (CUDA_ERROR_INVALID_VALUE with one pair on a two-GPU host, 2 x H200)
    pairs = [(d.uuid, d.uuid) for d in drv.devices()]
    before = child.ask("sum")
    drv.lock(child.pid, 10_000)
    drv.checkpoint(child.pid)
    drv.restore(child.pid, pairs)
    drv.unlock(child.pid)
    assert child.ask("sum") == before


def test_remap_to_another_gpu(cuda_driver: Any, cuda_child: Any) -> None:
    drv, child = cuda_driver, cuda_child
    devs = drv.devices()
    same = [d for d in devs if d.name == devs[0].name]
    if len(same) < 2 or not drv.supports_remap():
        pytest.skip("needs two GPUs of one model and driver >= 580")
    before = child.ask("sum")
    drv.lock(child.pid, 10_000)
    drv.checkpoint(child.pid)
    from warmstart.gpu.gpumap import complete_pairs

    # the child sees every GPU: 0 -> 1 and, to keep the map whole, 1 -> 0
    drv.restore(child.pid, complete_pairs([(same[0].uuid, same[1].uuid)], [d.uuid for d in devs]))
    drv.unlock(child.pid)
    assert child.ask("sum") == before
    assert child.ask("compute")


def test_session_lock_failure_leaves_child_running(cuda_driver: Any, cuda_child: Any) -> None:
    drv, child = cuda_driver, cuda_child
    before = child.ask("sum")
    plain = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        session = GpuCheckpointSession(drv, [child.pid, plain.pid])
        with pytest.raises(GpuError) as info:
            session.lock(timeout_s=10)
        assert info.value.rollback.ok  # type: ignore[attr-defined]
    finally:
        plain.kill()
        plain.wait()
    assert drv.state(child.pid) is ProcessState.RUNNING
    assert child.ask("sum") == before


def test_session_cycle_with_vmm_release(cuda_driver: Any, spawn_child: Any) -> None:
    drv = cuda_driver
    a, b = spawn_child("--mib", "128"), spawn_child("--mib", "64", "--region-mib", "32")
    sums = {c.pid: c.ask("sum") for c in (a, b)}
    addr = a.ask("addr")
    assert a.ask("expect 0") == "ok"
    assert a.ask("release") == "ok"  # the KV-cache-like region is dropped first

    session = GpuCheckpointSession(drv, [a.pid, b.pid])
    session.lock(timeout_s=20)
    session.checkpoint()
    assert {p.pid for p in session.processes} == {a.pid, b.pid}
    assert all(p.gpu_uuid.startswith("GPU-") and p.gpu_model for p in session.processes)
    for c in (a, b):
        assert nvidia_fds(c.pid) == []
    assert set(session.states().values()) == {ProcessState.CHECKPOINTED}
    session.restore()
    session.unlock()
    assert set(session.states().values()) == {ProcessState.RUNNING}
    assert [t.name for t in session.timings] == [
        "gpu-lock", "gpu-checkpoint", "gpu-restore", "gpu-unlock",
    ]

    assert {c.pid: c.ask("sum") for c in (a, b)} == sums
    assert a.ask("map") == addr  # same virtual address after restore
    assert a.ask("fill 9") == "ok" and a.ask("expect 9") == "ok"
    assert b.ask("expect 0") == "ok"  # b's region was not released: contents survived
