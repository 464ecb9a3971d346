"""warmstart.gpu.driver on CPU: struct layouts, UUIDs, error mapping, and the
real ctypes marshalling against a stub libcuda compiled from C."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from warmstart.errors import GpuError, NoGpuDriver, UsageError
from warmstart.gpu import driver as d
from warmstart.gpu.driver import CudaCallError, CudaDriver, ProcessState, load_driver
from warmstart.gpu.fake import FakeCudaLib, FakeGpu, FakeProcess

A = "GPU-11111111-2222-3333-4444-555555555555"
B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


# ----------------------------------------------------------------- layouts (cuda.h, CUDA 13.x)


def test_argument_structs_match_cuda_h() -> None:
    for struct in (
        d.CUcheckpointLockArgs,
        d.CUcheckpointCheckpointArgs,
        d.CUcheckpointRestoreArgs,
        d.CUcheckpointUnlockArgs,
    ):
        assert ctypes.sizeof(struct) == 64, struct.__name__
    assert d.CUcheckpointLockArgs.timeoutMs.offset == 0
    assert d.CUcheckpointLockArgs.reserved0.offset == 4
    assert d.CUcheckpointLockArgs.reserved1.offset == 8
    assert ctypes.sizeof(d.CUuuid) == 16
    assert ctypes.sizeof(d.CUcheckpointGpuPair) == 32
    assert d.CUcheckpointGpuPair.newUuid.offset == 16
    assert d.CUcheckpointRestoreArgs.gpuPairs.offset == 0
    assert d.CUcheckpointRestoreArgs.gpuPairsCount.offset == 8
    assert d.CUcheckpointRestoreArgs.reserved.offset == 12


# ----------------------------------------------------------------- UUIDs


@given(st.binary(min_size=16, max_size=16))
def test_uuid_round_trip(raw: bytes) -> None:
    text = d.uuid_to_str(raw)
    assert text.startswith("GPU-") and len(text) == 40
    assert d.parse_uuid(text) == raw
    assert d.parse_uuid(text.upper().replace("GPU-", "")) == raw


@pytest.mark.parametrize("bad", ["", "GPU-123", "MIG-11111111-2222-3333-4444-555555555555", "0"])
def test_bad_uuid_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError, match="not a GPU UUID"):
        d.parse_uuid(bad)


def test_format_cuda_version() -> None:
    assert d.format_cuda_version(13000) == "13.0"
    assert d.format_cuda_version(12080) == "12.8"


# ----------------------------------------------------------------- CudaDriver over the fake


def _driver(**kw: object) -> tuple[CudaDriver, FakeCudaLib]:
    lib = FakeCudaLib(
        [FakeGpu(A), FakeGpu(B)],
        {10: FakeProcess(gpus=[A]), 11: FakeProcess(gpus=[A])},
        **kw,  # type: ignore[arg-type]
    )
    return CudaDriver(lib), lib


def test_full_cycle_state_transitions() -> None:
    drv, lib = _driver()
    seen = [drv.state(10)]
    drv.lock(10, timeout_ms=2500)
    seen.append(drv.state(10))
    drv.checkpoint(10)
    seen.append(drv.state(10))
    drv.restore(10)
    seen.append(drv.state(10))
    drv.unlock(10)
    seen.append(drv.state(10))
    assert seen == [
        ProcessState.RUNNING,
        ProcessState.LOCKED,
        ProcessState.CHECKPOINTED,
        ProcessState.LOCKED,
        ProcessState.RUNNING,
    ]
    assert lib.processes[10].last_lock_timeout_ms == 2500
    assert lib.processes[11].state is ProcessState.RUNNING


def test_error_carries_name_string_call_and_pid() -> None:
    drv, lib = _driver()
    drv.lock(10)
    lib.fail("cuCheckpointProcessCheckpoint", 10, code=801)
    with pytest.raises(CudaCallError) as info:
        drv.checkpoint(10)
    err = info.value
    assert isinstance(err, GpuError)
    assert (err.name, err.code, err.call, err.pid) == (
        "CUDA_ERROR_NOT_SUPPORTED", 801, "cuCheckpointProcessCheckpoint", 10,
    )
    assert err.description == "operation not supported"
    assert "pid 10" in err.message and "CUDA_ERROR_NOT_SUPPORTED" in err.message
    assert err.hint and "UVM" in err.hint


def test_checkpoint_hints_stay_on_checkpoint_calls() -> None:
    drv, lib = _driver()
    lib.fail("cuMemHostAlloc", code=801)
    with pytest.raises(CudaCallError) as info:
        drv.call("cuMemHostAlloc", ctypes.pointer(ctypes.c_void_p()), 4096, 0)
    assert info.value.name == "CUDA_ERROR_NOT_SUPPORTED" and info.value.hint is None


def test_unknown_code_falls_back_to_builtin_names() -> None:
    drv, lib = _driver()
    lib.fail("cuCheckpointProcessLock", 10, code=304)  # fake has no name for it
    with pytest.raises(CudaCallError) as info:
        drv.lock(10)
    assert info.value.name == "CUDA_ERROR_OPERATING_SYSTEM"
    lib.fail("cuCheckpointProcessLock", 10, code=12345)
    with pytest.raises(CudaCallError, match="CUresult 12345"):
        drv.lock(10)


def test_wrong_state_is_illegal_state() -> None:
    drv, _ = _driver()
    with pytest.raises(CudaCallError) as info:
        drv.checkpoint(10)
    assert info.value.name == "CUDA_ERROR_ILLEGAL_STATE"


@pytest.mark.parametrize("pid", [0, -3, True, "12"])
def test_bad_pid_is_a_usage_error(pid: object) -> None:
    drv, lib = _driver()
    with pytest.raises(UsageError):
        drv.lock(pid)  # type: ignore[arg-type]
    assert lib.calls == []


def test_negative_timeout_refused() -> None:
    drv, _ = _driver()
    with pytest.raises(UsageError, match="timeout"):
        drv.lock(10, timeout_ms=-1)


def test_restore_marshals_gpu_pairs_and_inits_first() -> None:
    drv, lib = _driver()
    drv.lock(10)
    drv.checkpoint(10)
    assert not lib.initialized
    drv.restore(10, [(A, B)])
    assert lib.initialized  # cuInit before restore (persistence mode may be off)
    assert lib.calls.index(("cuInit", None)) < lib.calls.index(("cuCheckpointProcessRestore", 10))
    assert lib.processes[10].last_pairs == [(A, B)]
    assert lib.processes[10].gpus == [B]


def test_restore_pairs_refused_by_pre_13_driver() -> None:
    drv, _ = _driver(version=12090)
    drv.lock(10)
    drv.checkpoint(10)
    assert not drv.supports_remap()
    with pytest.raises(CudaCallError, match="INVALID_VALUE"):
        drv.restore(10, [(A, B)])
    drv.restore(10)  # without pairs it works
    assert drv.state(10) is ProcessState.LOCKED


def test_discovery_is_lazy_and_lists_devices() -> None:
    drv, lib = _driver()
    assert drv.version() == 13000
    drv.lock(10)
    assert not lib.initialized  # checkpoint calls need no cuInit
    devs = drv.devices()
    assert lib.initialized
    assert [(x.index, x.uuid, x.name) for x in devs] == [
        (0, A, "NVIDIA H100 80GB HBM3"), (1, B, "NVIDIA H100 80GB HBM3"),
    ]
    assert devs[0].total_memory_bytes == 80 << 30


def test_restore_thread_id() -> None:
    drv, lib = _driver()
    lib.processes[10].restore_tid = 4242
    assert drv.restore_thread_id(10) == 4242


def test_missing_function_is_no_gpu_driver() -> None:
    class Old:
        def cuDriverGetVersion(self, out: object) -> int:
            return 0

    with pytest.raises(NoGpuDriver):
        CudaDriver(Old()).lock(10)


# ----------------------------------------------------------------- load_driver


def test_load_driver_without_library() -> None:
    with pytest.raises(NoGpuDriver) as info:
        load_driver("/nonexistent/libcuda.so.1")
    assert "need ≥ 570" in info.value.message
    assert info.value.hint and "/nonexistent/libcuda.so.1" in info.value.hint


STUB_OLD = r"""
int cuDriverGetVersion(int *v) { *v = 12040; return 0; }
int cuInit(unsigned int f) { return 0; }
"""

STUB_FULL = r"""
#include <string.h>
typedef struct { unsigned char b[16]; } uuid16;
typedef struct { unsigned int timeoutMs, reserved0; unsigned long long reserved1[7]; } lock_args;
typedef struct { uuid16 o, n; } pair;
typedef struct { pair *pairs; unsigned int count; char reserved[52]; } restore_args;
int last_pid, last_timeout, last_count, reserved_dirty;
unsigned char last_pairs[64];
int cuDriverGetVersion(int *v) { *v = 13000; return 0; }
int cuInit(unsigned int f) { return 0; }
int cuGetErrorName(int c, const char **s) {
    if (c == 909) { *s = "CUDA_ERROR_TIMEOUT"; return 0; } return 1; }
