"""ctypes binding of the CUDA driver's process checkpoint API (``libcuda.so.1``).

The checkpoint functions act on *another* process, named by pid, and need no
CUDA context in the calling process. Device discovery (``cuDevice*``) needs
``cuInit``, which opens the driver's device files but creates no context; it is
done lazily, only when a discovery method is first used, and before a restore
(the CUDA docs: "CUDA process restore requires persistence mode to be enabled
or cuInit to have been called before execution").

Argument structures, as in ``cuda.h`` (all four ``*Args`` are 64 bytes; every
reserved byte must be zero):

* CUDA 12.8 (driver 570) introduced ``cuCheckpointProcess{Lock,Checkpoint,
  Restore,Unlock,GetState,GetRestoreThreadId}``. ``CUcheckpointLockArgs`` is
  ``{unsigned timeoutMs; unsigned reserved0; cuuint64_t reserved1[7];}``;
  checkpoint/unlock args are ``cuuint64_t reserved[8]``.
* Up to CUDA 12.9, ``CUcheckpointRestoreArgs`` is ``cuuint64_t reserved[8]``:
  no GPU remapping.
* CUDA 13.0 (driver 580) added ``CUcheckpointGpuPair {CUuuid oldUuid; CUuuid
  newUuid;}`` and ``CUcheckpointRestoreArgs {CUcheckpointGpuPair *gpuPairs;
  unsigned gpuPairsCount; char reserved[44]; cuuint64_t reserved1;}``. Later
  headers re-spell the tail (13.3: ``char reserved[52]``; 13.4 preview: a
  ``padding0`` then a ``customStorageInfo_out`` pointer at offset 16, NULL
  meaning "restore from host") but keep ``gpuPairs`` at offset 0,
  ``gpuPairsCount`` at offset 8 and the size at 64, so the zero-filled layout
  below is valid for all of them. If pairs are given they must cover every GPU
  the process had checkpointed, and each target must be the same chip type.
"""

from __future__ import annotations

import ctypes
import enum
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from warmstart.errors import GpuError, NoGpuDriver, UsageError

# --------------------------------------------------------------------------- structs


