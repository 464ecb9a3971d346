"""A GPU virtual address range whose physical memory can be dropped and re-made.

For use inside a worker: keep the KV cache (or any large, recomputable buffer)
in a :class:`ReservedRegion`; before a checkpoint call :meth:`~ReservedRegion.release`
so the CUDA checkpoint has less device memory to copy; after restore call
:meth:`~ReservedRegion.map` and the buffer is back at the *same* address, so
pointers captured elsewhere (CUDA graphs, kernels' arguments) stay valid. Its
contents are not kept.

Context: the VMM calls need a current CUDA context on the calling thread. The
region retains the device's *primary* context (``cuDevicePrimaryCtxRetain``),
which is the one PyTorch's runtime uses, and makes it current around each
call, so it works whether or not torch has touched CUDA yet on this thread.
Tensors from :meth:`ReservedRegion.as_tensor` alias the mapped memory and
must not be used after :meth:`ReservedRegion.release` (their storage is gone
until the next :meth:`ReservedRegion.map`).

Export: ``handle_type=HandleType.POSIX_FILE_DESCRIPTOR`` makes the physical
memory exportable as a file descriptor (:meth:`ReservedRegion.export_fd`), for
sharing with another process. The CUDA checkpoint does not support IPC memory
(driver 570 notes), so release such memory before checkpointing.
"""

from __future__ import annotations

import ctypes
import math
import enum
import threading
from typing import Any

from warmstart.errors import GpuError, UsageError
from warmstart.gpu.driver import CudaDriver, load_driver


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", CUmemAllocFlags),
    ]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


CU_MEM_ALLOCATION_TYPE_PINNED = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3
CU_MEM_ALLOC_GRANULARITY_MINIMUM = 0
CU_MEM_ALLOC_GRANULARITY_RECOMMENDED = 1


class HandleType(enum.IntEnum):
    """``CUmemAllocationHandleType`` values that make sense on Linux."""

    NONE = 0
    POSIX_FILE_DESCRIPTOR = 1


