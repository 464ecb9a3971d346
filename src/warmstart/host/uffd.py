"""The userfaultfd ioctls a page server needs, through ctypes.

A userfaultfd created by ``criu restore --lazy-pages`` for a restored task is
handed to us over a unix socket; with it we place pages into that task's
address space (``UFFDIO_COPY``), map zero pages, and read its fault and
memory-layout events. ctypes releases the GIL around each ioctl, so several
threads can copy into one task at memory speed.
"""

from __future__ import annotations

import ctypes
import functools
import os
import struct
from dataclasses import dataclass

_UFFDIO = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_UFFDIO << 8) | nr


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("copy", ctypes.c_int64),
    ]


class _Zeropage(ctypes.Structure):
    _fields_ = [("range", _Range), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


UFFDIO_WAKE = _ioc(2, 0x02, ctypes.sizeof(_Range))
UFFDIO_COPY = _ioc(3, 0x03, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE = _ioc(3, 0x04, ctypes.sizeof(_Zeropage))

EVENT_PAGEFAULT = 0x12
EVENT_FORK = 0x13
EVENT_REMAP = 0x14
EVENT_REMOVE = 0x15
EVENT_UNMAP = 0x16
MSG_SIZE = 32
_SYS_USERFAULTFD = 323  # x86_64

@functools.cache
def _libc(keep_gil: bool = False) -> ctypes.CDLL:
    """libc with ``ioctl`` typed; ``keep_gil``: through ``PyDLL``, whose calls keep
    the GIL (see :func:`copy_small`)."""
    lib = (ctypes.PyDLL if keep_gil else ctypes.CDLL)(None, use_errno=True)
    lib.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
    lib.ioctl.restype = ctypes.c_int
    return lib


def _ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """0 on success, else the errno."""
    if _libc().ioctl(fd, request, ctypes.addressof(arg)) == 0:
        return 0
    return ctypes.get_errno()


def copy(fd: int, dst: int, src: int, length: int) -> tuple[int, int]:
    """UFFDIO_COPY ``length`` bytes from our ``src`` to the task's ``dst``.

    Returns (errno or 0, bytes copied). EEXIST means a page in the range is
    already present (copied up to it); ENOENT/ESRCH that the range or task is
    gone; EAGAIN that the task's layout is changing (retry).
    """
    arg = _Copy(dst=dst, src=src, len=length, mode=0, copy=0)
    err = _ioctl(fd, UFFDIO_COPY, arg)
    copied = arg.copy if arg.copy > 0 else 0
    if err == 0:
        copied = length
    return err, copied


def copy_small(fd: int, dst: int, src: int, length: int) -> tuple[int, int]:
    """:func:`copy` for a few pages, keeping the GIL across the ioctl.

    Copying a run of a few pages takes microseconds; giving the GIL away and
    winning it back from threads busy with big copies can take a millisecond.
    One thread filling thousands of small runs is starved that way."""
    arg = _Copy(dst=dst, src=src, len=length, mode=0, copy=0)
    if _libc(keep_gil=True).ioctl(fd, UFFDIO_COPY, ctypes.addressof(arg)) == 0:
        return 0, length
    return ctypes.get_errno(), arg.copy if arg.copy > 0 else 0


def zeropage(fd: int, start: int, length: int) -> int:
    arg = _Zeropage(range=_Range(start=start, len=length), mode=0, zeropage=0)
    return _ioctl(fd, UFFDIO_ZEROPAGE, arg)


def zero_range(fd: int, start: int, length: int) -> tuple[int, int]:
    """UFFDIO_ZEROPAGE over a range: map the zero page there. Returns like :func:`copy`."""
    arg = _Zeropage(range=_Range(start=start, len=length), mode=0, zeropage=0)
    err = _ioctl(fd, UFFDIO_ZEROPAGE, arg)
    done = arg.zeropage if arg.zeropage > 0 else 0
    if err == 0:
        done = length
    return err, done


def wake(fd: int, start: int, length: int) -> int:
    return _ioctl(fd, UFFDIO_WAKE, _Range(start=start, len=length))


@dataclass(frozen=True)
class Message:
    event: int
    #: PAGEFAULT: (flags, address); FORK: (new fd,); REMAP: (from, to, len);
    #: REMOVE / UNMAP: (start, end).
    args: tuple[int, ...]


def parse_messages(data: bytes) -> list[Message]:
    out = []
    for pos in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
        event = data[pos]
        body = data[pos + 8 : pos + MSG_SIZE]
        if event == EVENT_PAGEFAULT:
            flags, address = struct.unpack_from("<QQ", body)
            out.append(Message(event, (flags, address)))
        elif event == EVENT_FORK:
            out.append(Message(event, struct.unpack_from("<I", body)))
        elif event == EVENT_REMAP:
            out.append(Message(event, struct.unpack_from("<QQQ", body)))
        elif event in (EVENT_REMOVE, EVENT_UNMAP):
            out.append(Message(event, struct.unpack_from("<QQ", body)))
        else:
            out.append(Message(event, ()))
    return out


def available() -> bool:
    """Whether this process may create a userfaultfd (root, or the sysctl allows it)."""
    try:
        fd = _libc().syscall(_SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    except AttributeError:
        return False
    if fd < 0:
        return False
    os.close(fd)
    return True
