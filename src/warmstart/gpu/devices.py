"""What GPUs this host has, which driver, and what that driver can checkpoint.

NVML (the ``nvidia-ml-py`` package, imported as ``pynvml``) is used when it
can be imported and initialised; it also reports per-process GPU memory.
Otherwise the CUDA driver (``libcuda``) lists the devices, and
``/proc/driver/nvidia`` supplies the driver version and the device minor
numbers. GPU indices are NVML's (= ``nvidia-smi``'s, PCI order) with NVML and
CUDA's (after ``CUDA_VISIBLE_DEVICES``) without it; UUIDs are the identity
that counts.

Checkpoint features by driver, from NVIDIA's docs and headers:

* driver 550: only the ``cuda-checkpoint`` utility; no driver API.
* driver 570 / CUDA 12.8: the ``cuCheckpointProcess*`` driver API, lock with a
  timeout, ``GetRestoreThreadId``, CRIU >= 4.0 process-tree support. The
  ``cuda-checkpoint`` README for 570 says "does not support GPU migration".
* CUDA 12.9 (driver 575): ``CUcheckpointRestoreArgs`` still all reserved.
* CUDA 13.0 / driver 580: ``CUcheckpointGpuPair`` and the ``gpuPairs`` field of
  ``CUcheckpointRestoreArgs``: restore onto a different GPU of the same chip
  type ("If an array of GPU UUID pairs is specified, it must contain every
  checkpointed GPU").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from warmstart.errors import NoGpuDriver, WarmstartError
from warmstart.gpu.discovery import inspect_process
from warmstart.gpu.driver import (
    MIN_CHECKPOINT_API,
    MIN_REMAP_API,
    CudaDriver,
    format_cuda_version,
    load_driver,
    normalize_uuid,
)

#: Driver branches for the features above, used when only the driver version is known.
MIN_CHECKPOINT_DRIVER = 570
MIN_REMAP_DRIVER = 580

_DRIVER_VERSION_RE = re.compile(r"(?<![\d.])(\d{3,})\.(\d+)(?:\.(\d+))?(?![\d.])")


def driver_major(version: str | None) -> int | None:
    """"580.65.06" -> 580; None when not a driver version."""
    if not version:
        return None
    m = _DRIVER_VERSION_RE.search(version)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointFeatures:
    """What the installed driver's checkpoint API offers."""

    checkpoint_api: bool
    lock_timeout: bool
    gpu_remap: bool
    notes: tuple[str, ...] = ()


def checkpoint_features(
    cuda_driver_api: int | None, driver_version: str | None
) -> CheckpointFeatures:
    """Features from the CUDA driver API version (preferred) or the driver version."""
    notes: list[str] = []
    major = driver_major(driver_version)
    if cuda_driver_api is not None:
        ckpt = cuda_driver_api >= MIN_CHECKPOINT_API
        remap = cuda_driver_api >= MIN_REMAP_API
        shown = format_cuda_version(cuda_driver_api)
        if not ckpt:
            notes.append(f"CUDA driver API {shown} predates the checkpoint API (12.8)")
        elif not remap:
            notes.append(f"CUDA driver API {shown}: restore only onto the same GPUs (needs 13.0)")
    elif major is not None:
        ckpt = major >= MIN_CHECKPOINT_DRIVER
        remap = major >= MIN_REMAP_DRIVER
        if not ckpt:
            notes.append(f"driver {driver_version} predates the checkpoint API (570)")
        elif not remap:
            notes.append(f"driver {driver_version}: restore only onto the same GPUs (needs 580)")
    else:
        ckpt = remap = False
        notes.append("driver version unknown")
    return CheckpointFeatures(checkpoint_api=ckpt, lock_timeout=ckpt, gpu_remap=remap,
                              notes=tuple(notes))


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    total_memory_bytes: int
    #: N of /dev/nvidiaN, when known.
    minor: int | None = None


@dataclass(frozen=True)
class GpuInventory:
    devices: tuple[GpuDevice, ...]
    #: Kernel driver version, e.g. "580.65.06".
    driver_version: str | None
    #: cuDriverGetVersion's number, e.g. 13000.
    cuda_driver_api: int | None
    #: "nvml" or "libcuda".
    source: str
    features: CheckpointFeatures = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "features", checkpoint_features(self.cuda_driver_api, self.driver_version)
        )

    @property
    def driver_major(self) -> int | None:
        return driver_major(self.driver_version)

    def by_uuid(self, uuid: str) -> GpuDevice | None:
        want = normalize_uuid(uuid)
        return next((d for d in self.devices if d.uuid == want), None)

    def by_index(self, index: int) -> GpuDevice | None:
        return next((d for d in self.devices if d.index == index), None)

    def by_minor(self, minor: int) -> GpuDevice | None:
        return next((d for d in self.devices if d.minor == minor), None)


@dataclass(frozen=True)
class GpuUsage:
    """One process's use of one GPU."""

    pid: int
    uuid: str
    #: Device memory NVML reports for the process; 0 when unknown.
    used_bytes: int


# --------------------------------------------------------------------------- NVML


class _Default:
    pass


_DEFAULT: Any = _Default()


