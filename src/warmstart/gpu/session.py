"""Lock, checkpoint, restore and unlock the CUDA state of a set of processes as one.

Each step runs over every pid in order. A failed ``lock`` or ``checkpoint``
rolls back before it raises: each process touched so far is brought back to
RUNNING (CHECKPOINTED -> restore onto its own GPUs -> LOCKED -> unlock), by
asking the driver for its state, so a failed snapshot leaves the worker
running. The error raised is the first one, with the rollback's outcome in its
hint and as ``err.rollback`` (a :class:`RollbackReport`).

``restore`` does not roll back (a restored replica that fails is discarded by
the caller); ``unlock`` tries every pid and raises the first failure.

Before checkpointing, the session records which GPU each process uses and how
much device memory it holds (NVML's per-process number, else 0): see
:attr:`GpuCheckpointSession.processes`, the data for manifest ``GpuProcess``
records.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from warmstart.errors import GpuError, UsageError, WarmstartError
from warmstart.gpu.devices import GpuInventory, GpuUsage, get_inventory, gpu_usage_by_pid
from warmstart.gpu.driver import CudaDriver, ProcessState, normalize_uuid
from warmstart.gpu.gpumap import complete_pairs, needs_remap, visible_gpus


class CheckpointDriver(Protocol):
    """What the session needs of :class:`~warmstart.gpu.driver.CudaDriver`."""

    def lock(self, pid: int, timeout_ms: int = 0) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int, gpu_pairs: Sequence[tuple[str, str]] = ()) -> None: ...
    def unlock(self, pid: int) -> None: ...
    def state(self, pid: int) -> ProcessState: ...
    def restore_thread_id(self, pid: int) -> int: ...


UsageProbe = Callable[[Sequence[int]], Mapping[int, Sequence[GpuUsage]]]


@dataclass(frozen=True)
class ProcessGpuInfo:
    """One process on one GPU (the fields of manifest ``GpuProcess``)."""

    pid: int
    gpu_uuid: str
    gpu_model: str
    driver_version: str
    gpu_index: int | None = None
    cuda_driver_api: int | None = None
    device_memory_bytes: int = 0
    visible_uuids: tuple[str, ...] = ()


@dataclass(frozen=True)
class PhaseTiming:
    name: str
    seconds: float
    bytes: int | None = None


@dataclass
class RollbackReport:
    """Final state of each process after a rollback (None: state unknown)."""

    states: dict[int, ProcessState | None] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and all(s is ProcessState.RUNNING for s in self.states.values())

    def summary(self) -> str:
        if self.ok:
            return "rolled back: every process runs on the GPU again"
        bad = [f"pid {p}: {e}" for p, e in self.errors.items()]
        bad += [
            f"pid {p} left {s.name if s is not None else 'UNKNOWN'}"
            for p, s in self.states.items()
            if s is not ProcessState.RUNNING and p not in self.errors
        ]
        return "rollback incomplete: " + "; ".join(bad)


class GpuCheckpointSession:
    """The CUDA checkpoint cycle over ``pids`` (in that order)."""

    def __init__(
        self,
        driver: CheckpointDriver,
        pids: Sequence[int],
        *,
        inventory: GpuInventory | None = None,
        usage_probe: UsageProbe | None = None,
        processes: Sequence[ProcessGpuInfo] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``processes``: known per-pid GPU records (e.g. from a manifest, for a
        restored replica), used to give each pid only the GPU pairs it needs.
        ``usage_probe``: replaces NVML//proc for the pre-checkpoint measurement.
        """
        if not pids:
            raise UsageError("no CUDA process to checkpoint")
        if len(set(pids)) != len(pids):
            raise UsageError(f"a pid is listed twice: {list(pids)}")
        self.driver = driver
        self.pids: tuple[int, ...] = tuple(pids)
        self._inventory = inventory
        self._probe = usage_probe
        self._clock = clock
        self._touched: list[int] = []
        self.processes: list[ProcessGpuInfo] = list(processes)
        self.timings: list[PhaseTiming] = []

    # -- records

    @property
    def bytes_moved(self) -> int:
        """Device memory of all processes (what checkpoint/restore copy, roughly)."""
        return sum(p.device_memory_bytes for p in self.processes)

    def inventory(self) -> GpuInventory:
        if self._inventory is None:
            drv = self.driver if isinstance(self.driver, CudaDriver) else None
            self._inventory = get_inventory(driver=drv)
        return self._inventory

    def _record(self) -> None:
        inv = self.inventory()
        probe = self._probe or (lambda pids: gpu_usage_by_pid(pids, inv))
        usage = probe(self.pids)
        records: list[ProcessGpuInfo] = []
        for pid in self.pids:
            for use in usage.get(pid, ()):
                dev = inv.by_uuid(use.uuid)
                records.append(
                    ProcessGpuInfo(
                        pid=pid,
                        gpu_uuid=normalize_uuid(use.uuid),
                        gpu_model=dev.name if dev else "unknown",
                        gpu_index=dev.index if dev else None,
                        driver_version=inv.driver_version or "unknown",
                        cuda_driver_api=inv.cuda_driver_api,
                        device_memory_bytes=use.used_bytes,
                        visible_uuids=visible_gpus(_environ(pid).get("CUDA_VISIBLE_DEVICES"), inv),
                    )
                )
        self.processes = records

    def _timed(self, name: str, start: float, with_bytes: bool = False) -> None:
        self.timings.append(
            PhaseTiming(name, self._clock() - start, self.bytes_moved if with_bytes else None)
        )

    def states(self) -> dict[int, ProcessState]:
        return {pid: self.driver.state(pid) for pid in self.pids}

    def restore_thread_ids(self) -> dict[int, int]:
        """Per pid, the driver's restore thread (CRIU must leave it alone)."""
        return {pid: self.driver.restore_thread_id(pid) for pid in self.pids}

    # -- steps

    def lock(self, timeout_s: float | None = None) -> None:
        """Lock every process; ``timeout_s`` bounds the whole step (None/0: no limit)."""
        start = self._clock()
        deadline = start + timeout_s if timeout_s else None
        failing: int | None = None
        try:
            for pid in self.pids:
                timeout_ms = 0
                if deadline is not None:
                    left = deadline - self._clock()
                    if left <= 0:
                        raise GpuError(
                            f"locking {len(self.pids)} CUDA processes took longer than "
                            f"{timeout_s:g} s (reached pid {pid})",
                            hint="let in-flight GPU work finish or raise the lock timeout",
                        )
                    timeout_ms = max(1, int(left * 1000))
                failing = pid
                self.driver.lock(pid, timeout_ms)
                self._touch(pid)
                failing = None
        except WarmstartError as exc:
            self._fail(exc, list(self._touched), failing)
            raise
        self._timed("gpu-lock", start)

    def checkpoint(self) -> None:
        """Record GPU use, then checkpoint every (LOCKED) process."""
        start = self._clock()
        for pid in self.pids:  # all are LOCKED now: a failure must undo each
            self._touch(pid)
        try:
            self._record()
            for pid in self.pids:
                self.driver.checkpoint(pid)
        except WarmstartError as exc:
            self._fail(exc, list(self.pids), None)
            raise
        self._timed("gpu-checkpoint", start, with_bytes=True)

    def pairs_for(self, pid: int, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """The pairs to give the driver for ``pid``: none when nothing moves,
        else every pair.

        The driver wants the whole mapping, not just the process's own GPU: a
        rank of a tensor-parallel worker also holds (peer) state on the other
        GPUs it can see, and restoring one rank of a swapped pair with only its
        own pair fails with CUDA_ERROR_INVALID_VALUE (measured on 2 x H200),
        and so does a one-GPU process that can see a second GPU. So every GPU
        the process could see is mapped (:func:`complete_pairs`)."""
        if not needs_remap(pairs):
            return []
        visible = next((p.visible_uuids for p in self.processes if p.pid == pid and p.visible_uuids), ())
        return complete_pairs(pairs, visible)

    def restore(self, pairs: Sequence[tuple[str, str]] = ()) -> None:
        """Restore every CHECKPOINTED process (it ends LOCKED); no rollback."""
        start = self._clock()
        for pid in self.pids:
            self._touch(pid)
            self.driver.restore(pid, self.pairs_for(pid, pairs))
        self._timed("gpu-restore", start, with_bytes=True)

    def unlock(self) -> None:
        """Unlock every process; tries all, then raises the first failure."""
        start = self._clock()
        first: WarmstartError | None = None
        for pid in self.pids:
            try:
                self.driver.unlock(pid)
            except WarmstartError as exc:
                first = first or exc
        if first is not None:
            raise first
        self._timed("gpu-unlock", start)

    # -- rollback

    def _touch(self, pid: int) -> None:
        if pid not in self._touched:
            self._touched.append(pid)

    def _fail(self, exc: WarmstartError, pids: list[int], failing: int | None) -> None:
        report = self.rollback(pids)
        if failing is not None and failing not in report.states:
            # The step failed on this pid; undo whatever it reached, but a pid
            # whose state cannot be read (no CUDA, exited) has nothing to undo.
            try:
                state: ProcessState | None = self.driver.state(failing)
            except WarmstartError:
                state = None
            if state is not None:
                sub = self.rollback([failing])
                report.states.update(sub.states)
                report.errors.update(sub.errors)
        exc.rollback = report  # type: ignore[attr-defined]
        summary = report.summary()
        exc.hint = f"{exc.hint}; {summary}" if exc.hint else summary

    def rollback(self, pids: Sequence[int] | None = None) -> RollbackReport:
        """Bring each process (default: each one this session touched) back to
        RUNNING from whatever state it reached. Never raises."""
        report = RollbackReport()
        for pid in reversed(list(pids if pids is not None else self._touched)):
            try:
                report.states[pid] = self._bring_back(pid)
            except WarmstartError as exc:
                report.errors[pid] = str(exc)
                try:
                    report.states[pid] = self.driver.state(pid)
                except WarmstartError:
                    report.states[pid] = None
        return report

    def _bring_back(self, pid: int) -> ProcessState:
        for _ in range(3):  # CHECKPOINTED -> LOCKED -> RUNNING
            state = self.driver.state(pid)
            if state is ProcessState.RUNNING:
                return state
            if state is ProcessState.CHECKPOINTED:
                self.driver.restore(pid, ())
            elif state is ProcessState.LOCKED:
                self.driver.unlock(pid)
            else:
                raise GpuError(f"pid {pid} is in CUDA state {state.name}; it cannot be resumed")
        return self.driver.state(pid)


def _environ(pid: int) -> dict[str, str]:
    """A process's environment (empty where it cannot be read)."""
    try:
        raw = open(f"/proc/{pid}/environ", "rb").read()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
