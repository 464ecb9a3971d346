"""An in-memory stand-in for libcuda's function table, for tests without a GPU.

``CudaDriver(FakeCudaLib(...))`` behaves like the real driver at the ctypes
boundary: functions take the same ``ctypes.pointer`` arguments, read and write
the same structures, and return CUresult codes. The checkpoint state machine
follows NVIDIA's documentation (RUNNING -lock-> LOCKED -checkpoint->
CHECKPOINTED -restore-> LOCKED -unlock-> RUNNING; a call in the wrong state
returns CUDA_ERROR_ILLEGAL_STATE). Which code the real driver returns for a
pid without CUDA is not documented; the fake returns CUDA_ERROR_NOT_INITIALIZED.

Faults are injected with :meth:`FakeCudaLib.fail`. Every call is appended to
:attr:`FakeCudaLib.calls` as ``(function name, pid or None)``.
"""

from __future__ import annotations

import ctypes
import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from warmstart.gpu.driver import ProcessState, parse_uuid, uuid_to_str

SUCCESS = 0
INVALID_VALUE = 1
OUT_OF_MEMORY = 2
NOT_INITIALIZED = 3
INVALID_DEVICE = 101
ILLEGAL_STATE = 401
NOT_SUPPORTED = 801
TIMEOUT = 909

_NAMES = {
    INVALID_VALUE: b"CUDA_ERROR_INVALID_VALUE",
    OUT_OF_MEMORY: b"CUDA_ERROR_OUT_OF_MEMORY",
    NOT_INITIALIZED: b"CUDA_ERROR_NOT_INITIALIZED",
    INVALID_DEVICE: b"CUDA_ERROR_INVALID_DEVICE",
    ILLEGAL_STATE: b"CUDA_ERROR_ILLEGAL_STATE",
    NOT_SUPPORTED: b"CUDA_ERROR_NOT_SUPPORTED",
    TIMEOUT: b"CUDA_ERROR_TIMEOUT",
}
_STRINGS = {
    INVALID_VALUE: b"invalid argument",
    OUT_OF_MEMORY: b"out of memory",
    NOT_INITIALIZED: b"initialization error",
    INVALID_DEVICE: b"invalid device ordinal",
    ILLEGAL_STATE: b"the operation cannot be performed in the present state",
    NOT_SUPPORTED: b"operation not supported",
    TIMEOUT: b"the operation timed out",
}


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    total_memory_bytes: int = 80 << 30


@dataclass
class FakeProcess:
    state: ProcessState = ProcessState.RUNNING
    #: UUIDs of the GPUs it runs on (restore may remap them).
    gpus: list[str] = field(default_factory=list)
    restore_tid: int = 0
    last_lock_timeout_ms: int | None = None
    last_pairs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Fault:
    code: int
    then: ProcessState | None
    times: int