int cuGetErrorString(int c, const char **s) {
    if (c == 909) { *s = "the operation timed out"; return 0; } return 1; }
int cuCheckpointProcessLock(int pid, lock_args *a) {
    last_pid = pid; last_timeout = a->timeoutMs;
    for (int i = 0; i < 7; i++) if (a->reserved1[i] || a->reserved0) reserved_dirty = 1;
    return pid == 666 ? 909 : 0; }
int cuCheckpointProcessCheckpoint(int pid, void *a) { last_pid = pid; return 0; }
int cuCheckpointProcessRestore(int pid, restore_args *a) {
    last_pid = pid; last_count = a->count;
    for (int i = 0; i < 52; i++) if (a->reserved[i]) reserved_dirty = 1;
    if (a->count) memcpy(last_pairs, a->pairs, 32 * (a->count > 2 ? 2 : a->count));
    return 0; }
int cuCheckpointProcessUnlock(int pid, void *a) { last_pid = pid; return 0; }
int cuCheckpointProcessGetState(int pid, int *s) { *s = 2; return 0; }
int cuCheckpointProcessGetRestoreThreadId(int pid, int *t) { *t = pid + 1; return 0; }
int cuDeviceGetCount(int *n) { *n = 1; return 0; }
int cuDeviceGet(int *d, int i) { *d = i; return 0; }
int cuDeviceGetName(char *buf, int len, int d) {
    strncpy(buf, "NVIDIA H100 80GB HBM3", len); return 0; }
