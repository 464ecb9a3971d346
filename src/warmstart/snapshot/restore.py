"""Restore a snapshot from the store.

Everything that can refuse does so before a process exists: manifest format,
host and GPU compatibility, PIDs in use. Then CRIU restores the tree *stopped*
while every file is verified against its checksum on other cores; only when
all of it checks out do the tasks get SIGCONT (and their GPU state back). A
failure at any later step kills the restored tree: nothing half-restored runs.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from warmstart import protocol
from warmstart.errors import UsageError
from warmstart.host import process as proc
from warmstart.host.criu import Criu, DumpOptions, RestoreOptions, find_criu
from warmstart.host.stats import RestoreStats
from warmstart.snapshot import compat, hostinfo
from warmstart.snapshot.gpu_state import GpuRestorePlan
from warmstart.snapshot.manifest import IMAGES_DIR, Manifest
from warmstart.snapshot.timing import PhaseListener, Timer
from warmstart.store.integrity import Expected, verify_files
from warmstart.store.local import LocalStore


@dataclass(frozen=True)
class RestoreRequest:
    gpu_map: tuple[str, ...] = ()
    verify: bool = True
    #: Worker control directory: receives restore-context.json + restore-complete.
    control_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RestoreResult:
    pid: int
    manifest: Manifest
    timer: Timer
    log: Path


def _pids_in_use(manifest: Manifest) -> list[str]:
    busy = []
    for p in manifest.tree.processes:
        try:
            busy.append(f"{p.pid} ({psutil.Process(p.pid).name()})")
        except psutil.NoSuchProcess:
            continue
    return busy


def _run_dir(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    path = Path(tempfile.gettempdir()) / "warmstart" / f"restore-{name}-{stamp}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def restore(
    name: str,
    *,
    store: LocalStore,
    request: RestoreRequest | None = None,
    criu: Criu | None = None,
    listener: PhaseListener | None = None,
) -> RestoreResult:
    request = request or RestoreRequest()
    timer = Timer(listener)
    with timer.phase("checks"):
        criu = criu or find_criu()
        path = store.path_of(name)
        manifest = Manifest.load(path)
        compat.check_host(manifest, hostinfo.current(str(criu.version)))
        gpu_plan = GpuRestorePlan.for_manifest(manifest, request.gpu_map)
        if busy := _pids_in_use(manifest):
            raise UsageError(
                f"PID {busy[0]} is in use, and snapshot {name!r} needs it",
                hint="stop that process (an earlier restore of this snapshot?) and retry",
            )
    run_dir = _run_dir(name)
    log = run_dir / "restore.log"
    options = RestoreOptions(dump=DumpOptions.from_record(manifest.criu_options), leave_stopped=True)
    expected = [Expected(f.path, f.size, f.digest) for f in manifest.files]
    root_pid: int | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
        verifying = pool.submit(verify_files, path, expected) if request.verify else None
        try:
            with timer.phase("criu-restore"):
                root_pid = criu.restore(path / IMAGES_DIR, options, log=log)
            stats = RestoreStats.read(path / IMAGES_DIR)
            if stats:
                timer.add("  forking", stats.forking_s)
                timer.add("  restore", stats.restore_s, stats.pages_restored * 4096)
            if verifying is not None:
                with timer.phase("verify-wait"):
                    verified = verifying.result()
                timer.add("  verified", 0.0, verified)
            with timer.phase("resume"):
                proc.continue_tree(root_pid)
            if gpu_plan:
                with timer.phase("gpu-restore", sum(g.device_memory_bytes for g in manifest.gpus)):
                    gpu_plan.restore()
            if request.control_dir is not None:
                with timer.phase("handover"):
                    _hand_over(manifest, request, dict(gpu_plan.pairs) if gpu_plan else {})
        except BaseException:
            if verifying is not None:
                verifying.cancel()
            if root_pid is not None:
                proc.kill_tree(root_pid)
            raise
    timer.set_bytes("criu-restore", manifest.total_bytes)
    return RestoreResult(pid=root_pid, manifest=manifest, timer=timer, log=log)


def _hand_over(manifest: Manifest, request: RestoreRequest, gpu_map: dict[str, str] | None = None) -> None:
    control = Path(request.control_dir)  # type: ignore[arg-type]
    ctx = protocol.RestoreContext(
        snapshot_id=manifest.snapshot_id,
        snapshot_name=manifest.name,
        env=request.env,
        gpu_map=gpu_map or {},
        checkpoint_id=manifest.labels.get("checkpoint_id"),
    )
    # A marker left for the original must not be read by the restored copy.
    for stale in (protocol.SNAPSHOT_COMPLETE, protocol.SNAPSHOT_FAILED, protocol.READY_FOR_SNAPSHOT):
        (control / stale).unlink(missing_ok=True)
    protocol.signal_file(control, protocol.RESTORE_CONTEXT, ctx)
    protocol.signal_file(control, protocol.RESTORE_COMPLETE)