class FakeCudaLib:
    """Fake ``libcuda`` with GPUs ``gpus`` and CUDA processes ``processes``."""

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        processes: dict[int, FakeProcess] | None = None,
        *,
        version: int = 13000,
        granularity: int = 2 << 20,
    ) -> None:
        self.gpus = list(gpus)
        self.processes: dict[int, FakeProcess] = dict(processes or {})
        self.version = version
        self.granularity = granularity
        self.initialized = False
        self.calls: list[tuple[str, int | None]] = []
        self._faults: dict[tuple[str, int | None], _Fault] = {}
        # VMM bookkeeping
        self._next_addr = itertools.count(0x7F00_0000_0000, 1 << 32)
        self._next_handle = itertools.count(1)
        self.reservations: dict[int, int] = {}
        self.allocations: dict[int, int] = {}  # handle -> size
        self.mappings: dict[int, int] = {}  # address -> handle
        self.access: dict[int, int] = {}  # address -> flags
        self.ctx_refs = 0
        self.current_ctx: int | None = None
        self.memory: dict[int, bytearray] = {}  # handle -> contents
        self.handle_types: dict[int, int] = {}  # handle -> requestedHandleTypes at cuMemCreate
        self.imported: dict[int, int] = {}  # imported handle -> exported one
        self.host_buffers: dict[int, Any] = {}  # address -> pinned buffer (cuMemHostAlloc)
        #: (device address, bytes, stream) of every successful cuMemcpyHtoDAsync_v2
        self.h2d_copies: list[tuple[int, int, int]] = []
        self.streams: set[int] = set()
        self.events: dict[int, int | None] = {}  # event -> the stream it was last recorded on
        self._handles = 0x5000

    # -- fault injection

    def fail(
        self,
        call: str,
        pid: int | None = None,
        code: int = NOT_SUPPORTED,
        *,
        then: ProcessState | None = None,
        times: int = 1,
    ) -> None:
        """Make ``call`` (for ``pid``) return ``code`` ``times`` times; ``then``
        is the state the process is left in (default: unchanged)."""
        self._faults[(call, pid)] = _Fault(code, then, times)

    def _fault(self, call: str, pid: int | None) -> int:
        self.calls.append((call, pid))
        fault = self._faults.get((call, pid)) or self._faults.get((call, None))
        if fault is None or fault.times <= 0:
            return SUCCESS
        fault.times -= 1
        if fault.then is not None and pid in self.processes:
            self.processes[pid].state = fault.then
        return fault.code

    def _proc(self, pid: int) -> FakeProcess | None:
        return self.processes.get(pid)

    # -- errors & versions

    def cuGetErrorName(self, code: int, out: Any) -> int:
        if code not in _NAMES:
            return INVALID_VALUE
        out[0] = _NAMES[code]
        return SUCCESS

    def cuGetErrorString(self, code: int, out: Any) -> int:
        if code not in _STRINGS:
            return INVALID_VALUE
        out[0] = _STRINGS[code]
        return SUCCESS

    def cuDriverGetVersion(self, out: Any) -> int:
        out[0] = self.version
        return SUCCESS

    def cuInit(self, flags: int) -> int:
        if rc := self._fault("cuInit", None):
            return rc
        self.initialized = True
        return SUCCESS

    # -- checkpoint API

    def _step(self, call: str, pid: int, want: ProcessState, to: ProcessState) -> int:
        if rc := self._fault(call, pid):
            return rc
        proc = self._proc(pid)
        if proc is None:
            return NOT_INITIALIZED
        if proc.state is not want:
            return ILLEGAL_STATE
        proc.state = to
        return SUCCESS

    @staticmethod
    def _zero(buf: ctypes.Structure, skip: int = 0) -> bool:
        return not any(bytes(buf)[skip:])

    def cuCheckpointProcessLock(self, pid: int, args: Any) -> int:
        a = args.contents
        if a.reserved0 or any(a.reserved1):
            return INVALID_VALUE
        rc = self._step("cuCheckpointProcessLock", pid, ProcessState.RUNNING,
                        ProcessState.LOCKED)
        if rc == SUCCESS:
            self.processes[pid].last_lock_timeout_ms = a.timeoutMs
        return rc

    def cuCheckpointProcessCheckpoint(self, pid: int, args: Any) -> int:
        if not self._zero(args.contents):
            return INVALID_VALUE
        return self._step("cuCheckpointProcessCheckpoint", pid, ProcessState.LOCKED,
                          ProcessState.CHECKPOINTED)

    def cuCheckpointProcessRestore(self, pid: int, args: Any) -> int:
        a = args.contents
        if not self._zero(a, skip=12):  # reserved tail past gpuPairs + gpuPairsCount
            return INVALID_VALUE
        pairs: list[tuple[str, str]] = []
        if a.gpuPairsCount:
            if self.version < 13000:
                return INVALID_VALUE  # reserved bytes before CUDA 13.0
            for i in range(a.gpuPairsCount):
                p = a.gpuPairs[i]
                pairs.append((uuid_to_str(bytes(p.oldUuid.bytes)),
                               uuid_to_str(bytes(p.newUuid.bytes))))
        proc = self._proc(pid)
        if pairs and proc is not None:
            mapping = dict(pairs)
            known = {g.uuid for g in self.gpus}
            if any(g not in mapping for g in proc.gpus) or any(
                n not in known for n in mapping.values()
            ):
                return INVALID_DEVICE
        rc = self._step("cuCheckpointProcessRestore", pid, ProcessState.CHECKPOINTED,
                        ProcessState.LOCKED)
        if rc == SUCCESS and proc is not None:
            proc.last_pairs = pairs
            if pairs:
                proc.gpus = [dict(pairs)[g] for g in proc.gpus]
        return rc

    def cuCheckpointProcessUnlock(self, pid: int, args: Any) -> int:
        if not self._zero(args.contents):
            return INVALID_VALUE
        return self._step("cuCheckpointProcessUnlock", pid, ProcessState.LOCKED,
                          ProcessState.RUNNING)

    def cuCheckpointProcessGetState(self, pid: int, out: Any) -> int:
        if rc := self._fault("cuCheckpointProcessGetState", pid):
            return rc
        proc = self._proc(pid)
        if proc is None:
            return NOT_INITIALIZED
        out[0] = int(proc.state)
        return SUCCESS

    def cuCheckpointProcessGetRestoreThreadId(self, pid: int, out: Any) -> int:
        proc = self._proc(pid)
        if proc is None:
            return NOT_INITIALIZED
        out[0] = proc.restore_tid or pid
        return SUCCESS

    # -- discovery

    def _need_init(self) -> int:
        return SUCCESS if self.initialized else NOT_INITIALIZED

    def cuDeviceGetCount(self, out: Any) -> int:
        if rc := self._need_init():
            return rc
        out[0] = len(self.gpus)
        return SUCCESS

    def cuDeviceGet(self, out: Any, index: int) -> int:
        if rc := self._need_init():
            return rc
        if not 0 <= index < len(self.gpus):
            return INVALID_DEVICE
        out[0] = index
        return SUCCESS

    def cuDeviceGetName(self, buf: Any, length: int, dev: int) -> int:
        buf.value = self.gpus[dev].name.encode()[: length - 1]
        return SUCCESS

    def cuDeviceGetUuid_v2(self, out: Any, dev: int) -> int:
        out.contents.bytes[:] = parse_uuid(self.gpus[dev].uuid)
        return SUCCESS

    def cuDeviceTotalMem_v2(self, out: Any, dev: int) -> int:
        out[0] = self.gpus[dev].total_memory_bytes
        return SUCCESS

    # -- contexts and VMM

    def cuDevicePrimaryCtxRetain(self, out: Any, dev: int) -> int:
        if rc := self._need_init() or self._fault("cuDevicePrimaryCtxRetain", None):
            return rc
        self.ctx_refs += 1
        out[0] = 0xC0 + dev
        return SUCCESS

    def cuDevicePrimaryCtxRelease_v2(self, dev: int) -> int:
        self.ctx_refs -= 1
        return SUCCESS

    def cuCtxSetCurrent(self, ctx: Any) -> int:
        self.current_ctx = ctx.value if isinstance(ctx, ctypes.c_void_p) else ctx
        return SUCCESS

    def cuCtxSynchronize(self) -> int:
        return SUCCESS if self.current_ctx else INVALID_VALUE

    def cuMemGetAllocationGranularity(self, out: Any, prop: Any, option: int) -> int:
        out[0] = self.granularity
        return SUCCESS

    def cuMemAddressReserve(self, out: Any, size: int, align: int, addr: int, flags: int) -> int:
        if rc := self._fault("cuMemAddressReserve", None):
            return rc
        if size % self.granularity:
            return INVALID_VALUE
        base = next(self._next_addr)
        self.reservations[base] = size
        out[0] = base
        return SUCCESS

    def cuMemAddressFree(self, addr: int, size: int) -> int:
        if self.reservations.get(addr) != size or addr in self.mappings:
            return INVALID_VALUE
        del self.reservations[addr]
        return SUCCESS

    def cuMemCreate(self, out: Any, size: int, prop: Any, flags: int) -> int:
        if rc := self._fault("cuMemCreate", None):
            return rc
        p = prop.contents
        if p.type != 1 or p.location.type != 1 or size % self.granularity:
            return INVALID_VALUE
        handle = next(self._next_handle)
        self.allocations[handle] = size
        self.memory[handle] = bytearray(size if size <= 1 << 24 else 0)
        self.handle_types[handle] = p.requestedHandleTypes
        out[0] = handle
        return SUCCESS

    def cuMemRelease(self, handle: int) -> int:
        if handle not in self.allocations:
            return INVALID_VALUE
        del self.allocations[handle]
        self.memory.pop(handle, None)
        return SUCCESS

    def cuMemMap(self, addr: int, size: int, offset: int, handle: int, flags: int) -> int:
        if rc := self._fault("cuMemMap", None):
            return rc
        if self.reservations.get(addr) != size or addr in self.mappings:
            return INVALID_VALUE
        if handle not in self.allocations or offset or self.allocations[handle] < size:
            return INVALID_VALUE
        self.mappings[addr] = handle
        return SUCCESS

    def cuMemUnmap(self, addr: int, size: int) -> int:
        if addr not in self.mappings:
            return INVALID_VALUE
        del self.mappings[addr]
        self.access.pop(addr, None)
        return SUCCESS

    def cuMemSetAccess(self, addr: int, size: int, desc: Any, count: int) -> int:
        if rc := self._fault("cuMemSetAccess", None):
            return rc
        if addr not in self.mappings:
            return INVALID_VALUE
        self.access[addr] = desc.contents.flags
        return SUCCESS

    def cuMemsetD8_v2(self, addr: int, value: int, count: int) -> int:
        handle = self.mappings.get(addr)
        if handle is None or self.access.get(addr) != 3:
            return INVALID_VALUE
        mem = self.memory[handle]
        mem[:count] = bytes([value]) * min(count, len(mem))
        return SUCCESS

    def cuMemExportToShareableHandle(self, out: Any, handle: int, kind: int, flags: int) -> int:
        if handle not in self.allocations:
            return INVALID_VALUE
        if kind != 1 or self.handle_types.get(handle) != 1 or flags:
            return INVALID_VALUE  # export needs requestedHandleTypes = POSIX_FILE_DESCRIPTOR
        ctypes.cast(out, ctypes.POINTER(ctypes.c_int))[0] = 100 + handle
        return SUCCESS

    # -- sharing and copies (warmstart.gms)

    def cuMemImportFromShareableHandle(self, out: Any, os_handle: Any, kind: int) -> int:
        fd = os_handle.value if isinstance(os_handle, ctypes.c_void_p) else os_handle
        source = (fd or 0) - 100
        if kind != 1 or source not in self.allocations:
            return INVALID_VALUE
        handle = next(self._next_handle)
        self.allocations[handle] = self.allocations[source]
        self.memory[handle] = self.memory[source]  # the same physical memory
        self.imported[handle] = source
        out[0] = handle
        return SUCCESS

    def _resolve(self, addr: int, count: int) -> tuple[bytearray, int, int] | None:
        """(contents, offset, mapping base) of a mapped device range."""
        for base, handle in self.mappings.items():
            size = self.allocations.get(handle, 0)
            if base <= addr and addr + count <= base + size:
                return self.memory[handle], addr - base, base
        return None

    def cuMemHostAlloc(self, out: Any, size: int, flags: int) -> int:
        if rc := self._fault("cuMemHostAlloc", None):
            return rc
        buf = ctypes.create_string_buffer(size)
        self.host_buffers[ctypes.addressof(buf)] = buf
        out[0] = ctypes.addressof(buf)
        return SUCCESS

    def cuMemFreeHost(self, ptr: int) -> int:
        return SUCCESS if self.host_buffers.pop(ptr, None) is not None else INVALID_VALUE

    def cuStreamCreate(self, out: Any, flags: int) -> int:
        self._handles += 1
        self.streams.add(self._handles)
        out[0] = self._handles
        return SUCCESS

    def cuEventCreate(self, out: Any, flags: int) -> int:
        self._handles += 1
        self.events[self._handles] = None
        out[0] = self._handles
        return SUCCESS

    def cuEventRecord(self, event: Any, stream: Any) -> int:
        e, s = (x.value if isinstance(x, ctypes.c_void_p) else x for x in (event, stream))
        self.calls.append(("cuEventRecord", None))
        if e not in self.events or s not in self.streams:
            return INVALID_VALUE
        self.events[e] = s
        return SUCCESS

    def cuEventSynchronize(self, event: Any) -> int:
        e = event.value if isinstance(event, ctypes.c_void_p) else event
        self.calls.append(("cuEventSynchronize", None))
        return SUCCESS if e in self.events else INVALID_VALUE

    def cuEventDestroy_v2(self, event: Any) -> int:
        e = event.value if isinstance(event, ctypes.c_void_p) else event
        if e not in self.events:
            return INVALID_VALUE
        del self.events[e]
        return SUCCESS

    def cuStreamSynchronize(self, stream: Any) -> int:
        s = stream.value if isinstance(stream, ctypes.c_void_p) else stream
        self.calls.append(("cuStreamSynchronize", None))
        return SUCCESS if s in self.streams else INVALID_VALUE

    def cuStreamDestroy_v2(self, stream: Any) -> int:
        s = stream.value if isinstance(stream, ctypes.c_void_p) else stream
        if s not in self.streams:
            return INVALID_VALUE
        self.streams.discard(s)
        return SUCCESS

    def cuMemcpyHtoDAsync_v2(self, dst: int, src: int, count: int, stream: Any) -> int:
        if rc := self._fault("cuMemcpyHtoDAsync_v2", None):
            return rc
        where = self._resolve(dst, count)
        if where is None or self.access.get(where[2]) != 3:
            return INVALID_VALUE  # unmapped, or mapped without write access
        mem, off, _ = where
        mem[off : off + count] = ctypes.string_at(src, count)
        self.h2d_copies.append((dst, count, stream.value if isinstance(stream, ctypes.c_void_p) else stream))
        return SUCCESS

    def cuMemcpyDtoH_v2(self, dst: Any, src: int, count: int) -> int:
        if rc := self._fault("cuMemcpyDtoH_v2", None):
            return rc
        where = self._resolve(src, count)
        if where is None or self.access.get(where[2]) not in (1, 3):
            return INVALID_VALUE
        mem, off, _ = where
        ctypes.memmove(dst, bytes(mem[off : off + count]), count)
        return SUCCESS

    def cuMemGetInfo_v2(self, free: Any, total: Any) -> int:
        total[0] = self.gpus[0].total_memory_bytes if self.gpus else 0
        free[0] = total[0] - sum(self.allocations.values())
        return SUCCESS


