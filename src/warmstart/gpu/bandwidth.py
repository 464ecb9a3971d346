"""Pinned host-to-device copy bandwidth per GPU, through the driver API.

The ceiling for a GPU-state restore and for the memory service's weight
streaming: ``warmstart doctor --bandwidth`` stores it with the host figures
(:mod:`warmstart.host.bandwidth`).
"""

from __future__ import annotations

import ctypes
import time

from warmstart.gpu.driver import CudaDriver, load_driver

_SIZE = 512 << 20
_ROUNDS = 4


def h2d_pinned(driver: CudaDriver | None = None, *, size: int = _SIZE) -> dict[str, float]:
    """GPU UUID -> GB/s of synchronous copies from pinned host memory."""
    drv = driver or load_driver(require_checkpoint=False)
    drv.ensure_init()
    out: dict[str, float] = {}
    for dev in drv.devices():
        ctx = ctypes.c_void_p()
        drv.call("cuDevicePrimaryCtxRetain", ctypes.pointer(ctx), dev.index)
        host = ctypes.c_void_p()
        mem = ctypes.c_uint64()
        try:
            drv.call("cuCtxSetCurrent", ctx)
            drv.call("cuMemHostAlloc", ctypes.pointer(host), size, 0)
            drv.call("cuMemAlloc_v2", ctypes.pointer(mem), size)
            ctypes.memset(host.value, 1, size)
            drv.call("cuMemcpyHtoD_v2", mem.value, host, size)  # warm-up
            t0 = time.perf_counter()
            for _ in range(_ROUNDS):
                drv.call("cuMemcpyHtoD_v2", mem.value, host, size)
            out[dev.uuid] = size * _ROUNDS / (time.perf_counter() - t0) / 1e9
        finally:
            if mem.value:
                drv.call("cuMemFree_v2", mem.value)
            if host.value:
                drv.call("cuMemFreeHost", host)
            drv.call("cuDevicePrimaryCtxRelease_v2", dev.index)
    return out
