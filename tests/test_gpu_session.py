"""GpuCheckpointSession over the fake driver: the cycle, and rollback so that a
failed checkpoint leaves the original processes running."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from warmstart.errors import GpuError, UsageError
from warmstart.gpu.devices import GpuDevice, GpuInventory, GpuUsage
from warmstart.gpu.driver import CudaCallError, CudaDriver, ProcessState
from warmstart.gpu.fake import ILLEGAL_STATE, TIMEOUT, FakeCudaLib, FakeGpu, FakeProcess
from warmstart.gpu.session import GpuCheckpointSession, ProcessGpuInfo

A = "GPU-11111111-2222-3333-4444-555555555555"
B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
H100 = "NVIDIA H100 80GB HBM3"
INV = GpuInventory(
    (GpuDevice(0, A, H100, 80 << 30), GpuDevice(1, B, H100, 80 << 30)), "580.65.06", 13000, "nvml"
)
RUNNING, LOCKED, CKPT = ProcessState.RUNNING, ProcessState.LOCKED, ProcessState.CHECKPOINTED


def setup(
    pids: Sequence[int] = (1, 2, 3), **kw: object
) -> tuple[GpuCheckpointSession, FakeCudaLib]:
    lib = FakeCudaLib([FakeGpu(A), FakeGpu(B)],
                      {p: FakeProcess(gpus=[A] if p != 3 else [B]) for p in (1, 2, 3)})

    def probe(ps: Sequence[int]) -> dict[int, list[GpuUsage]]:
        return {p: [GpuUsage(p, lib.processes[p].gpus[0], p << 30)] for p in ps
                if p in lib.processes}

    kw.setdefault("usage_probe", probe)
    s = GpuCheckpointSession(CudaDriver(lib), pids, inventory=INV, **kw)  # type: ignore[arg-type]
    return s, lib


def states(lib: FakeCudaLib) -> list[ProcessState]:
    return [lib.processes[p].state for p in (1, 2, 3)]


def test_full_cycle_records_gpus_bytes_and_timings() -> None:
    ticks = iter(range(0, 1000, 5))
    s, lib = setup(clock=lambda: float(next(ticks)))
    s.lock(timeout_s=30)
    assert states(lib) == [LOCKED] * 3
    s.checkpoint()
    assert states(lib) == [CKPT] * 3
    assert [(p.pid, p.gpu_uuid, p.gpu_model, p.gpu_index, p.device_memory_bytes)
            for p in s.processes] == [
        (1, A, H100, 0, 1 << 30), (2, A, H100, 0, 2 << 30), (3, B, H100, 1, 3 << 30),
    ]
    assert {p.driver_version for p in s.processes} == {"580.65.06"}
    assert s.bytes_moved == 6 << 30
    s.restore()
    s.unlock()
    assert states(lib) == [RUNNING] * 3
    assert [t.name for t in s.timings] == [
        "gpu-lock", "gpu-checkpoint", "gpu-restore", "gpu-unlock",
    ]
    assert all(t.seconds > 0 for t in s.timings)
    assert s.timings[1].bytes == 6 << 30 and s.timings[0].bytes is None


def test_lock_failure_unlocks_the_ones_before() -> None:
    s, lib = setup()
    lib.fail("cuCheckpointProcessLock", 2, code=TIMEOUT)
    with pytest.raises(CudaCallError) as info:
        s.lock(timeout_s=5)
    assert info.value.pid == 2 and info.value.name == "CUDA_ERROR_TIMEOUT"
    assert states(lib) == [RUNNING] * 3
    assert ("cuCheckpointProcessUnlock", 1) in lib.calls
    assert ("cuCheckpointProcessLock", 3) not in lib.calls  # stopped at the failure
    assert info.value.rollback.ok  # type: ignore[attr-defined]
    assert info.value.hint and "rolled back" in info.value.hint


def test_lock_failure_on_a_process_without_cuda() -> None:
    s, lib = setup(pids=(1, 2, 77))
    with pytest.raises(CudaCallError) as info:
        s.lock()
    assert info.value.pid == 77
    assert states(lib) == [RUNNING] * 3
    assert info.value.rollback.ok  # type: ignore[attr-defined]


def test_lock_failure_that_left_the_process_locked_is_undone() -> None:
    s, lib = setup()
    lib.fail("cuCheckpointProcessLock", 2, code=TIMEOUT, then=LOCKED)
    with pytest.raises(CudaCallError):
        s.lock()
    assert states(lib) == [RUNNING] * 3


@pytest.mark.parametrize("left", [LOCKED, CKPT])
def test_checkpoint_failure_restores_and_unlocks_everyone(left: ProcessState) -> None:
    s, lib = setup()
    s.lock()
    lib.fail("cuCheckpointProcessCheckpoint", 2, then=left)
    with pytest.raises(CudaCallError) as info:
        s.checkpoint()
    assert info.value.name == "CUDA_ERROR_NOT_SUPPORTED" and info.value.pid == 2
    assert states(lib) == [RUNNING] * 3
    calls = lib.calls
    assert calls.index(("cuCheckpointProcessRestore", 1)) < calls.index(
        ("cuCheckpointProcessUnlock", 1))
    assert ("cuCheckpointProcessCheckpoint", 3) not in calls
    assert lib.processes[1].last_pairs == []  # rolled back onto its own GPU: no map
    assert info.value.rollback.ok  # type: ignore[attr-defined]


def test_failed_rollback_is_reported_not_hidden() -> None:
    s, lib = setup()
    s.lock()
    lib.fail("cuCheckpointProcessCheckpoint", 3)
    lib.fail("cuCheckpointProcessRestore", 1, code=ILLEGAL_STATE, times=5)
    with pytest.raises(CudaCallError) as info:
        s.checkpoint()
    assert info.value.call == "cuCheckpointProcessCheckpoint"  # the original error
    report = info.value.rollback  # type: ignore[attr-defined]
    assert not report.ok and 1 in report.errors
    assert report.states[1] is CKPT and report.states[2] is RUNNING
    assert info.value.hint and "rollback incomplete" in info.value.hint
    assert states(lib) == [CKPT, RUNNING, RUNNING]


def test_failed_state_cannot_be_resumed() -> None:
    s, lib = setup()
    s.lock()
    lib.fail("cuCheckpointProcessCheckpoint", 2, then=ProcessState.FAILED)
    with pytest.raises(CudaCallError) as info:
        s.checkpoint()
    report = info.value.rollback  # type: ignore[attr-defined]
    assert "FAILED" in report.errors[2]
    assert report.states[2] is ProcessState.FAILED
    assert states(lib)[0] is RUNNING and states(lib)[2] is RUNNING


def test_probe_failure_before_checkpoint_unlocks() -> None:
    def probe(ps: Sequence[int]) -> dict[int, list[GpuUsage]]:
        raise GpuError("NVML went away")

    s, lib = setup(usage_probe=probe)
    s.lock()
    with pytest.raises(GpuError, match="NVML went away"):
        s.checkpoint()
    assert states(lib) == [RUNNING] * 3
    assert not any(c[0] == "cuCheckpointProcessCheckpoint" for c in lib.calls)


def test_lock_deadline_spans_all_processes() -> None:
    now = [100.0]

    def clock() -> float:
        now[0] += 4.0  # every clock read: 4 s later
        return now[0]

    s, lib = setup(clock=clock)
    with pytest.raises(GpuError, match="longer than 10 s") as info:
        s.lock(timeout_s=10)
    assert lib.processes[1].last_lock_timeout_ms == 6000
    assert lib.processes[2].last_lock_timeout_ms == 2000
    assert states(lib) == [RUNNING] * 3
    assert info.value.hint and "rolled back" in info.value.hint


def test_restore_gives_every_pid_the_whole_map() -> None:
    """The driver needs the whole mapping per process (a swapped TP pair fails otherwise)."""
    s, lib = setup()
    s.lock()
    s.checkpoint()
    s.restore([(A, A), (B, A)])  # pid 3 moves B -> A; pids 1, 2 stay on A
    assert [lib.processes[p].last_pairs for p in (1, 2, 3)] == [[(A, A), (B, A)]] * 3
    assert lib.processes[3].gpus == [A]
    assert lib.processes[1].gpus == [A]
    s.unlock()
    assert states(lib) == [RUNNING] * 3


def test_restore_with_known_records_for_a_replica() -> None:
    lib = FakeCudaLib([FakeGpu(A), FakeGpu(B)], {5: FakeProcess(CKPT, gpus=[A])})
    records = [ProcessGpuInfo(5, A, H100, "580.65.06", 0)]
    s = GpuCheckpointSession(CudaDriver(lib), [5], inventory=INV, processes=records)
    s.restore([(A, B)])
    s.unlock()
    assert lib.processes[5].gpus == [B] and lib.processes[5].state is RUNNING


def test_unlock_tries_every_pid() -> None:
    s, lib = setup()
    s.lock()
    lib.fail("cuCheckpointProcessUnlock", 1)
    with pytest.raises(CudaCallError) as info:
        s.unlock()
    assert info.value.pid == 1
    assert states(lib) == [LOCKED, RUNNING, RUNNING]
    report = s.rollback()
    assert report.ok and states(lib) == [RUNNING] * 3


def test_bad_pid_lists() -> None:
    lib = FakeCudaLib()
    with pytest.raises(UsageError):
        GpuCheckpointSession(CudaDriver(lib), [])
    with pytest.raises(UsageError, match="twice"):
        GpuCheckpointSession(CudaDriver(lib), [1, 1])


def test_rollback_never_raises() -> None:
    s, _ = setup(pids=(1, 404))
    report = s.rollback([1, 404])
    assert report.states[1] is RUNNING
    assert report.states[404] is None and 404 in report.errors
    assert not report.ok and "pid 404" in report.summary()
