"""The GPU half of a checkpoint or restore, on top of :mod:`warmstart.gpu`.

A tree without CUDA processes never loads ``libcuda``, so everything CPU-side
works on hosts without a driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from warmstart.gpu import (
    GpuCheckpointSession,
    ProcessGpuInfo,
    find_cuda_processes,
    get_inventory,
    load_driver,
    needs_remap,
    resolve_gpu_map,
)
from warmstart.snapshot.manifest import GpuProcess, Manifest


class GpuCheckpoint:
    """Lock + checkpoint the CUDA processes of a tree; roll back on any failure."""

    def __init__(self, session: GpuCheckpointSession) -> None:
        self._session = session
        self.pids = list(session.pids)

    @classmethod
    def for_tree(cls, pids: Sequence[int]) -> GpuCheckpoint | None:
        cuda = find_cuda_processes(pids)
        if not cuda:
            return None
        return cls(GpuCheckpointSession(load_driver(), cuda))

    def lock(self, timeout_s: float) -> None:
        self._session.lock(timeout_s)

    def checkpoint(self) -> None:
        self._session.checkpoint()

    def resume(self) -> None:
        """Give the (running) originals their GPU state back and unlock them."""
        self._session.restore(())
        self._session.unlock()

    def rollback(self) -> None:
        self._session.rollback()

    @property
    def device_bytes(self) -> int:
        return self._session.bytes_moved

    def records(self) -> list[GpuProcess]:
        return [GpuProcess(**vars(p)) for p in self._session.processes]


@dataclass(frozen=True)
class GpuRestorePlan:
    """Checked before anything runs: which source GPU goes where."""

    records: tuple[GpuProcess, ...]
    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def for_manifest(cls, manifest: Manifest, gpu_map: Sequence[str] = ()) -> GpuRestorePlan | None:
        if not manifest.gpus:
            return None
        pairs = resolve_gpu_map(manifest.gpus, get_inventory(), list(gpu_map))
        return cls(tuple(manifest.gpus), tuple(pairs))

    @property
    def pids(self) -> list[int]:
        return list(dict.fromkeys(g.pid for g in self.records))

    def with_pids(self, pid_map: Callable[[int], int]) -> GpuRestorePlan:
        """The same plan for processes whose PIDs changed (``pid_map``: recorded -> now)."""
        records = tuple(g.model_copy(update={"pid": pid_map(g.pid)}) for g in self.records)
        return GpuRestorePlan(records, self.pairs)

    def restore(self) -> None:
        """Restore GPU state into the restored processes, then unlock them."""
        session = GpuCheckpointSession(
            load_driver(),
            self.pids,
            processes=[ProcessGpuInfo(**g.model_dump()) for g in self.records],
        )
        session.restore(self.pairs if needs_remap(self.pairs) else ())
        session.unlock()
