"""find_cuda_processes against fake /proc trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmstart.errors import PermissionError_
from warmstart.gpu.discovery import (
    find_cuda_processes,
    inspect_process,
    libcuda_mapped,
    nvidia_fds,
)

LIBC = "7f00-7f10 r-xp 00000000 08:01 12 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
LIBCUDA = "7e00-7e80 r-xp 00000000 08:01 99 /usr/lib/x86_64-linux-gnu/libcuda.so.580.65.06\n"


def make_proc(root: Path, pid: int, fds: dict[int, str], maps: str = LIBC) -> None:
    d = root / str(pid)
    (d / "fd").mkdir(parents=True)
    for fd, target in fds.items():
        os.symlink(target, d / "fd" / str(fd))
    (d / "maps").write_text(maps)


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    root = tmp_path / "proc"
    make_proc(root, 1, {0: "/dev/null", 1: "pipe:[123]"})  # plain process
    make_proc(root, 2, {0: "/dev/null", 5: "/dev/nvidiactl", 6: "/dev/nvidia0",
                        7: "/dev/nvidia-uvm", 8: "/dev/nvidia0"}, LIBC + LIBCUDA)
    make_proc(root, 3, {3: "/dev/nvidia-uvm-tools"})  # fds only
    make_proc(root, 4, {0: "socket:[9]"}, LIBC + LIBCUDA)  # checkpointed: no fds, lib mapped
    make_proc(root, 5, {0: "/tmp/dev/nvidia0"})  # not a device node path
    make_proc(root, 6, {4: "/dev/nvidia1", 5: "/dev/nvidia3", 6: "/dev/nvidiactl"})
    return root


def test_finds_cuda_processes_in_order(proc: Path) -> None:
    assert find_cuda_processes([6, 1, 2, 3, 4, 5, 2, 99], proc) == [6, 2, 3, 4]


def test_exited_process_is_left_out(proc: Path) -> None:
    assert find_cuda_processes([12345], proc) == []
    assert nvidia_fds(12345, proc) == []
    assert libcuda_mapped(12345, proc) is False


def test_fds_and_minors(proc: Path) -> None:
    assert nvidia_fds(2, proc) == ["/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidiactl"]
    info = inspect_process(6, proc)
    assert info.gpu_minors == (1, 3)
    assert info.libcuda_mapped is False
    assert inspect_process(4, proc).device_fds == ()
    assert inspect_process(4, proc).uses_cuda


def test_libcuda_name_must_match_exactly(tmp_path: Path) -> None:
    make_proc(tmp_path, 7, {}, LIBC + "7e00-7e80 r-xp 0 08:01 9 /opt/libcudart.so.12\n")
    make_proc(tmp_path, 8, {}, "7e00-7e80 r-xp 0 08:01 9 /usr/lib64/libcuda.so.1\n")
    assert find_cuda_processes([7, 8], tmp_path) == [8]


def test_unreadable_fd_dir_is_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_proc(tmp_path, 9, {0: "/dev/nvidiactl"})
    real = os.listdir

    def listdir(path: object) -> list[str]:
        if str(path).endswith("/9/fd"):
            raise PermissionError(13, "Permission denied")
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(PermissionError_, match="pid 9"):
        find_cuda_processes([9], tmp_path)