@dataclass
class _NvmlProc:
    pid: int
    usedGpuMemory: int | None  # noqa: N815 - pynvml's field name


@dataclass
class _NvmlMem:
    total: int


class FakeNvmlError(Exception):
    pass


class FakeNvml:
    """A stand-in for the ``pynvml`` module: GPUs, driver, per-process memory.

    ``used`` maps GPU UUID -> {pid: bytes or None}. ``broken=True`` makes
    ``nvmlInit`` fail as on a host without the NVIDIA driver.
    """

    def __init__(
        self,
        gpus: Iterable[FakeGpu] = (),
        *,
        driver_version: str = "580.65.06",
        cuda_version: int = 13000,
        used: dict[str, dict[int, int | None]] | None = None,
        broken: bool = False,
        bytes_strings: bool = False,
    ) -> None:
        self.gpus = list(gpus)
        self.driver_version = driver_version
        self.cuda_version = cuda_version
        self.used = used or {}
        self.broken = broken
        self.bytes_strings = bytes_strings  # old pynvml returned bytes
        self.active = 0

    def _s(self, text: str) -> str | bytes:
        return text.encode() if self.bytes_strings else text

    def nvmlInit(self) -> None:
        if self.broken:
            raise FakeNvmlError("NVML Shared Library Not Found")
        self.active += 1

    def nvmlShutdown(self) -> None:
        self.active -= 1

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self._s(self.driver_version)

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return self.cuda_version

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeGpu:
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str | bytes:
        return self._s(h.uuid)

    def nvmlDeviceGetName(self, h: FakeGpu) -> str | bytes:
        return self._s(h.name)

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> _NvmlMem:
        return _NvmlMem(h.total_memory_bytes)

    def nvmlDeviceGetMinorNumber(self, h: FakeGpu) -> int:
        return self.gpus.index(h)

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeGpu) -> list[_NvmlProc]:
        return [_NvmlProc(pid, b) for pid, b in self.used.get(h.uuid, {}).items()]