int cuDeviceGetUuid_v2(uuid16 *u, int d) { for (int i = 0; i < 16; i++) u->b[i] = i; return 0; }
int cuDeviceTotalMem_v2(unsigned long *m, int d) { *m = 85899345920UL; return 0; }
"""


def _build(tmp_path: Path, name: str, source: str) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a stub libcuda")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


def test_load_driver_refuses_library_without_checkpoint_api(tmp_path: Path) -> None:
    lib = _build(tmp_path, "old", STUB_OLD)
    with pytest.raises(NoGpuDriver) as info:
        load_driver(lib)
    assert info.value.hint and "CUDA 12.4" in info.value.hint
    assert "cuCheckpointProcessLock" in info.value.hint
    # a worker wanting only VMM/discovery may still load it
    assert load_driver(lib, require_checkpoint=False).version() == 12040


def test_real_ctypes_marshalling(tmp_path: Path) -> None:
    path = _build(tmp_path, "full", STUB_FULL)
    drv = load_driver(path)
    raw = ctypes.CDLL(str(path))
    val = lambda name: ctypes.c_int.in_dll(raw, name).value  # noqa: E731

    drv.lock(4321, timeout_ms=1500)
    assert (val("last_pid"), val("last_timeout")) == (4321, 1500)
    assert drv.state(4321) is ProcessState.CHECKPOINTED
    assert drv.restore_thread_id(77) == 78
    drv.restore(4321, [(A, B), (B, A)])
    assert val("last_count") == 2
    pairs = bytes((ctypes.c_ubyte * 64).in_dll(raw, "last_pairs"))
    assert pairs == d.parse_uuid(A) + d.parse_uuid(B) + d.parse_uuid(B) + d.parse_uuid(A)
    drv.restore(4321)
    assert val("last_count") == 0
    assert val("reserved_dirty") == 0

    with pytest.raises(CudaCallError) as info:
        drv.lock(666, timeout_ms=10)
    assert info.value.name == "CUDA_ERROR_TIMEOUT"
    assert info.value.description == "the operation timed out"

    (dev,) = drv.devices()
    assert dev.name == "NVIDIA H100 80GB HBM3"
    assert dev.uuid == d.uuid_to_str(bytes(range(16)))
    assert dev.total_memory_bytes == 85899345920