def round_up(size: int, granularity: int) -> int:
    return -(-size // granularity) * granularity


class _CudaArray:
    """A bare ``__cuda_array_interface__`` so torch can alias raw device memory."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (address, False),
            "strides": None,
            "version": 2,
        }


class ReservedRegion:
    """``size`` bytes of GPU virtual address space on ``device`` (a CUDA ordinal).

    The size is rounded up to the allocation granularity. ``map=True`` backs it
    with physical memory at once.
    """

    def __init__(
        self,
        size: int,
        device: int = 0,
        *,
        map: bool = True,  # noqa: A002 - the natural name
        handle_type: HandleType = HandleType.NONE,
        driver: CudaDriver | None = None,
    ) -> None:
        if size <= 0:
            raise UsageError(f"a region needs a positive size, got {size}")
        self._drv = driver if driver is not None else load_driver(require_checkpoint=False)
        self._lock = threading.RLock()
        self.device = device
        self.handle_type = HandleType(handle_type)
        self._handle: int | None = None
        self._closed = False
        self._generation = 0

        self._drv.ensure_init()
        dev = ctypes.c_int()
        self._drv.call("cuDeviceGet", ctypes.pointer(dev), device)
        self._dev = dev.value
        ctx = ctypes.c_void_p()
        self._drv.call("cuDevicePrimaryCtxRetain", ctypes.pointer(ctx), self._dev)
        self._ctx = ctx
        self._prop = CUmemAllocationProp(
            type=CU_MEM_ALLOCATION_TYPE_PINNED,
            requestedHandleTypes=int(self.handle_type),
            location=CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self._dev),
        )
        try:
            self._current()
            gran = ctypes.c_size_t()
            self._drv.call(
                "cuMemGetAllocationGranularity",
                ctypes.pointer(gran),
                ctypes.pointer(self._prop),
                CU_MEM_ALLOC_GRANULARITY_RECOMMENDED,
            )
            self.granularity = int(gran.value) or 2 << 20
            self.size = round_up(size, self.granularity)
            addr = ctypes.c_uint64()
            self._drv.call(
                "cuMemAddressReserve", ctypes.pointer(addr), self.size, self.granularity, 0, 0
            )
            self.address: int = int(addr.value)
        except BaseException:
            self._drv.call("cuDevicePrimaryCtxRelease_v2", self._dev)
            raise
        if map:
            try:
                self.map()
            except BaseException:
                self.close()
                raise

    # -- state

    @property
    def is_mapped(self) -> bool:
        return self._handle is not None

    @property
    def generation(self) -> int:
        """How many times physical memory has been mapped (tensor views of an
        older generation are stale)."""
        return self._generation

    def _current(self) -> None:
        self._drv.call("cuCtxSetCurrent", self._ctx)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError("the GPU memory region is closed")

    # -- physical memory

    def map(self) -> None:
        """Create physical memory and map it at :attr:`address` (no-op if mapped)."""
        with self._lock:
            self._check_open()
            if self._handle is not None:
                return
            self._current()
            handle = ctypes.c_uint64()
            self._drv.call(
                "cuMemCreate", ctypes.pointer(handle), self.size, ctypes.pointer(self._prop), 0
            )
            mapped = False
            try:
                self._drv.call("cuMemMap", self.address, self.size, 0, handle.value, 0)
                mapped = True
                access = CUmemAccessDesc(
                    CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, self._dev),
                    CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
                )
                self._drv.call("cuMemSetAccess", self.address, self.size,
                                ctypes.pointer(access), 1)
            except BaseException:
                if mapped:
                    self._drv.call("cuMemUnmap", self.address, self.size)
                self._drv.call("cuMemRelease", handle.value)
                raise
            self._handle = int(handle.value)
            self._generation += 1

    def release(self) -> None:
        """Wait for the GPU, unmap and free the physical memory; keep the address
        range reserved (no-op if not mapped)."""
        with self._lock:
            if self._handle is None:
                return
            self._current()
            self._drv.call("cuCtxSynchronize")
            self._drv.call("cuMemUnmap", self.address, self.size)
            handle, self._handle = self._handle, None
            self._drv.call("cuMemRelease", handle)

    def close(self) -> None:
        """Release the memory, free the address range and the context reference."""
        with self._lock:
            if self._closed:
                return
            try:
                self.release()
                self._current()
                self._drv.call("cuMemAddressFree", self.address, self.size)
            finally:
                self._closed = True
                self._drv.call("cuDevicePrimaryCtxRelease_v2", self._dev)

    def __enter__(self) -> ReservedRegion:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- access

    def fill(self, value: int) -> None:
        """Set every byte to ``value`` (cuMemsetD8), then wait for it."""
        with self._lock:
            self._require_mapped()
            self._current()
            self._drv.call("cuMemsetD8_v2", self.address, value & 0xFF, self.size)
            self._drv.call("cuCtxSynchronize")

    def export_fd(self) -> int:
        """A new file descriptor for the physical memory (POSIX_FILE_DESCRIPTOR only)."""
        with self._lock:
            self._require_mapped()
            if self.handle_type is not HandleType.POSIX_FILE_DESCRIPTOR:
                raise UsageError(
                    "this region's memory is not exportable",
                    hint="create it with handle_type=HandleType.POSIX_FILE_DESCRIPTOR",
                )
            fd = ctypes.c_int(-1)
            self._drv.call(
                "cuMemExportToShareableHandle", ctypes.pointer(fd), self._handle,
                int(HandleType.POSIX_FILE_DESCRIPTOR), 0,
            )
            return fd.value

    def as_tensor(self, dtype: Any = None, shape: tuple[int, ...] | None = None) -> Any:
        """A torch tensor aliasing the mapped memory (``uint8`` of :attr:`size`
        bytes by default, else viewed as ``dtype`` and reshaped to ``shape``)."""
        import torch  # lazily: torch is optional

        with self._lock:
            self._require_mapped()
            t = torch.as_tensor(
                _CudaArray(self.address, self.size), device=torch.device("cuda", self.device)
            )
        if t.data_ptr() != self.address:
            raise GpuError("torch did not alias the region's memory")
        if dtype is not None:
            t = t.view(dtype)
        if shape is not None:
            # The region is rounded up to the allocation granularity: a shape
            # may cover less than all of it (never more).
            count = math.prod(shape)
            if count > t.numel():
                raise GpuError(
                    f"shape {tuple(shape)} needs {count} elements; the region holds {t.numel()}"
                )
            t = t[:count].view(shape)
        return t

    def _require_mapped(self) -> None:
        self._check_open()
        if self._handle is None:
            raise UsageError(
                "the GPU memory region is released", hint="call map() before using it"
            )

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("mapped" if self.is_mapped else "released")
        where = f"{self.address:#x} on cuda:{self.device}"
        return f"<ReservedRegion {self.size} bytes at {where}, {state}>"
