"""CUDA VMM implementations of the GMS backends (ctypes on ``libcuda.so.1``).

Service side: ``cuMemCreate`` with ``requestedHandleTypes =
CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`` (without it the export fails),
``cuMemExportToShareableHandle`` writing an ``int`` fd. The service maps an
allocation only while it fills it: a temporary ``cuMemAddressReserve`` +
``cuMemMap`` + ``cuMemSetAccess`` (read-write), copies from pinned staging
buffers (``cuMemHostAlloc``) with ``cuMemcpyHtoDAsync_v2``, each lane on a
stream of its own or, with ``copy_streams``, all lanes on a few shared
streams (a lane then waits on an event of its own last copy), then ``cuMemUnmap`` and ``cuMemAddressFree``. It uses the device's primary
context, retained on first use (allocation and filling need a context; the
service runs no kernels).

Parking (the service's host tier): ``cuMemHostAlloc`` a pinned buffer of the
allocation's data size and ``cuMemcpyDtoH_v2`` into it through the same
temporary mapping; copying back queues ``cuMemcpyHtoDAsync_v2`` pieces of
:attr:`CudaServer.HOST_COPY_PIECE` bytes back to back on ONE stream and waits
once (``cuStreamSynchronize``): one stream of large copies from pinned memory
runs at the full host-to-device rate, several concurrent streams do not.

Worker side: ``cuMemImportFromShareableHandle(&handle, (void*)(uintptr_t)fd,
POSIX_FILE_DESCRIPTOR)`` (the driver does not take the fd; we close it after
the import), ``cuMemMap`` into ranges the worker reserved itself, access
read-only by default (``CU_MEM_ACCESS_FLAGS_PROT_READ``). Releasing the
imported handle and unmapping drops the worker's reference; the memory lives
while the service or any worker holds one, so workers keep serving when the
service dies.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from warmstart.errors import UsageError
from warmstart.gms.backend import (
    ClientBackend,
    HostCopy,
    Lane,
    ServerBackend,
    has_bytes_for,
    round_up,
    torch_dtype,
)
from warmstart.gms.layout import TensorSpec
from warmstart.gpu.driver import CudaDriver, load_driver
from warmstart.gpu.vmm import (
    CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
    CU_MEM_ALLOCATION_TYPE_PINNED,
    CU_MEM_LOCATION_TYPE_DEVICE,
    CUmemAccessDesc,
    CUmemAllocationProp,
    CUmemLocation,
    HandleType,
    _CudaArray,
)

CU_MEM_ACCESS_FLAGS_PROT_READ = 1
CU_STREAM_NON_BLOCKING = 1
CU_EVENT_DISABLE_TIMING = 2
POSIX_FD = int(HandleType.POSIX_FILE_DESCRIPTOR)

__all__ = ["CudaClient", "CudaServer", "round_up"]


class _Device:
    """The primary context of one device, made current on demand (per thread)."""

    def __init__(self, device: int, driver: CudaDriver | None) -> None:
        self.drv = driver if driver is not None else load_driver(require_checkpoint=False)
        self.drv.ensure_init()
        dev = ctypes.c_int()
        self.drv.call("cuDeviceGet", ctypes.pointer(dev), device)
        self.dev = dev.value
        self.device = device
        ctx = ctypes.c_void_p()
        self.drv.call("cuDevicePrimaryCtxRetain", ctypes.pointer(ctx), self.dev)
        self.ctx = ctx
        self._closed = False
        self.prop = CUmemAllocationProp(
            type=CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes=POSIX_FD,
            location=CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self.dev),
        )
        self.current()
        gran = ctypes.c_size_t()
        self.drv.call("cuMemGetAllocationGranularity", ctypes.pointer(gran),
                      ctypes.pointer(self.prop), CU_MEM_ALLOC_GRANULARITY_RECOMMENDED)  # fmt: skip
        self.granularity = int(gran.value) or 2 << 20

    def current(self) -> None:
        self.drv.call("cuCtxSetCurrent", self.ctx)

    def access(self, address: int, size: int, flags: int) -> None:
        desc = CUmemAccessDesc(CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self.dev), flags)
        self.drv.call("cuMemSetAccess", address, size, ctypes.pointer(desc), 1)

    def reserve(self, size: int) -> int:
        self.current()
        addr = ctypes.c_uint64()
        self.drv.call("cuMemAddressReserve", ctypes.pointer(addr), size, self.granularity, 0, 0)
        return int(addr.value)

    def free(self, address: int, size: int) -> None:
        self.current()
        self.drv.call("cuMemAddressFree", address, size)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.drv.call("cuDevicePrimaryCtxRelease_v2", self.dev)


class CudaServer(ServerBackend):
    kind = "cuda"

    #: idle lanes kept for the next fill (pinned buffers take a while to allocate)
    MAX_POOLED_LANES = 16
    #: bytes per cuMemcpyHtoDAsync_v2 when a parked allocation is copied back
    HOST_COPY_PIECE = 256 << 20

    def __init__(self, device: int = 0, driver: CudaDriver | None = None, *, copy_streams: int = 0) -> None:
        """``copy_streams``: 0 gives every lane a copy stream of its own; N > 0 shares
        N streams among all lanes, so copies queue on at most N copy engines."""
        if copy_streams < 0:
            raise ValueError(f"copy_streams must be >= 0, not {copy_streams}")
        self._d = _Device(device, driver)
        self.device = device
        self.granularity = self._d.granularity
        self.copy_streams = copy_streams
        self._shared: list[ctypes.c_void_p] = []
        self._next_shared = 0
        self._pool: list[_CudaLane] = []
        self._pool_lock = threading.Lock()

    @property
    def driver(self) -> CudaDriver:
        return self._d.drv

    def create(self, size: int) -> int:
        self._d.current()
        handle = ctypes.c_uint64()
        self._d.drv.call("cuMemCreate", ctypes.pointer(handle), size, ctypes.pointer(self._d.prop), 0)
        return int(handle.value)

    def export(self, handle: int) -> int:
        self._d.current()
        fd = ctypes.c_int(-1)
        self._d.drv.call("cuMemExportToShareableHandle", ctypes.pointer(fd), handle, POSIX_FD, 0)
        return int(fd.value)

    def release(self, handle: int) -> None:
        self._d.current()
        self._d.drv.call("cuMemRelease", handle)

    def open_fill(self, handle: int, size: int) -> int:
        address = self._d.reserve(size)
        mapped = False
        try:
            self._d.drv.call("cuMemMap", address, size, 0, handle, 0)
            mapped = True
            self._d.access(address, size, CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
        except BaseException:
            if mapped:
                self._d.drv.call("cuMemUnmap", address, size)
            self._d.free(address, size)
            raise
        return address

    def close_fill(self, target: int, size: int) -> None:
        self._d.current()
        try:
            self._d.drv.call("cuCtxSynchronize")
            self._d.drv.call("cuMemUnmap", target, size)
        finally:
            self._d.free(target, size)

    def lane(self, chunk: int) -> Lane:
        with self._pool_lock:
            for i, lane in enumerate(self._pool):
                if lane.chunk == chunk:
                    del self._pool[i]
                    self._d.current()  # this thread's driver calls need the context too
                    return lane
            stream = self._shared_stream()
        return _CudaLane(self._d, chunk, self._give_back, stream)

    def _shared_stream(self) -> ctypes.c_void_p | None:
        """The next of the shared copy streams, round robin (made on first use); None
        when every lane has a stream of its own. Called under the pool lock."""
        if not self.copy_streams:
            return None
        if len(self._shared) < self.copy_streams:
            self._d.current()
            stream = ctypes.c_void_p()
            self._d.drv.call("cuStreamCreate", ctypes.pointer(stream), CU_STREAM_NON_BLOCKING)
            self._shared.append(stream)
            return stream
        self._next_shared = (self._next_shared + 1) % len(self._shared)
        return self._shared[self._next_shared]

    def _give_back(self, lane: _CudaLane) -> bool:
        with self._pool_lock:
            if len(self._pool) < self.MAX_POOLED_LANES and not self._d._closed:
                self._pool.append(lane)
                return True
        return False

    def park(self, handle: int, size: int, nbytes: int) -> HostCopy:
        if not 0 <= nbytes <= size:
            raise UsageError(f"cannot park {nbytes} bytes of an allocation of {size}")
        host = HostCopy(0, nbytes)
        if nbytes == 0:
            return host
        self._d.current()
        p = ctypes.c_void_p()
        self._d.drv.call("cuMemHostAlloc", ctypes.pointer(p), nbytes, 0)
        host.address = int(p.value or 0)
        try:
            address = self.open_fill(handle, size)
            try:
                self._d.drv.call("cuMemcpyDtoH_v2", host.address, address, nbytes)
            finally:
                self.close_fill(address, size)
        except BaseException:
            self.free_host(host)
            raise
        return host

    def unpark(self, host: HostCopy, handle: int, size: int) -> None:
        if not has_bytes_for(host, size):
            return
        self._d.current()
        stream = ctypes.c_void_p()
        self._d.drv.call("cuStreamCreate", ctypes.pointer(stream), CU_STREAM_NON_BLOCKING)
        try:
            target = self.open_fill(handle, size)
            try:
                piece = self.HOST_COPY_PIECE
                for offset in range(0, host.nbytes, piece):
                    self._d.drv.call("cuMemcpyHtoDAsync_v2", target + offset, host.address + offset,
                                     min(piece, host.nbytes - offset), stream)  # fmt: skip
                self._d.drv.call("cuStreamSynchronize", stream)
            finally:
                self.close_fill(target, size)  # waits for whatever was queued before unmapping
        finally:
            self._d.drv.call("cuStreamDestroy_v2", stream)

    def free_host(self, host: HostCopy) -> None:
        if host.address:
            self._d.current()
            self._d.drv.call("cuMemFreeHost", host.address)
            host.address = 0

    def memory_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        self._d.current()
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self._d.drv.call("cuMemGetInfo_v2", ctypes.pointer(free), ctypes.pointer(total))
        return int(free.value), int(total.value)

    def read_back(self, handle: int, size: int, offset: int, nbytes: int) -> bytes:
        """Copy bytes out of an allocation (verification and tests)."""
        address = self.open_fill(handle, size)
        try:
            out = ctypes.create_string_buffer(nbytes)
            self._d.drv.call("cuMemcpyDtoH_v2", out, address + offset, nbytes)
            return out.raw
        finally:
            self.close_fill(address, size)

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, []
        for lane in pool:
            lane.destroy()
        if self._shared:
            self._d.current()
        for stream in self._shared:
            self._d.drv.call("cuStreamDestroy_v2", stream)
        self._shared = []
        self._d.close()


class _CudaLane(Lane):
    """Two pinned staging buffers and the stream their copies go on: the lane's own,
    or one shared with other lanes (then an event marks the lane's last copy)."""

    def __init__(self, d: _Device, chunk: int, give_back: Any = None, shared: ctypes.c_void_p | None = None) -> None:
        self._d = d
        self.chunk = chunk
        self._give_back = give_back
        d.current()
        self._ptrs: list[int] = []
        self.buffers = []
        self._own_stream = shared is None
        self._stream = ctypes.c_void_p()
        self._event = ctypes.c_void_p()
        try:
            if shared is None:
                d.drv.call("cuStreamCreate", ctypes.pointer(self._stream), CU_STREAM_NON_BLOCKING)
            else:
                self._stream = shared
                d.drv.call("cuEventCreate", ctypes.pointer(self._event), CU_EVENT_DISABLE_TIMING)
            for _ in range(2):
                p = ctypes.c_void_p()
                d.drv.call("cuMemHostAlloc", ctypes.pointer(p), chunk, 0)
                self._ptrs.append(int(p.value or 0))
                arr = (ctypes.c_char * chunk).from_address(int(p.value or 0))
                self.buffers.append(memoryview(arr).cast("B"))
        except BaseException:
            self.destroy()
            raise

    def bind(self) -> None:
        self._d.current()

    def submit(self, index: int, nbytes: int, target: int, offset: int) -> None:
        self._d.drv.call("cuMemcpyHtoDAsync_v2", target + offset, self._ptrs[index], nbytes,
                         self._stream)  # fmt: skip
        if self._event.value:
            self._d.drv.call("cuEventRecord", self._event, self._stream)

    def sync(self) -> None:
        """Wait for this lane's copies (on a shared stream: up to its last one)."""
        if self._event.value:  # an event never recorded is complete
            self._d.drv.call("cuEventSynchronize", self._event)
        else:
            self._d.drv.call("cuStreamSynchronize", self._stream)

    def close(self) -> None:
        """Back to the backend's pool once its copies are done (or freed)."""
        self._d.current()
        if self._stream.value:
            self.sync()
        if self._give_back is not None and self._stream.value and self._give_back(self):
            return
        self.destroy()

    def destroy(self) -> None:
        self._d.current()
        for v in self.buffers:
            v.release()
        self.buffers = []
        for p in self._ptrs:
            self._d.drv.call("cuMemFreeHost", p)
        self._ptrs = []
        if self._event.value:
            self._d.drv.call("cuEventDestroy_v2", self._event)
            self._event = ctypes.c_void_p()
        if self._stream.value and self._own_stream:
            self._d.drv.call("cuStreamDestroy_v2", self._stream)
        self._stream = ctypes.c_void_p()


class CudaClient(ClientBackend):
    kind = "cuda"

    def __init__(self, device: int = 0, driver: CudaDriver | None = None) -> None:
        self._d = _Device(device, driver)
        self.device = device
        self.granularity = self._d.granularity
        self._lock = threading.Lock()

    def reserve(self, size: int) -> int:
        return self._d.reserve(size)

    def free(self, address: int, size: int) -> None:
        self._d.free(address, size)

    def import_fd(self, fd: int) -> int:
        self._d.current()
        handle = ctypes.c_uint64()
        self._d.drv.call("cuMemImportFromShareableHandle", ctypes.pointer(handle),
                         ctypes.c_void_p(fd), POSIX_FD)  # fmt: skip
        return int(handle.value)

    def map(self, address: int, size: int, handle: int, *, writable: bool) -> None:
        self._d.current()
        self._d.drv.call("cuMemMap", address, size, 0, handle, 0)
        try:
            flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE if writable else CU_MEM_ACCESS_FLAGS_PROT_READ
            self._d.access(address, size, flags)
        except BaseException:
            self._d.drv.call("cuMemUnmap", address, size)
            raise

    def unmap(self, address: int, size: int) -> None:
        self._d.current()
        self._d.drv.call("cuMemUnmap", address, size)

    def release(self, handle: int) -> None:
        self._d.current()
        self._d.drv.call("cuMemRelease", handle)

    def synchronize(self) -> None:
        self._d.current()
        self._d.drv.call("cuCtxSynchronize")

    def tensor(self, address: int, spec: TensorSpec) -> Any:
        import torch

        dtype = torch_dtype(spec.dtype)
        dev = torch.device("cuda", self.device)
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=dtype, device=dev)
        t = torch.as_tensor(_CudaArray(address, spec.nbytes), device=dev)
        if t.data_ptr() != address:
            raise RuntimeError("torch did not alias the mapped weights")
        return t.view(dtype).view(spec.shape)

    def close(self) -> None:
        self._d.close()
