"""Restore a snapshot from the store.

Everything that can refuse does so before a process exists: manifest format,
host and GPU compatibility, PIDs in use. Then CRIU restores the tree *stopped*
while every file is verified against its checksum on other cores; only when
all of it checks out do the tasks get SIGCONT (and their GPU state back). A
failure at any later step kills the restored tree: nothing half-restored runs.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from warmstart import protocol
from warmstart.errors import CriuError, SnapshotCorrupt, UsageError
from warmstart.host import process as proc
from warmstart.host import uffd
from warmstart.host.criu import Criu, DumpOptions, RestoreOptions, find_criu
from warmstart.host.filereads import FileReadahead
from warmstart.host.keeper import Keeper
from warmstart.host.pageserver import (
    FillStats,
    PageServer,
    PagesSource,
    served_pages_images,
    task_pids,
)
from warmstart.host.stats import RestoreStats
from warmstart.snapshot import compat, hostinfo
from warmstart.snapshot.gpu_state import GpuRestorePlan
from warmstart.snapshot.manifest import IMAGES_DIR, RUNS_FILE, Manifest
from warmstart.snapshot.prefetch import Prefetch
from warmstart.snapshot.timing import PhaseListener, Timer
from warmstart.snapshot.unpack import unpack_view
from warmstart.store.compress import open_pages
from warmstart.store.integrity import PIECE_SIZE, Expected, check_piece, check_size, verify_files
from warmstart.store.local import LocalStore


@dataclass(frozen=True)
class RestoreRequest:
    gpu_map: tuple[str, ...] = ()
    verify: bool = True
    #: Worker control directory: receives restore-context.json + restore-complete.
    control_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: Fill memory with warmstart's parallel page server instead of CRIU's
    #: single-threaded read (``None``: where this host allows userfaultfd).
    parallel_pages: bool | None = None
    #: Let the tree run (and get its GPU state back) while the page server is
    #: still filling; faults are served on demand. The hand-over waits for the
    #: fill and the checksums, so the worker serves nothing until both are done.
    lazy: bool = False
    #: Read the tree's recorded file pages (libraries) back into the page cache
    #: while its GPU state is restored (snapshot/prefetch.py). Off by default:
    #: no gain on the CPU worker, and slower cold on the GPU worker (it reads far
    #: more than the first token needs; docs/benchmarks.md).
    prefetch: bool = False
    #: Write the page server's trace of this restore here (every filled chunk and
    #: served fault, with times; ``bench/fill_trace.py`` summarizes it).
    pages_trace: Path | None = None
    #: Page-server threads (default: up to 16, one per core).
    page_threads: int | None = None
    #: Refuse when a PID of the snapshot's tree is in use here. Container restores
    #: turn it off: their tree gets its PIDs inside a fresh PID namespace.
    check_pids: bool = True
    #: Recorded PID -> PID of the restored process, where they differ (container restores).
    pid_map: Callable[[int], int] | None = None
    #: The directory the tree's file paths are relative to, as seen from here
    #: (a container's root for container restores): where the files CRIU will
    #: read are read ahead from.
    file_root: Path = Path("/")


class Incoming(Protocol):
    """A snapshot whose page images are still arriving (``restore URL`` streaming,
    snapshot/streaming.py): every other file is in ``path`` already."""

    @property
    def path(self) -> Path: ...
    @property
    def manifest(self) -> Manifest | None: ...
    def open_pages(self, path: Path) -> PagesSource: ...
    def wait(self) -> None:
        """Block until every byte is in and checked; raise if the download failed."""

    def abort(self, cause: BaseException) -> None:
        """The restore failed: stop the download (waiters raise)."""


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


def _use_parallel_pages(request: RestoreRequest) -> bool:
    if request.lazy and request.parallel_pages is False:
        raise UsageError("--lazy needs the page server", hint="drop --no-parallel-pages")
    if request.parallel_pages is None and not request.lazy:
        return uffd.available()
    if (request.parallel_pages or request.lazy) and not uffd.available():
        raise UsageError(
            "parallel page restore needs userfaultfd, which this host does not allow",
            hint="run as root with vm.unprivileged_userfaultfd or CAP_SYS_PTRACE, "
            "or pass --no-parallel-pages",
        )
    return True if request.lazy else bool(request.parallel_pages)


def uses_page_server(request: RestoreRequest, manifest: Manifest) -> bool:
    """Whether :func:`restore` fills memory with the page server (what a streaming restore needs)."""
    return _use_parallel_pages(request)


#: Restore run directories (CRIU's log, tens of MB at -v4 for a GPU worker) kept for
#: inspection: the newest ones, and any younger than an hour (restores still running).
KEEP_RUN_DIRS = 16
_KEEP_RUN_DIRS_S = 3600.0


def _run_dir(name: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    parent = Path(tempfile.gettempdir()) / "warmstart"
    path = parent / f"restore-{name}-{stamp}"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    prune_run_dirs(parent)
    return path


def prune_run_dirs(parent: Path, keep: int = KEEP_RUN_DIRS, min_age_s: float = _KEEP_RUN_DIRS_S) -> int:
    """Remove old restore run directories beyond the newest ``keep``; return how many went."""
    now = time.time()
    dirs: list[tuple[float, Path]] = []
    for d in parent.glob("restore-*"):
        try:
            dirs.append((d.stat().st_mtime, d))
        except OSError:
            continue
    dirs.sort(reverse=True)
    removed = 0
    for mtime, d in dirs[keep:]:
        if now - mtime > min_age_s:
            shutil.rmtree(d, ignore_errors=True)
            removed += 1
    return removed


def _check(manifest: Manifest, request: RestoreRequest, criu: Criu) -> GpuRestorePlan | None:
    """Everything that can refuse before a process exists; returns the GPU plan."""
    compat.check_host(manifest, hostinfo.current(str(criu.version)))
    gpu_plan = GpuRestorePlan.for_manifest(manifest, request.gpu_map)
    if request.check_pids:  # the original may still be exiting (a checkpoint just now)
        proc.wait_exits(p.pid for p in manifest.tree.processes)
    if request.check_pids and (busy := _pids_in_use(manifest)):
        raise UsageError(
            f"PID {busy[0]} is in use, and snapshot {manifest.name!r} needs it",
            hint="stop that process (an earlier restore of this snapshot?) and retry",
        )
    return gpu_plan


def _clear_markers(control: Path) -> None:
    """Markers left for the original, or by an earlier restore of this snapshot,
    must not be read by this copy once it runs: only its own hand-over counts."""
    for stale in (
        protocol.SNAPSHOT_COMPLETE,
        protocol.SNAPSHOT_FAILED,
        protocol.READY_FOR_SNAPSHOT,
        protocol.RESTORE_COMPLETE,
        protocol.RESTORE_CONTEXT,
    ):
        (control / stale).unlink(missing_ok=True)


def restore(
    name: str,
    *,
    store: LocalStore,
    request: RestoreRequest | None = None,
    criu: Criu | None = None,
    listener: PhaseListener | None = None,
    incoming: Incoming | None = None,
    timer: Timer | None = None,
) -> RestoreResult:
    """Restore snapshot ``name`` of ``store``, or the one still arriving in ``incoming``
    (page-server restores only: its pages are read as they arrive, and the
    tasks resume only once all of it is in and verified)."""
    request = request or RestoreRequest()
    timer = timer or Timer(listener)
    with timer.phase("checks"):
        criu = criu or find_criu()
        path = incoming.path if incoming else store.path_of(name)
        manifest = (incoming.manifest if incoming else None) or Manifest.load(path)
        gpu_plan = _check(manifest, request, criu)
        expected = [
            Expected(f.path, f.size, f.digest, tuple(f.pieces) if f.piece_size == PIECE_SIZE else ())
            for f in manifest.files
        ]
        if incoming is None:  # a file of the wrong size is refused before CRIU reads it (a short
            for e in expected:  # pages image makes CRIU 4.1 spin, writing its log until the disk is full)
                check_size(path, e)
    run_dir = _run_dir(name)
    log = run_dir / "restore.log"
    parallel = _use_parallel_pages(request)
    if incoming is not None and not parallel:
        raise UsageError(
            "a streaming restore needs the parallel page server", hint="pull, then restore"
        )
    options = RestoreOptions(
        dump=DumpOptions.from_record(manifest.criu_options),
        leave_stopped=True,
        lazy_pages=parallel,
        work_dir=run_dir if parallel else None,
    )
    root_pid: int | None = None
    images = path / IMAGES_DIR
    criu_images = images
    if manifest.compression:
        with timer.phase("unpack"):
            criu_images = run_dir / "images"
            unpacked = unpack_view(images, criu_images, lazy=parallel)
        timer.set_bytes("unpack", unpacked)
    preparing = time.perf_counter()
    with ExitStack() as stack:
        if criu_images != images:  # the unpacked view is only CRIU's to read
            stack.callback(shutil.rmtree, criu_images, ignore_errors=True)
        pool = stack.enter_context(ThreadPoolExecutor(max_workers=2, thread_name_prefix="restore"))
        # Pages images the page server fills from are checked by the fill itself, piece by piece
        # from the page cache it just read; everything else on a pool beside CRIU.
        fill_check = (
            _FillCheck.for_images(path, images, expected)
            if parallel and request.verify and incoming is None and not manifest.compression
            else None
        )
        rest = [e for e in expected if fill_check is None or e not in fill_check]
        server = (
            stack.enter_context(
                PageServer(
                    images,
                    run_dir,
                    threads=request.page_threads,
                    open_pages=incoming.open_pages if incoming else open_pages,
                    check=fill_check,
                    check_size=PIECE_SIZE,
                    readahead=incoming is None,  # a streamed image is read as it arrives
                    trace=request.pages_trace,
                    # decoded pagemaps, when the snapshot has them here (checked with the rest)
                    runs_cache=path / RUNS_FILE if incoming is None else None,
                )
            )
            if parallel
            else None
        )
        # The page server's parse of the pagemaps goes first: CRIU's restorer waits on it
        # for its first faults, and the checks below are Python work that competes for the GIL.
        parsed = server.wait_prepared if server is not None else None
        verifying = pool.submit(_verify, incoming, path, rest, parsed) if request.verify else None
        filling: Future[FillStats] | None = None
        keeper: Keeper | None = None
        readahead: Prefetch | None = None
        # What CRIU will read of the tree's own files (lookups, copy-on-write pages): ahead of it.
        pids = server.expected_pids() if server is not None else task_pids(criu_images)  # listed once
        file_reads = FileReadahead(criu_images, sorted(pids), root=request.file_root,
                                   pagemaps=server.pagemap if server is not None else None,
                                   after_lookups=parsed).start()  # fmt: skip
        filled_bytes = 0
        timer.add("prepare", time.perf_counter() - preparing)
        try:
            with timer.phase("criu-restore"):
                if server is not None:
                    server.mark("criu-start")
                root_pid = criu.restore(criu_images, options, log=log)
                if server is not None:
                    server.mark("criu-returned")
            stats = RestoreStats.read(criu_images)
            if stats:
                timer.add("  forking", stats.forking_s)
                timer.add("  restore", stats.restore_s, stats.pages_restored * 4096)
            if server is not None and not request.lazy:
                with timer.phase("page-fill"):
                    filled_bytes = server.fill().bytes
                    server.close()
                timer.set_bytes("page-fill", filled_bytes)
            if incoming is not None and filling is None:
                _wait_fetched(timer, incoming)
            if verifying is not None and filling is None:
                _wait_verified(timer, verifying, fill_check)
            if request.control_dir is not None:
                _clear_markers(Path(request.control_dir))
            if server is not None and request.lazy:  # the fill outlives this process if it is killed
                keeper = stack.enter_context(_keeper(server, root_pid))
            with timer.phase("resume"):
                proc.continue_tree(root_pid)
            # The worker's mapped files (libraries): read in beside the GPU restore,
            # not faulted in from disk one page at a time once it runs.
            readahead = Prefetch.start(path) if request.prefetch else None
            if server is not None and request.lazy:  # after the resume: it walks /proc under the GIL
                server.tasks_resumed()
                filling = pool.submit(server.fill)
            if gpu_plan:
                with timer.phase("gpu-restore", sum(g.device_memory_bytes for g in manifest.gpus)):
                    if request.pid_map is not None:
                        gpu_plan = gpu_plan.with_pids(request.pid_map)
                    gpu_plan.restore()
            if filling is not None and server is not None:
                with timer.phase("page-fill-wait"):
                    filled_bytes = filling.result().bytes
                    if keeper is not None:
                        keeper.release()  # every page is placed
                    server.close()
                timer.set_bytes("page-fill-wait", filled_bytes)
                if incoming is not None:
                    _wait_fetched(timer, incoming)
                if verifying is not None:
                    _wait_verified(timer, verifying, fill_check)
            if request.control_dir is not None:
                with timer.phase("handover"):
                    _hand_over(manifest, request, dict(gpu_plan.pairs) if gpu_plan else {})
        except BaseException as exc:
            for pending in (verifying, filling):
                if pending is not None:
                    pending.cancel()
            if root_pid is not None:
                proc.kill_tree(root_pid)  # before the page server closes: no task reads a missing page
            if keeper is not None:
                keeper.release()  # the tree is dead (if killing it failed, leaving the stack aborts)
            if server is not None:
                server.close()
            if incoming is not None:
                incoming.abort(exc)
            raise
        finishing = time.perf_counter()
    timer.add("finish", time.perf_counter() - finishing)
    if not manifest.compression:
        timer.set_bytes("criu-restore", manifest.total_bytes - filled_bytes)
    if file_reads.done.is_set():
        timer.add("  file-readahead", 0.0, file_reads.bytes)
    if readahead is not None and readahead.done.is_set():
        timer.add("  prefetch", 0.0, readahead.requested)
    timer.stop()
    return RestoreResult(pid=root_pid, manifest=manifest, timer=timer, log=log)


def _keeper(server: PageServer, root_pid: int, timeout: float = 5.0) -> Keeper:
    """A keeper of every task's userfaultfd (host/keeper.py), to start before any task runs.

    CRIU has sent every descriptor when it returns, but the last ones may still be on
    their way into the page server: wait for them, as :meth:`PageServer.fill` does."""
    expected = server.expected_pids()
    deadline = time.monotonic() + timeout
    while not expected <= (fds := server.task_fds()).keys():
        if time.monotonic() > deadline:
            missing = sorted(expected - fds.keys())
            raise CriuError(
                f"CRIU never handed over the memory of PID {missing[0]}", hint="retry the restore"
            )
        time.sleep(0.0005)
    return Keeper.start(list(fds.values()), [p.pid for p in proc.tree_processes(root_pid)])


def _wait_verified(timer: Timer, verifying: Future[int], fill_check: _FillCheck | None = None) -> None:
    with timer.phase("verify-wait"):
        verified = verifying.result()
    timer.add("  verified", 0.0, verified + (fill_check.checked if fill_check else 0))


class _FillCheck:
    """The page server's per-piece check of the pages images it fills from (their piece digests)."""

    def __init__(self, root: Path, by_image: dict[Path, Expected]) -> None:
        self.root = root
        self.by_image = by_image
        self.checked = 0
        self._lock = threading.Lock()

    @classmethod
    def for_images(cls, root: Path, images: Path, expected: list[Expected]) -> _FillCheck | None:
        served = served_pages_images(images)
        by_image = {root / e.path: e for e in expected if root / e.path in served and _whole(root, e)}
        return cls(root, by_image) if by_image else None

    def __contains__(self, e: Expected) -> bool:
        return self.root / e.path in self.by_image

    def __call__(self, image: Path, offset: int, length: int) -> None:
        e = self.by_image.get(image)
        if e is None:
            return
        if offset % PIECE_SIZE or length != min(PIECE_SIZE, e.size - offset):
            raise SnapshotCorrupt(f"snapshot file {e.path} is not the size its manifest says",
                                  hint="the snapshot is damaged; take a new one")  # fmt: skip
        check_piece(self.root, e, offset // PIECE_SIZE)
        with self._lock:
            self.checked += length


def _whole(root: Path, e: Expected) -> bool:
    """Whether a file has all its piece digests (else the full check beside CRIU says what is wrong)."""
    return bool(e.pieces) and len(e.pieces) == -(-e.size // PIECE_SIZE)


def _wait_fetched(timer: Timer, incoming: Incoming) -> None:
    with timer.phase("fetch-wait"):
        incoming.wait()


def _verify(
    incoming: Incoming | None, path: Path, expected: list[Expected], first: Callable[[], object] | None = None
) -> int:
    if first is not None:
        first()
    if incoming is not None:
        incoming.wait()
    return verify_files(path, expected)


def _hand_over(manifest: Manifest, request: RestoreRequest, gpu_map: dict[str, str] | None = None) -> None:
    control = Path(request.control_dir)  # type: ignore[arg-type]
    ctx = protocol.RestoreContext(
        snapshot_id=manifest.snapshot_id,
        snapshot_name=manifest.name,
        env=request.env,
        gpu_map=gpu_map or {},
        checkpoint_id=manifest.labels.get("checkpoint_id"),
    )
    protocol.signal_file(control, protocol.RESTORE_CONTEXT, ctx)
    protocol.signal_file(control, protocol.RESTORE_COMPLETE)