def import_nvml() -> Any | None:
    """The ``pynvml`` module (from nvidia-ml-py), or None when not installed."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Nvml:
    """``with _Nvml(mod) as nv:`` — nvmlInit/nvmlShutdown around a block."""

    def __init__(self, mod: Any) -> None:
        self.mod = mod

    def __enter__(self) -> Any:
        self.mod.nvmlInit()
        return self.mod

    def __exit__(self, *exc: object) -> None:
        try:
            self.mod.nvmlShutdown()
        except Exception:  # noqa: BLE001 - shutting down is best effort
            pass


def _nvml_inventory(nv: Any, proc_root: Path) -> GpuInventory:
    with _Nvml(nv):
        driver_version = _text(nv.nvmlSystemGetDriverVersion())
        cuda_api: int | None
        try:
            getter = getattr(nv, "nvmlSystemGetCudaDriverVersion_v2", None) or getattr(
                nv, "nvmlSystemGetCudaDriverVersion"
            )
            cuda_api = int(getter())
        except Exception:  # noqa: BLE001 - old NVML: leave it unknown
            cuda_api = None
        devices = []
        for i in range(int(nv.nvmlDeviceGetCount())):
            h = nv.nvmlDeviceGetHandleByIndex(i)
            try:
                minor: int | None = int(nv.nvmlDeviceGetMinorNumber(h))
            except Exception:  # noqa: BLE001
                minor = None
            devices.append(
                GpuDevice(
                    index=i,
                    uuid=normalize_uuid(_text(nv.nvmlDeviceGetUUID(h))),
                    name=_text(nv.nvmlDeviceGetName(h)),
                    total_memory_bytes=int(nv.nvmlDeviceGetMemoryInfo(h).total),
                    minor=minor,
                )
            )
    return GpuInventory(tuple(devices), driver_version, cuda_api, "nvml")


# --------------------------------------------------------------------------- /proc/driver/nvidia


def proc_driver_version(proc_root: Path = Path("/proc")) -> str | None:
    """Kernel module version from ``/proc/driver/nvidia/version`` (None if absent)."""
    try:
        first = (proc_root / "driver/nvidia/version").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = _DRIVER_VERSION_RE.search(first.split("Module", 1)[-1])
    return m.group(0) if m else None


def proc_gpu_info(proc_root: Path = Path("/proc")) -> list[dict[str, str]]:
    """Key/value pairs of each ``/proc/driver/nvidia/gpus/*/information``."""
    base = proc_root / "driver/nvidia/gpus"
    out: list[dict[str, str]] = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return out
    for entry in entries:
        try:
            text = (entry / "information").read_text()
        except OSError:
            continue
        info: dict[str, str] = {"bus": entry.name}
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                info[key.strip()] = value.strip()
        out.append(info)
    return out


def _minor_by_uuid(proc_root: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for info in proc_gpu_info(proc_root):
        try:
            out[normalize_uuid(info["GPU UUID"])] = int(info["Device Minor"])
        except (KeyError, ValueError, WarmstartError):
            continue  # a malformed file is skipped
    return out


def _libcuda_inventory(driver: CudaDriver, proc_root: Path) -> GpuInventory:
    minors = _minor_by_uuid(proc_root)
    devices = tuple(
        GpuDevice(d.index, d.uuid, d.name, d.total_memory_bytes, minors.get(d.uuid))
        for d in driver.devices()
    )
    return GpuInventory(devices, proc_driver_version(proc_root), driver.version(), "libcuda")


# --------------------------------------------------------------------------- public


def get_inventory(
    *,
    nvml: Any = _DEFAULT,
    driver: CudaDriver | None = None,
    proc_root: Path = Path("/proc"),
) -> GpuInventory:
    """List this host's GPUs. NVML first, libcuda otherwise.

    ``nvml`` is the pynvml module (default: imported if installed; None to skip).
    Raises ``NoGpuDriver`` when neither works.
    """
    nv = import_nvml() if nvml is _DEFAULT else nvml
    nvml_problem = None
    if nv is not None:
        try:
            return _nvml_inventory(nv, proc_root)
        except Exception as exc:  # noqa: BLE001 - NVMLError and friends: fall back
            nvml_problem = f"NVML: {exc}"
    try:
        drv = driver if driver is not None else load_driver()
        return _libcuda_inventory(drv, proc_root)
    except NoGpuDriver as exc:
        if nvml_problem:
            exc.hint = f"{exc.hint} ({nvml_problem})" if exc.hint else nvml_problem
        raise


def gpu_usage_by_pid(
    pids: Iterable[int],
    inventory: GpuInventory,
    *,
    nvml: Any = _DEFAULT,
    proc_root: Path = Path("/proc"),
) -> dict[int, list[GpuUsage]]:
    """Which GPUs each of ``pids`` uses and how much device memory it holds there.

    NVML's ``nvmlDeviceGetComputeRunningProcesses`` gives UUID and bytes; a
    process NVML does not list (NVML off, or pids of another pid namespace)
    is matched through its ``/dev/nvidiaN`` descriptors and the devices'
    minor numbers, with 0 bytes. Call it while the processes still hold the
    GPU, i.e. before the CUDA checkpoint.
    """
    wanted = list(dict.fromkeys(pids))
    out: dict[int, list[GpuUsage]] = {pid: [] for pid in wanted}
    nv = import_nvml() if nvml is _DEFAULT else nvml
    if nv is not None:
        try:
            with _Nvml(nv):
                for i in range(int(nv.nvmlDeviceGetCount())):
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    uuid = normalize_uuid(_text(nv.nvmlDeviceGetUUID(h)))
                    for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
                        pid = int(proc.pid)
                        if pid in out:
                            used = getattr(proc, "usedGpuMemory", None)
                            out[pid].append(GpuUsage(pid, uuid, int(used or 0)))
        except Exception:  # noqa: BLE001 - fall back to /proc for everyone
            out = {pid: [] for pid in wanted}
    for pid in wanted:
        if out[pid]:
            continue
        for minor in inspect_process(pid, proc_root).gpu_minors:
            dev = inventory.by_minor(minor)
            if dev is not None:
                out[pid].append(GpuUsage(pid, dev.uuid, 0))
    return out
