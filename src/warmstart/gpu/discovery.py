"""Which processes of a tree use CUDA, read from ``/proc``.

A process counts as a CUDA process when it has a file descriptor open on an
NVIDIA device node (``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidiaN``…)
or has ``libcuda.so`` mapped. The second test matters after a CUDA
checkpoint: a checkpointed process holds no ``/dev/nvidia*`` descriptor at
all, yet still has the driver library mapped and must be restored.

A process that maps libcuda but never called ``cuInit`` also counts; ask
``CudaDriver.state(pid)`` to be sure.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from warmstart.errors import PermissionError_

_DEVICE_PREFIX = "/dev/nvidia"
_MINOR_RE = re.compile(r"^/dev/nvidia(\d+)$")
_LIBCUDA_RE = re.compile(r"/libcuda\.so(?:\.\d+)*(?:\s|$)")


@dataclass(frozen=True)
class CudaProcessInfo:
    """What ``/proc`` says about one process's use of the NVIDIA driver."""

    pid: int
    device_fds: tuple[str, ...]
    libcuda_mapped: bool

    @property
    def uses_cuda(self) -> bool:
        return bool(self.device_fds) or self.libcuda_mapped

    @property
    def gpu_minors(self) -> tuple[int, ...]:
        """Minor numbers of the ``/dev/nvidiaN`` nodes it holds (one per GPU)."""
        out = {int(m.group(1)) for p in self.device_fds if (m := _MINOR_RE.match(p))}
        return tuple(sorted(out))


def _denied(pid: int, what: str) -> PermissionError_:
    return PermissionError_(
        f"cannot read {what} of pid {pid}", hint="run warmstart as root"
    )


def nvidia_fds(pid: int, proc_root: Path = Path("/proc")) -> list[str]:
    """Targets of ``pid``'s open descriptors that are NVIDIA device nodes (sorted).

    Empty when the process has none or has exited.
    """
    fd_dir = proc_root / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        return []
    except PermissionError:
        raise _denied(pid, "the open files") from None
    found: set[str] = set()
    for name in names:
        try:
            target = os.readlink(fd_dir / name)
        except FileNotFoundError:
            continue  # closed meanwhile
        except PermissionError:
            raise _denied(pid, "the open files") from None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # not a link (fake trees, odd fs)
                continue
            raise
        if target.startswith(_DEVICE_PREFIX):
            found.add(target)
    return sorted(found)


def libcuda_mapped(pid: int, proc_root: Path = Path("/proc")) -> bool:
    """Whether ``/proc/PID/maps`` shows ``libcuda.so`` mapped (False if gone)."""
    try:
        with open(proc_root / str(pid) / "maps", encoding="utf-8", errors="replace") as fh:
            return any(_LIBCUDA_RE.search(line) for line in fh)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise _denied(pid, "the memory map") from None
    except ProcessLookupError:
        return False


def inspect_process(pid: int, proc_root: Path = Path("/proc")) -> CudaProcessInfo:
    return CudaProcessInfo(
        pid=pid,
        device_fds=tuple(nvidia_fds(pid, proc_root)),
        libcuda_mapped=libcuda_mapped(pid, proc_root),
    )


def find_cuda_processes(pids: Iterable[int], proc_root: Path = Path("/proc")) -> list[int]:
    """The pids among ``pids`` that use CUDA, in the given order, without repeats.

    Processes that have exited are left out. Raises ``PermissionError_`` when
    ``/proc`` cannot be read for one of them.
    """
    seen: set[int] = set()
    out: list[int] = []
    for pid in pids:
        if pid in seen:
            continue
        seen.add(pid)
        if inspect_process(pid, proc_root).uses_cuda:
            out.append(pid)
    return out
