"""GPU inventory, checkpoint features and per-process GPU use, with fake NVML,
fake libcuda and fake /proc/driver/nvidia trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmstart.errors import NoGpuDriver
from warmstart.gpu.devices import (
    checkpoint_features,
    driver_major,
    get_inventory,
    gpu_usage_by_pid,
    proc_driver_version,
    proc_gpu_info,
)
from warmstart.gpu.driver import CudaDriver
from warmstart.gpu.fake import FakeCudaLib, FakeGpu, FakeNvml

A = "GPU-11111111-2222-3333-4444-555555555555"
B = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
VERSION_LINE = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  "
    "(dvs-builder@U16-I3-B03-4-3)  Tue Jul 15 19:13:25 UTC 2025\n"
    "GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)\n"
)


def fake_proc_driver(root: Path, gpus: list[tuple[str, str, int]]) -> Path:
    (root / "driver/nvidia/gpus").mkdir(parents=True)
    (root / "driver/nvidia/version").write_text(VERSION_LINE)
    for bus, uuid, minor in gpus:
        d = root / "driver/nvidia/gpus" / bus
        d.mkdir()
        (d / "information").write_text(
            "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 123\n"
            f"GPU UUID: \t {uuid}\nVideo BIOS: \t 96.00.99.00.01\nBus Type: \t PCIe\n"
            f"Bus Location: \t {bus}\nDevice Minor: \t {minor}\nGPU Excluded:\t No\n"
        )
    return root


@pytest.mark.parametrize(
    ("api", "version", "ckpt", "remap"),
    [
        (13000, "580.65.06", True, True),
        (12090, "575.57.08", True, False),
        (12080, "570.86.10", True, False),
        (12040, "550.54.15", False, False),
        (None, "580.95.05", True, True),
        (None, "575.51.03", True, False),
        (None, "550.1", False, False),
        (None, None, False, False),
    ],
)
def test_checkpoint_features(api: int | None, version: str | None, ckpt: bool, remap: bool) -> None:
    f = checkpoint_features(api, version)
    assert (f.checkpoint_api, f.lock_timeout, f.gpu_remap) == (ckpt, ckpt, remap)
    assert bool(f.notes) == (not remap)


def test_driver_major() -> None:
    assert driver_major("580.65.06") == 580
    assert driver_major("NVIDIA 570.86.10") == 570
    assert driver_major("13.0") is None
    assert driver_major(None) is None


def test_inventory_from_nvml(tmp_path: Path) -> None:
    nv = FakeNvml([FakeGpu(A), FakeGpu(B, "NVIDIA H200", 141 << 30)], bytes_strings=True)
    inv = get_inventory(nvml=nv, proc_root=tmp_path)
    assert inv.source == "nvml"
    assert inv.driver_version == "580.65.06" and inv.driver_major == 580
    assert inv.cuda_driver_api == 13000
    assert [(g.index, g.uuid, g.name, g.minor) for g in inv.devices] == [
        (0, A, "NVIDIA H100 80GB HBM3", 0), (1, B, "NVIDIA H200", 1),
    ]
    assert inv.by_uuid(B.upper().replace("GPU-", "")) == inv.devices[1]
    assert inv.features.gpu_remap
    assert nv.active == 0  # shut down again


def test_inventory_falls_back_to_libcuda_and_proc(tmp_path: Path) -> None:
    root = fake_proc_driver(tmp_path, [("0000:17:00.0", B, 3), ("0000:65:00.0", A, 5)])
    lib = FakeCudaLib([FakeGpu(A), FakeGpu(B)], version=12080)
    inv = get_inventory(nvml=FakeNvml(broken=True), driver=CudaDriver(lib), proc_root=root)
    assert inv.source == "libcuda"
    assert inv.driver_version == "580.65.06"
    assert inv.cuda_driver_api == 12080
    assert [(g.uuid, g.minor) for g in inv.devices] == [(A, 5), (B, 3)]
    assert inv.features.checkpoint_api and not inv.features.gpu_remap


def test_no_driver_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WARMSTART_LIBCUDA", str(tmp_path / "missing.so"))
    with pytest.raises(NoGpuDriver) as info:
        get_inventory(nvml=FakeNvml(broken=True), proc_root=tmp_path)
    assert info.value.hint and "NVML Shared Library Not Found" in info.value.hint


def test_proc_parsers(tmp_path: Path) -> None:
    root = fake_proc_driver(tmp_path, [("0000:17:00.0", A, 0)])
    assert proc_driver_version(root) == "580.65.06"
    (info,) = proc_gpu_info(root)
    assert info["GPU UUID"] == A and info["Device Minor"] == "0"
    assert info["Model"] == "NVIDIA H100 80GB HBM3"
    assert proc_driver_version(tmp_path / "nothing") is None
    assert proc_gpu_info(tmp_path / "nothing") == []


def test_usage_from_nvml_and_fd_fallback(tmp_path: Path) -> None:
    gpus = [FakeGpu(A), FakeGpu(B)]
    nv = FakeNvml(gpus, used={A: {100: 3 << 30, 999: 1}, B: {100: 1 << 30, 101: None}})
    inv = get_inventory(nvml=nv, proc_root=tmp_path)
    # pid 102 is not in NVML's list (another pid namespace): found via /dev/nvidia1
    (tmp_path / "102/fd").mkdir(parents=True)
    os.symlink("/dev/nvidia1", tmp_path / "102/fd/7")
    os.symlink("/dev/nvidiactl", tmp_path / "102/fd/8")
    (tmp_path / "102/maps").write_text("")
    usage = gpu_usage_by_pid([100, 101, 102, 103], inv, nvml=nv, proc_root=tmp_path)
    assert [(u.uuid, u.used_bytes) for u in usage[100]] == [(A, 3 << 30), (B, 1 << 30)]
    assert [(u.uuid, u.used_bytes) for u in usage[101]] == [(B, 0)]
    assert [(u.uuid, u.used_bytes) for u in usage[102]] == [(B, 0)]
    assert usage[103] == []
    assert 999 not in usage