class CUuuid(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class CUcheckpointLockArgs(ctypes.Structure):
    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CUcheckpointCheckpointArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


class CUcheckpointGpuPair(ctypes.Structure):
    _fields_ = [("oldUuid", CUuuid), ("newUuid", CUuuid)]


class CUcheckpointRestoreArgs(ctypes.Structure):
    _fields_ = [
        ("gpuPairs", ctypes.POINTER(CUcheckpointGpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * 52),
    ]


class CUcheckpointUnlockArgs(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_uint64 * 8)]


# --------------------------------------------------------------------------- constants


class ProcessState(enum.IntEnum):
    """``CUprocessState``: where a process is in the checkpoint cycle."""

    RUNNING = 0
    LOCKED = 1
    CHECKPOINTED = 2
    FAILED = 3


#: Names for the CUresult codes we meet, used when ``cuGetErrorName`` cannot help.
_ERROR_NAMES: dict[int, str] = {
    1: "CUDA_ERROR_INVALID_VALUE",
    2: "CUDA_ERROR_OUT_OF_MEMORY",
    3: "CUDA_ERROR_NOT_INITIALIZED",
    4: "CUDA_ERROR_DEINITIALIZED",
    34: "CUDA_ERROR_STUB_LIBRARY",
    100: "CUDA_ERROR_NO_DEVICE",
    101: "CUDA_ERROR_INVALID_DEVICE",
    201: "CUDA_ERROR_INVALID_CONTEXT",
    304: "CUDA_ERROR_OPERATING_SYSTEM",
    401: "CUDA_ERROR_ILLEGAL_STATE",
    500: "CUDA_ERROR_NOT_FOUND",
    600: "CUDA_ERROR_NOT_READY",
    800: "CUDA_ERROR_NOT_PERMITTED",
    801: "CUDA_ERROR_NOT_SUPPORTED",
    909: "CUDA_ERROR_TIMEOUT",
    999: "CUDA_ERROR_UNKNOWN",
}

_HINTS: dict[str, str] = {
    "CUDA_ERROR_NOT_SUPPORTED": "the driver cannot checkpoint this process "
    "(UVM/managed or IPC memory, or an unsupported GPU/driver); see `warmstart doctor`",
    "CUDA_ERROR_TIMEOUT": "the process did not reach a lockable point in time; "
    "let in-flight GPU work finish or raise the lock timeout",
    "CUDA_ERROR_ILLEGAL_STATE": "the process is not in the state this step needs "
    "(RUNNING → LOCKED → CHECKPOINTED → LOCKED → RUNNING)",
    "CUDA_ERROR_NOT_INITIALIZED": "the process has not initialised CUDA",
    "CUDA_ERROR_NOT_PERMITTED": "checkpointing another process needs root "
    "(or the same user with ptrace rights)",
    "CUDA_ERROR_OUT_OF_MEMORY": "the target GPU lacks the memory to restore this process",
    "CUDA_ERROR_INVALID_DEVICE": "a GPU in the restore mapping is unknown or not the same chip",
    "CUDA_ERROR_NO_DEVICE": "no usable NVIDIA GPU is visible",
}

#: Symbols the checkpoint API needs (driver >= 570 / CUDA 12.8).
CHECKPOINT_SYMBOLS: tuple[str, ...] = (
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessGetRestoreThreadId",
)

_P = ctypes.POINTER
_int_p = _P(ctypes.c_int)
_uint_p = _P(ctypes.c_uint)

#: name -> argtypes; every function returns CUresult (int).
SIGNATURES: dict[str, list[Any]] = {
    "cuInit": [ctypes.c_uint],
    "cuDriverGetVersion": [_int_p],
    "cuGetErrorName": [ctypes.c_int, _P(ctypes.c_char_p)],
    "cuGetErrorString": [ctypes.c_int, _P(ctypes.c_char_p)],
    "cuDeviceGetCount": [_int_p],
    "cuDeviceGet": [_int_p, ctypes.c_int],
    "cuDeviceGetName": [ctypes.c_char_p, ctypes.c_int, ctypes.c_int],
    "cuDeviceGetUuid_v2": [_P(CUuuid), ctypes.c_int],
    "cuDeviceGetUuid": [_P(CUuuid), ctypes.c_int],
    "cuDeviceTotalMem_v2": [_P(ctypes.c_size_t), ctypes.c_int],
    "cuCheckpointProcessLock": [ctypes.c_int, _P(CUcheckpointLockArgs)],
    "cuCheckpointProcessCheckpoint": [ctypes.c_int, _P(CUcheckpointCheckpointArgs)],
    "cuCheckpointProcessRestore": [ctypes.c_int, _P(CUcheckpointRestoreArgs)],
    "cuCheckpointProcessUnlock": [ctypes.c_int, _P(CUcheckpointUnlockArgs)],
    "cuCheckpointProcessGetState": [ctypes.c_int, _int_p],
    "cuCheckpointProcessGetRestoreThreadId": [ctypes.c_int, _int_p],
    # context and virtual memory management (used by warmstart.gpu.vmm)
    "cuCtxGetCurrent": [_P(ctypes.c_void_p)],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuCtxSynchronize": [],
    "cuDevicePrimaryCtxRetain": [_P(ctypes.c_void_p), ctypes.c_int],
    "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
    "cuMemGetAllocationGranularity": [_P(ctypes.c_size_t), ctypes.c_void_p, ctypes.c_int],
    "cuMemAddressReserve": [
        _P(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64
    ],
    "cuMemAddressFree": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemCreate": [_P(ctypes.c_uint64), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_uint64],
    "cuMemRelease": [ctypes.c_uint64],
    "cuMemMap": [
        ctypes.c_uint64, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64
    ],
    "cuMemUnmap": [ctypes.c_uint64, ctypes.c_size_t],
    "cuMemSetAccess": [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t],
    "cuMemExportToShareableHandle": [
        ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64
    ],
    "cuMemsetD8_v2": [ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t],
    # sharing VMM memory between processes and filling it (used by warmstart.gms)
    # cuMemImportFromShareableHandle(CUmemGenericAllocationHandle*, void* osHandle, type):
    # for POSIX_FILE_DESCRIPTOR, osHandle is the fd's value cast to a pointer.
    "cuMemImportFromShareableHandle": [_P(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_int],
    "cuMemHostAlloc": [_P(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint],
    "cuMemFreeHost": [ctypes.c_void_p],
    "cuMemcpyHtoDAsync_v2": [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p],
    "cuMemcpyDtoH_v2": [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t],
    "cuMemGetInfo_v2": [_P(ctypes.c_size_t), _P(ctypes.c_size_t)],
    "cuStreamCreate": [_P(ctypes.c_void_p), ctypes.c_uint],
    "cuStreamSynchronize": [ctypes.c_void_p],
    "cuStreamDestroy_v2": [ctypes.c_void_p],
    "cuEventCreate": [_P(ctypes.c_void_p), ctypes.c_uint],
    "cuEventRecord": [ctypes.c_void_p, ctypes.c_void_p],
    "cuEventSynchronize": [ctypes.c_void_p],
    "cuEventDestroy_v2": [ctypes.c_void_p],
    # plain allocations and copies (used by warmstart.gpu.bandwidth)
    "cuMemAlloc_v2": [_P(ctypes.c_uint64), ctypes.c_size_t],
    "cuMemFree_v2": [ctypes.c_uint64],
    "cuMemcpyHtoD_v2": [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t],
}

#: The minimum for the checkpoint API, as cuDriverGetVersion reports it.
MIN_CHECKPOINT_API = 12080
#: GPU UUID pairs in CUcheckpointRestoreArgs appear with CUDA 13.0 (driver 580).
MIN_REMAP_API = 13000

_NO_DRIVER_MSG = "no NVIDIA driver with checkpoint support found (need ≥ 570)"
_NO_DRIVER_HINT = (
    "install NVIDIA driver 570 or newer (580+ to restore onto a different GPU) "
    "and make libcuda.so.1 loadable"
)

# --------------------------------------------------------------------------- UUIDs

_UUID_RE = re.compile(
    r"^(?:GPU-)?([0-9a-f]{8})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{4})-?([0-9a-f]{12})$",
    re.IGNORECASE,
)


def uuid_to_str(raw: bytes) -> str:
    """16 raw bytes -> ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` (nvidia-smi form)."""
    if len(raw) != 16:
        raise ValueError(f"a GPU UUID has 16 bytes, got {len(raw)}")
    h = raw.hex()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_uuid(text: str) -> bytes:
    """``GPU-…`` (or the bare hex form) -> 16 raw bytes; UsageError when malformed."""
    m = _UUID_RE.match(text.strip())
    if not m:
        raise UsageError(
            f"not a GPU UUID: {text!r}",
            hint="use the form GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (see nvidia-smi -L)",
        )
    return bytes.fromhex("".join(m.groups()))


def normalize_uuid(text: str) -> str:
    """Canonical lower-case ``GPU-…`` spelling of a UUID."""
    return uuid_to_str(parse_uuid(text))


def format_cuda_version(version: int) -> str:
    """13000 -> "13.0", 12080 -> "12.8"."""
    return f"{version // 1000}.{(version % 1000) // 10}"


# --------------------------------------------------------------------------- errors


class CudaCallError(GpuError):
    """A CUDA driver call returned a CUresult other than CUDA_SUCCESS."""

    def __init__(
        self,
        *,
        call: str,
        code: int,
        name: str,
        description: str,
        pid: int | None = None,
    ) -> None:
        target = f" on pid {pid}" if pid is not None else ""
        super().__init__(
            f"{call}{target} failed: {name} ({description})",
            hint=_HINTS.get(name) if call.startswith("cuCheckpoint") else None,  # hints about checkpoints
        )
        self.call = call
        self.code = code
        self.name = name
        self.description = description
        self.pid = pid


@dataclass(frozen=True)
class CudaDevice:
    """One GPU as the CUDA driver numbers it (CUDA order, after CUDA_VISIBLE_DEVICES)."""

    index: int
    uuid: str
    name: str
    total_memory_bytes: int


# --------------------------------------------------------------------------- driver


class CudaDriver:
    """The checkpoint API over a function table.

    ``lib`` is anything whose attributes are the C functions by name: a
    ``ctypes.CDLL`` prepared by :func:`load_driver`, or a fake in tests. Each
    function is called with plain ints and ``ctypes.pointer(...)`` arguments
    and must return an int CUresult.
    """

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self._init_lock = threading.Lock()
        self._initialized = False

    # -- plumbing

    def _fn(self, name: str) -> Callable[..., int]:
        fn = getattr(self._lib, name, None)
        if fn is None:
            raise NoGpuDriver(f"the CUDA driver lacks {name}", hint=_NO_DRIVER_HINT)
        return fn

    def has(self, name: str) -> bool:
        """Whether the driver exports ``name``."""
        return getattr(self._lib, name, None) is not None

    def call(self, name: str, *args: Any, pid: int | None = None) -> None:
        rc = int(self._fn(name)(*args))
        if rc != 0:
            raise CudaCallError(
                call=name,
                code=rc,
                name=self.error_name(rc),
                description=self.error_string(rc),
                pid=pid,
            )

    def error_name(self, code: int) -> str:
        """``cuGetErrorName``, falling back to a built-in table."""
        out = ctypes.c_char_p()
        fn = getattr(self._lib, "cuGetErrorName", None)
        if fn is not None and int(fn(code, ctypes.pointer(out))) == 0 and out.value:
            return out.value.decode(errors="replace")
        return _ERROR_NAMES.get(code, f"CUresult {code}")

    def error_string(self, code: int) -> str:
        """``cuGetErrorString``; "unknown error" when the driver has none."""
        out = ctypes.c_char_p()
        fn = getattr(self._lib, "cuGetErrorString", None)
        if fn is not None and int(fn(code, ctypes.pointer(out))) == 0 and out.value:
            return out.value.decode(errors="replace")
        return "unknown error"

    @staticmethod
    def _check_pid(pid: int) -> int:
        if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
            raise UsageError(f"not a process id: {pid!r}")
        return pid

    def ensure_init(self) -> None:
        """``cuInit(0)`` once. Opens the driver, creates no context."""
        with self._init_lock:
            if not self._initialized:
                self.call("cuInit", 0)
                self._initialized = True

    # -- versions

    def version(self) -> int:
        """CUDA driver API version, e.g. 13000 for CUDA 13.0 (no cuInit needed)."""
        v = ctypes.c_int()
        self.call("cuDriverGetVersion", ctypes.pointer(v))
        return v.value

    def supports_remap(self) -> bool:
        """Whether restore accepts GPU pairs (CUDA API >= 13.0, driver >= 580)."""
        return self.version() >= MIN_REMAP_API

    # -- checkpoint API

    def lock(self, pid: int, timeout_ms: int = 0) -> None:
        """Lock ``pid``: block its CUDA API calls and wait for submitted work.

        ``timeout_ms`` 0 means wait without limit; otherwise CUDA_ERROR_TIMEOUT
        after that many milliseconds.
        """
        pid = self._check_pid(pid)
        if timeout_ms < 0 or timeout_ms > 0xFFFFFFFF:
            raise UsageError(f"lock timeout out of range: {timeout_ms} ms")
        args = CUcheckpointLockArgs(timeoutMs=int(timeout_ms))
        self.call("cuCheckpointProcessLock", pid, ctypes.pointer(args), pid=pid)

    def checkpoint(self, pid: int) -> None:
        """Copy ``pid``'s device memory to host and release its GPU (must be LOCKED)."""
        pid = self._check_pid(pid)
        args = CUcheckpointCheckpointArgs()
        self.call("cuCheckpointProcessCheckpoint", pid, ctypes.pointer(args), pid=pid)

    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None:
        """Re-acquire GPUs for a CHECKPOINTED ``pid``; it is LOCKED afterwards.

        ``gpu_pairs`` maps (old UUID, new UUID); if given it must name every GPU
        the process had. Empty means "the same GPUs" (and works on drivers
        without remap support).
        """
        pid = self._check_pid(pid)
        args = CUcheckpointRestoreArgs()
        pairs_arr = None
        if gpu_pairs:
            pairs_arr = (CUcheckpointGpuPair * len(gpu_pairs))()
            for i, (old, new) in enumerate(gpu_pairs):
                pairs_arr[i].oldUuid.bytes[:] = parse_uuid(old)
                pairs_arr[i].newUuid.bytes[:] = parse_uuid(new)
            args.gpuPairs = ctypes.cast(pairs_arr, ctypes.POINTER(CUcheckpointGpuPair))
            args.gpuPairsCount = len(gpu_pairs)
        self.ensure_init()
        self.call("cuCheckpointProcessRestore", pid, ctypes.pointer(args), pid=pid)
        del pairs_arr  # kept alive across the call above

    def unlock(self, pid: int) -> None:
        """Let a LOCKED ``pid`` call CUDA again; it is RUNNING afterwards."""
        pid = self._check_pid(pid)
        args = CUcheckpointUnlockArgs()
        self.call("cuCheckpointProcessUnlock", pid, ctypes.pointer(args), pid=pid)

    def state(self, pid: int) -> ProcessState:
        """``cuCheckpointProcessGetState``."""
        pid = self._check_pid(pid)
        out = ctypes.c_int(-1)
        self.call("cuCheckpointProcessGetState", pid, ctypes.pointer(out), pid=pid)
        try:
            return ProcessState(out.value)
        except ValueError:
            raise GpuError(
                f"cuCheckpointProcessGetState on pid {pid} returned unknown state {out.value}"
            ) from None

    def restore_thread_id(self, pid: int) -> int:
        """The tid of the driver thread that performs restore inside ``pid``.

        CRIU must not freeze that thread across a restore.
        """
        pid = self._check_pid(pid)
        out = ctypes.c_int(0)
        self.call(
            "cuCheckpointProcessGetRestoreThreadId", pid, ctypes.pointer(out), pid=pid
        )
        return out.value

    # -- discovery (lazy cuInit)

    def device_count(self) -> int:
        self.ensure_init()
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.pointer(n))
        return n.value

    def device(self, index: int) -> CudaDevice:
        self.ensure_init()
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.pointer(dev), index)
        name = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", name, len(name), dev.value)
        uuid = CUuuid()
        uuid_fn = "cuDeviceGetUuid_v2" if self.has("cuDeviceGetUuid_v2") else "cuDeviceGetUuid"
        self.call(uuid_fn, ctypes.pointer(uuid), dev.value)
        total = ctypes.c_size_t()
        self.call("cuDeviceTotalMem_v2", ctypes.pointer(total), dev.value)
        return CudaDevice(
            index=index,
            uuid=uuid_to_str(bytes(uuid.bytes)),
            name=name.value.decode(errors="replace"),
            total_memory_bytes=int(total.value),
        )

    def devices(self) -> list[CudaDevice]:
        return [self.device(i) for i in range(self.device_count())]


def _candidates(path: str | os.PathLike[str] | None) -> list[str]:
    if path is not None:
        return [os.fspath(path)]
    env = os.environ.get("WARMSTART_LIBCUDA")
    return [env] if env else ["libcuda.so.1", "libcuda.so"]


def load_driver(
    path: str | os.PathLike[str] | None = None, *, require_checkpoint: bool = True
) -> CudaDriver:
    """Open libcuda and check it has the checkpoint API.

    ``path`` (or ``$WARMSTART_LIBCUDA``) overrides the search for ``libcuda.so.1``.
    Raises :class:`NoGpuDriver` when the library cannot be loaded or (unless
    ``require_checkpoint`` is false, as for VMM use in a worker) predates the
    checkpoint API. Loading calls nothing in the driver.
    """
    lib = None
    errors: list[str] = []
    for cand in _candidates(path):
        try:
            lib = ctypes.CDLL(cand)
            break
        except OSError as exc:
            errors.append(f"{cand}: {exc}")
    if lib is None:
        raise NoGpuDriver(
            _NO_DRIVER_MSG, hint=f"{_NO_DRIVER_HINT} (could not load {'; '.join(errors)})"
        )
    for name, argtypes in SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            continue
        fn.argtypes = argtypes
        fn.restype = ctypes.c_int
    driver = CudaDriver(_SymbolTable(lib))
    if require_checkpoint:
        check_checkpoint_api(driver)
    return driver


def check_checkpoint_api(driver: CudaDriver) -> None:
    """Raise :class:`NoGpuDriver` unless ``driver`` exports the checkpoint API."""
    missing = [s for s in CHECKPOINT_SYMBOLS if not driver.has(s)]
    if missing:
        try:
            detail = f"driver reports CUDA {format_cuda_version(driver.version())}; "
        except GpuError:
            detail = ""
        raise NoGpuDriver(
            _NO_DRIVER_MSG,
            hint=f"{detail}missing {', '.join(missing)}; {_NO_DRIVER_HINT}",
        )


class _SymbolTable:
    """Wraps a CDLL so that an absent symbol reads as ``None`` instead of raising."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(self._lib, name)
        except AttributeError:
            return None
