"""Where the service's memory comes from, behind one small interface.

The service side (:class:`ServerBackend`) creates physical allocations,
exports each as a file descriptor, gives temporary write access for filling
and releases them, and can *park* an allocation's bytes in host memory it owns
(:meth:`ServerBackend.park`, a :class:`HostCopy`) and copy them back into a new
allocation later (:meth:`ServerBackend.unpark`); the worker side (:class:`ClientBackend`) reserves address
ranges, imports descriptors, maps them into its ranges, unmaps them (keeping
the range) and builds tensors over them.

Two implementations:

* CUDA VMM (`warmstart.gms.cuda`): ``cuMemCreate`` with POSIX-fd handles,
  ``cuMemExportToShareableHandle`` / ``cuMemImportFromShareableHandle``,
  ``cuMemMap`` into addresses from ``cuMemAddressReserve``;
* memfd (this module): the same lifecycle with host memory — ``memfd_create``
  for an allocation, the memfd itself as the exported handle, ``mmap(MAP_FIXED)``
  into a ``PROT_NONE`` reservation. It serves CPU workers and stands in for
  CUDA in tests: the kernel keeps a memfd's pages alive while any process
  maps it, as the driver keeps an imported allocation alive, so "the service
  died, the worker keeps its weights" behaves the same way.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from warmstart.errors import GpuError, UsageError
from warmstart.gms.layout import TensorSpec

#: safetensors dtype -> torch dtype name
TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn", "U16": "uint16", "U32": "uint32",
    "U64": "uint64",
}  # fmt: skip


def round_up(n: int, granularity: int) -> int:
    return max(granularity, -(-n // granularity) * granularity)


def has_bytes_for(host: HostCopy, size: int) -> bool:
    """Whether ``host`` has bytes to copy back into an allocation of ``size``;
    a copy that does not fit, or was freed already, is a caller's mistake."""
    if host.nbytes > size:
        raise UsageError(f"{host.nbytes} parked bytes do not fit an allocation of {size}")
    if host.nbytes and not host.address:
        raise UsageError("the host copy was freed already")
    return host.nbytes > 0


def torch_dtype(name: str) -> Any:
    import torch

    try:
        return getattr(torch, TORCH_DTYPES[name])
    except (KeyError, AttributeError):
        raise UsageError(f"tensors of dtype {name} are not supported by this torch") from None


class Lane(ABC):
    """One copy lane of the loader: two staging buffers and an in-order copy queue."""

    buffers: list[memoryview]

    @abstractmethod
    def submit(self, index: int, nbytes: int, target: int, offset: int) -> None:
        """Copy ``buffers[index][:nbytes]`` to ``offset`` of the fill target (may be async)."""

    @abstractmethod
    def sync(self) -> None:
        """Wait for every copy submitted on this lane."""

    @abstractmethod
    def close(self) -> None: ...

    def bind(self) -> None:
        """Make the calling thread able to drive this lane (a CUDA lane: its context)."""


@dataclass
class HostCopy:
    """Bytes of an allocation kept in host memory the service backend owns
    (CUDA: a pinned ``cuMemHostAlloc`` buffer; memfd: an anonymous mapping)."""

    #: start of the host buffer (0 when ``nbytes`` is 0 or once freed)
    address: int
    nbytes: int


class ServerBackend(ABC):
    kind: str
    device: int
    granularity: int

    @abstractmethod
    def create(self, size: int) -> int:
        """A new physical allocation of ``size`` bytes (a multiple of the granularity)."""

    @abstractmethod
    def export(self, handle: int) -> int:
        """A new file descriptor for the allocation (the caller closes it)."""

    @abstractmethod
    def release(self, handle: int) -> None:
        """Drop the service's reference; importers keep theirs."""

    @abstractmethod
    def open_fill(self, handle: int, size: int) -> int:
        """Make the allocation writable for filling; returns the target for :meth:`Lane.submit`."""

    @abstractmethod
    def close_fill(self, target: int, size: int) -> None:
        """Wait for the copies and drop the temporary write access."""

    @abstractmethod
    def lane(self, chunk: int) -> Lane:
        """A copy lane with two staging buffers of ``chunk`` bytes; the thread that
        drives it calls :meth:`Lane.bind` first."""

    @abstractmethod
    def park(self, handle: int, size: int, nbytes: int) -> HostCopy:
        """Copy the first ``nbytes`` of the allocation (``size`` bytes) into host
        memory this backend owns; the allocation itself is left as it is."""

    @abstractmethod
    def unpark(self, host: HostCopy, handle: int, size: int) -> None:
        """Copy ``host``'s bytes to the start of the allocation (``size`` bytes);
        ``host`` stays the caller's to free."""

    @abstractmethod
    def free_host(self, host: HostCopy) -> None:
        """Free the host memory of a :meth:`park` copy (a second call does nothing)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class ClientBackend(ABC):
    kind: str
    device: int
    granularity: int

    @abstractmethod
    def reserve(self, size: int) -> int: ...

    @abstractmethod
    def free(self, address: int, size: int) -> None: ...

    @abstractmethod
    def import_fd(self, fd: int) -> int:
        """A local handle for the exported allocation (``fd`` stays the caller's)."""

    @abstractmethod
    def map(self, address: int, size: int, handle: int, *, writable: bool) -> None: ...

    @abstractmethod
    def unmap(self, address: int, size: int) -> None:
        """Unmap, keeping the address range reserved."""

    @abstractmethod
    def release(self, handle: int) -> None: ...

    @abstractmethod
    def tensor(self, address: int, spec: TensorSpec) -> Any:
        """A torch tensor over ``spec.nbytes`` bytes at ``address``."""

    def synchronize(self) -> None:  # noqa: B027 - optional
        pass

    def close(self) -> None:  # noqa: B027 - optional
        pass


# --------------------------------------------------------------------------- memfd

_libc = None


def _c() -> Any:
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                             ctypes.c_int, ctypes.c_long]  # fmt: skip
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.munmap.restype = ctypes.c_int
        _libc = lib
    return _libc


