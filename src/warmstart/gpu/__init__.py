"""GPU layer: the CUDA checkpoint API, GPU discovery and remapping, VMM regions.

Importing this package loads no driver; ``load_driver()`` and
``get_inventory()`` do, on demand. torch is imported only by
``ReservedRegion.as_tensor``.
"""

from warmstart.gpu.devices import (
    CheckpointFeatures,
    GpuDevice,
    GpuInventory,
    GpuUsage,
    checkpoint_features,
    get_inventory,
    gpu_usage_by_pid,
)
from warmstart.gpu.discovery import find_cuda_processes, nvidia_fds
from warmstart.gpu.driver import CudaCallError, CudaDriver, ProcessState, load_driver
from warmstart.gpu.gpumap import SourceGpu, needs_remap, parse_gpu_map, resolve_gpu_map
from warmstart.gpu.session import (
    GpuCheckpointSession,
    PhaseTiming,
    ProcessGpuInfo,
    RollbackReport,
)
from warmstart.gpu.vmm import HandleType, ReservedRegion

__all__ = [
    "CheckpointFeatures",
    "CudaCallError",
    "CudaDriver",
    "GpuCheckpointSession",
    "GpuDevice",
    "GpuInventory",
    "GpuUsage",
    "HandleType",
    "PhaseTiming",
    "ProcessGpuInfo",
    "ProcessState",
    "ReservedRegion",
    "RollbackReport",
    "SourceGpu",
    "checkpoint_features",
    "find_cuda_processes",
    "get_inventory",
    "gpu_usage_by_pid",
    "load_driver",
    "needs_remap",
    "nvidia_fds",
    "parse_gpu_map",
    "resolve_gpu_map",
]
