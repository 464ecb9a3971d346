"""The GPU half of a checkpoint or restore, on top of :mod:`warmstart.gpu`.

Imports of the driver binding are deferred: a tree without CUDA processes
never loads ``libcuda``, so everything CPU-side works on hosts without a driver.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from warmstart.snapshot.manifest import GpuProcess, Manifest


class GpuCheckpoint:
    """Lock + checkpoint the CUDA processes of a tree; roll back on any failure."""

    def __init__(self, session: object, pids: list[int]) -> None:
        self._session = session
        self.pids = pids

    @classmethod
    def for_tree(cls, pids: Sequence[int]) -> GpuCheckpoint | None:
        from warmstart.gpu.discovery import find_cuda_processes

        cuda = find_cuda_processes(pids)
        if not cuda:
            return None
        from warmstart.gpu.driver import load_driver
        from warmstart.gpu.session import GpuCheckpointSession

        return cls(GpuCheckpointSession(load_driver(), cuda), cuda)

    def lock(self, timeout_s: float) -> None:
        self._session.lock(timeout_s)  # type: ignore[attr-defined]

    def checkpoint(self) -> None:
        self._session.checkpoint()  # type: ignore[attr-defined]

    def resume(self) -> None:
        """Restore the GPU state into the (still running) originals and unlock them."""
        self._session.restore(())  # type: ignore[attr-defined]
        self._session.unlock()  # type: ignore[attr-defined]

    def rollback(self) -> None:
        self._session.rollback()  # type: ignore[attr-defined]

    @property
    def device_bytes(self) -> int:
        return sum(r.device_memory_bytes for r in self.records())

    def records(self) -> list[GpuProcess]:
        return [
            GpuProcess(
                pid=r.pid,
                gpu_uuid=r.gpu_uuid,
                gpu_model=r.gpu_model,
                gpu_index=r.gpu_index,
                driver_version=r.driver_version,
                cuda_driver_api=r.cuda_driver_api,
                device_memory_bytes=r.device_memory_bytes,
            )
            for r in self._session.records()  # type: ignore[attr-defined]
        ]


@dataclass(frozen=True)
class GpuRestorePlan:
    """Checked before anything runs: which source GPU goes where."""

    pids: tuple[int, ...]
    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def for_manifest(cls, manifest: Manifest, gpu_map: Sequence[str] = ()) -> GpuRestorePlan | None:
        if not manifest.gpus:
            return None
        from warmstart.gpu.devices import inventory
        from warmstart.gpu.gpumap import plan_gpu_map

        pairs = plan_gpu_map(manifest.gpus, inventory(), list(gpu_map))
        return cls(tuple(g.pid for g in manifest.gpus), tuple(pairs))

    def restore(self) -> None:
        """Restore GPU state into the restored processes, then unlock them."""
        from warmstart.gpu.driver import load_driver
        from warmstart.gpu.session import GpuCheckpointSession

        session = GpuCheckpointSession(load_driver(), list(self.pids))
        session.restore(self.pairs)
        session.unlock()