_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_NORESERVE = 0x4000


def _mmap(addr: int | None, size: int, prot: int, flags: int, fd: int) -> int:
    out = _c().mmap(addr, size, prot, flags, fd, 0)
    if out is None or out == _MAP_FAILED:
        err = ctypes.get_errno()
        raise GpuError(f"mmap of {size} bytes failed: {os.strerror(err)}")
    return int(out)


def _view(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class MemfdServer(ServerBackend):
    kind = "memfd"

    def __init__(self, granularity: int = 2 << 20) -> None:
        self.device = -1
        self.granularity = granularity

    def create(self, size: int) -> int:
        if size <= 0 or size % self.granularity:
            raise UsageError(f"allocation size {size} is not a multiple of {self.granularity}")
        fd = os.memfd_create("warmstart-gms", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            raise
        return fd

    def export(self, handle: int) -> int:
        return os.dup(handle)

    def release(self, handle: int) -> None:
        os.close(handle)

    def open_fill(self, handle: int, size: int) -> int:
        return handle

    def close_fill(self, target: int, size: int) -> None:
        pass

    def lane(self, chunk: int) -> Lane:
        return _MemfdLane(chunk)

    def park(self, handle: int, size: int, nbytes: int) -> HostCopy:
        if not 0 <= nbytes <= size:
            raise UsageError(f"cannot park {nbytes} bytes of an allocation of {size}")
        if nbytes == 0:
            return HostCopy(0, 0)
        address = _mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE,
                        mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1)  # fmt: skip
        view = _view(address, nbytes)
        try:
            done = 0
            while done < nbytes:
                n = os.preadv(handle, [view[done:]], done)
                if n <= 0:
                    raise GpuError(f"reading allocation {handle} for parking stopped at {done} of {nbytes} bytes")
                done += n
        except BaseException:
            view.release()
            _c().munmap(address, nbytes)
            raise
        view.release()
        return HostCopy(address, nbytes)

    def unpark(self, host: HostCopy, handle: int, size: int) -> None:
        if not has_bytes_for(host, size):
            return
        view = _view(host.address, host.nbytes)
        try:
            done = 0
            while done < host.nbytes:
                done += os.pwrite(handle, view[done:], done)
        finally:
            view.release()

    def free_host(self, host: HostCopy) -> None:
        if host.address:
            _c().munmap(host.address, host.nbytes)
            host.address = 0


class _MemfdLane(Lane):
    def __init__(self, chunk: int) -> None:
        self.buffers = [memoryview(bytearray(chunk)) for _ in range(2)]

    def submit(self, index: int, nbytes: int, target: int, offset: int) -> None:
        view = self.buffers[index][:nbytes]
        while view:
            n = os.pwrite(target, view, offset)
            view, offset = view[n:], offset + n

    def sync(self) -> None:
        pass

    def close(self) -> None:
        self.buffers = []


class MemfdClient(ClientBackend):
    kind = "memfd"

    def __init__(self, granularity: int = 2 << 20) -> None:
        self.device = -1
        self.granularity = granularity

    def reserve(self, size: int) -> int:
        return _mmap(None, size, _PROT_NONE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1)  # fmt: skip

    def free(self, address: int, size: int) -> None:
        _c().munmap(address, size)

    def import_fd(self, fd: int) -> int:
        return os.dup(fd)

    def map(self, address: int, size: int, handle: int, *, writable: bool) -> None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        _mmap(address, size, prot, mmap.MAP_SHARED | _MAP_FIXED, handle)

    def unmap(self, address: int, size: int) -> None:
        # Replace the mapping by an inaccessible anonymous one: the range stays ours.
        _mmap(address, size, _PROT_NONE,
              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE | _MAP_FIXED, -1)  # fmt: skip

    def release(self, handle: int) -> None:
        os.close(handle)

    def tensor(self, address: int, spec: TensorSpec) -> Any:
        import torch

        dtype = torch_dtype(spec.dtype)
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=dtype)
        buf = (ctypes.c_char * spec.nbytes).from_address(address)
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(spec.shape)
