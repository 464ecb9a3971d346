"""Checkpoint a running process tree into the snapshot store.

Order of events, and what a failure at each step leaves behind:

1. validate the PID and pre-flight the tree (TCP, io_uring): nothing touched;
2. reserve a hidden staging directory in the store;
3. lock and checkpoint the GPU state of every CUDA process: on failure every
   process is restored and unlocked;
4. ``criu dump --leave-stopped`` while page images are hashed as they are
   written (and, for a durable snapshot, their write-back to disk started
   chunk by chunk): on failure the tree gets SIGCONT, its GPU state is
   restored and unlocked, the staging directory removed;
5. with ``leave_running``, the tree gets SIGCONT and its GPU state back now;
6. manifest written last, fsync (durability ``fsync``, the default), atomic
   rename: the snapshot becomes visible, never half of it;
7. only then, without ``leave_running``, the (still stopped) tree is killed:
   it never runs past the moment it was snapshotted.

If warmstart itself is killed at any point, a guard process
(:mod:`warmstart.snapshot.guard`) waits for CRIU, rolls the GPU state back
and resumes the tree; the staging directory is swept later.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from warmstart.errors import StoreError, UsageError
from warmstart.host import process as proc
from warmstart.host import sockets
from warmstart.host.criu import Criu, DumpOptions, find_criu
from warmstart.host.pagemap import RunsCache
from warmstart.host.stats import DumpStats
from warmstart.snapshot import gpu_state, hostinfo, prefetch
from warmstart.snapshot.guard import Guard
from warmstart.snapshot.manifest import (
    IMAGES_DIR,
    RUNS_FILE,
    Durability,
    FileEntry,
    Manifest,
    ProcessInfo,
    ProcessTree,
)
from warmstart.snapshot.timing import PhaseListener, Timer
from warmstart.store.compress import compress_file
from warmstart.store.integrity import PIECE_SIZE, FollowingDigester, digest_file
from warmstart.store.local import LocalStore, Staging
from warmstart.store.writeback import EarlyWriteback


@dataclass(frozen=True)
class CheckpointOptions:
    leave_running: bool = False
    dump: DumpOptions = field(default_factory=DumpOptions)
    #: How long to wait for the CUDA driver to lock a process (in-flight work).
    gpu_lock_timeout_s: float = 30.0
    #: fsync the snapshot before publishing it (durability ``fsync``). False
    #: (``none``) still publishes atomically, but a power loss can lose it.
    durable: bool = True
    #: With ``durable``: start the write-back of page images while CRIU writes
    #: them, so the fsync at publish only waits for the tail.
    early_writeback: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    #: Compress the page images (``zstd`` or ``lz4``; None keeps CRIU's raw files).
    compress: str | None = None
    #: Checkpoint sockets bound to a specific non-loopback address (the pod IP) anyway.
    allow_bound_ip: bool = False
    #: Punch runs of zero pages out of the page images as holes (same bytes,
    #: less disk, no reads of them on restore; warmstart.host.sparse).
    sparse: bool = True

    @property
    def durability(self) -> Durability:
        return "fsync" if self.durable else "none"


@dataclass(frozen=True)
class CheckpointResult:
    manifest: Manifest
    path: Path
    timer: Timer


def summarize_tree(pid: int, procs: list[psutil.Process] | None = None) -> ProcessTree:
    """The manifest's record of the tree of ``pid`` (``procs``: its processes, root first,
    when the caller has listed them already)."""
    infos: list[ProcessInfo] = []
    cmdline: list[str] = []
    for p in proc.tree_processes(pid) if procs is None else procs:
        try:
            with p.oneshot():
                infos.append(
                    ProcessInfo(
                        pid=p.pid,
                        ppid=p.ppid(),
                        name=p.name(),
                        threads=p.num_threads(),
                        rss_bytes=p.memory_info().rss,
                    )
                )
                if p.pid == pid:
                    cmdline = p.cmdline()
        except psutil.NoSuchProcess:
            continue
    return ProcessTree(root_pid=pid, processes=infos, cmdline=cmdline)


def uses_io_uring(pids: list[int], targets: dict[int, list[str]] | None = None) -> list[int]:
    """The PIDs holding an io_uring instance (``targets``: their fd targets, if read already)."""
    found = []
    for pid in pids:
        links = sockets.fd_targets(pid) if targets is None else targets.get(pid, [])
        if any("io_uring" in link for link in links):
            found.append(pid)
    return found


def preflight(pid: int, options: CheckpointOptions) -> list[int]:
    """Refuse what CRIU would fail on, naming it. Returns the tree's PIDs."""
    return [p.pid for p in inspect_tree(pid, options)]


def inspect_tree(pid: int, options: CheckpointOptions) -> list[psutil.Process]:
    """:func:`preflight`, returning the tree's processes (root first). The tree is
    listed once and each process's descriptors read once for every check."""
    proc.validate_root(pid)
    procs = proc.tree_processes(pid)
    pids = [p.pid for p in procs]
    targets = {p: sockets.fd_targets(p) for p in pids}
    inet = sockets.TreeSockets(pids, targets)
    if not (options.dump.tcp_established or options.dump.tcp_close):
        conns = inet.established_tcp()
        if conns:
            raise UsageError(
                f"established TCP connection {conns[0]}"
                + (f" (and {len(conns) - 1} more)" if len(conns) > 1 else ""),
                hint="close it before the checkpoint or pass --tcp-established / --tcp-close",
            )
    if not options.allow_bound_ip and (bound := inet.bound_to_specific_ip()):
        raise UsageError(
            f"{bound[0]} is bound to a specific address, which a restore in another "
            "network namespace cannot bind" + (f" (and {len(bound) - 1} more)" if len(bound) > 1 else ""),
            hint="bind 0.0.0.0, :: or loopback before the checkpoint point, "
            "or pass --allow-bound-ip (docs/agent.md)",
        )
    if uring := uses_io_uring(pids, targets):
        raise UsageError(
            f"PID {uring[0]} uses io_uring, which CRIU cannot checkpoint",
            hint="disable io_uring in the workload before its checkpoint point",
        )
    if proc.has_terminal(pids) and not options.dump.shell_job:
        raise UsageError(
            f"the tree of PID {pid} is attached to a terminal",
            hint="pass --shell-job, or start the workload detached (setsid, stdio to files)",
        )
    return procs


def default_name(pid: int, tree: ProcessTree | None = None) -> str:
    base = next((p.name for p in tree.processes if p.pid == pid), None) if tree else None
    if base is None:
        try:
            base = psutil.Process(pid).name()
        except psutil.NoSuchProcess:
            base = "snapshot"
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in base).strip("-.") or "snapshot"
    return f"{safe}-{stamp}"


def _add_criu_phases(timer: Timer, images: Path) -> None:
    stats = DumpStats.read(images)
    if stats is None:
        return
    timer.add("  freeze", stats.freezing_s)
    timer.add("  memdump", stats.memdump_s, stats.pages_scanned * 4096)
    timer.add("  memwrite", stats.memwrite_s, stats.pages_written * 4096)


def _record_runs(snapshot_dir: Path, images: Path) -> FileEntry:
    path = snapshot_dir / RUNS_FILE
    RunsCache.write(images, path)
    path.chmod(0o600)
    size, digest = digest_file(path)
    return FileEntry(path=RUNS_FILE, size=size, digest=digest)


def _compress_pages(
    images: Path, codec: str, digests: dict[str, tuple[int, str]]
) -> tuple[int, dict[str, tuple[int, str]]]:
    """Replace every pages image by its compressed form; (raw bytes, new digests)."""
    out = dict(digests)
    raw = 0
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="compress") as pool:
        for rel in sorted(r for r in digests if Path(r).match("pages-*.img")):
            raw += digests[rel][0]
            packed, size, digest = compress_file(images / rel, codec, pool)
            del out[rel]
            out[str(Path(rel).with_name(packed.name))] = (size, digest)
    return raw, out


def _early_writeback(images: Path, options: CheckpointOptions) -> AbstractContextManager[object]:
    # Raw page images that --compress replaces are not worth writing back.
    if options.durable and options.early_writeback and not options.compress:
        return EarlyWriteback(images)
    return nullcontext()


def checkpoint(
    pid: int,
    *,
    store: LocalStore,
    name: str | None = None,
    options: CheckpointOptions | None = None,
    criu: Criu | None = None,
    listener: PhaseListener | None = None,
    after_dump: Callable[[Staging], dict[str, Any]] | None = None,
) -> CheckpointResult:
    """Checkpoint the tree of ``pid``.

    ``after_dump`` runs right after the CRIU dump while the tree is still stopped
    (the container layer captures its filesystem changes there); it returns extra
    manifest fields, ``files`` being appended to the image files.
    """
    options = options or CheckpointOptions()
    criu = criu or find_criu()
    timer = Timer(listener)
    with timer.phase("preflight"):
        procs = inspect_tree(pid, options)
        pids = [p.pid for p in procs]
        tree = summarize_tree(pid, procs)
        name = name or default_name(pid, tree)
        staging = store.begin(name)

    gpu = gpu_state.GpuCheckpoint.for_tree(pids)
    guard = Guard.start(pids, gpu.pids if gpu else [])
    digester: FollowingDigester | None = None
    try:
        if gpu:
            with timer.phase("gpu-lock"):
                gpu.lock(options.gpu_lock_timeout_s)
            with timer.phase("gpu-checkpoint"):
                gpu.checkpoint()
            timer.set_bytes("gpu-checkpoint", gpu.device_bytes)
        digester = FollowingDigester(staging.images, sparse=options.sparse and not options.compress).start()
        with _early_writeback(staging.images, options), timer.phase("dump"):
            criu.dump(
                pid, staging.images, options.dump, log=staging.logs / "dump.log",
                on_start=guard.criu_started,
            )  # fmt: skip
        _add_criu_phases(timer, staging.images)
        with timer.phase("residency"):  # the tree is still stopped: its mappings hold still
            resident = prefetch.record(staging.path, pids)
        extra: dict[str, Any] = {}
        if after_dump is not None:
            with timer.phase("after-dump"):
                extra = after_dump(staging)
        if options.leave_running:
            with timer.phase("resume-original"):
                proc.continue_pids(pids)
                if gpu:
                    gpu.resume()
        with timer.phase("checksum"):
            digests = digester.finish()
            pieces = digester.pieces()
        with timer.phase("runs"):  # what the restore's page server would decode first
            runs = _record_runs(staging.path, staging.images)
        if options.compress:
            with timer.phase("compress"):
                raw, digests = _compress_pages(staging.images, options.compress, digests)
            timer.set_bytes("compress", raw)
        image_bytes = sum(size for size, _ in digests.values())
        timer.set_bytes("dump", image_bytes)
        manifest = Manifest(
            snapshot_id=uuid.uuid4().hex,
            name=name,
            created_at=dt.datetime.now(dt.UTC),
            source=hostinfo.current(str(criu.version)),
            tree=tree,
            files=[
                FileEntry(
                    path=f"{IMAGES_DIR}/{rel}", size=size, digest=digest,
                    pieces=pieces.get(rel, []), piece_size=PIECE_SIZE if rel in pieces else None,
                )  # fmt: skip
                for rel, (size, digest) in sorted(digests.items())
            ]
            + [resident, runs]
            + list(extra.pop("files", [])),
            gpus=gpu.records() if gpu else [],
            timings=timer.phases,
            criu_options=options.dump.as_record(),
            labels=options.labels,
            compression=options.compress,
            durability=options.durability,
            sparse_bytes=digester.punched,
            **extra,
        )
        with timer.phase("publish"):
            path = store.publish(staging, manifest, durable=options.durable)
        if not options.leave_running:
            # Stopped since the dump: it never runs past the snapshot. Its memory is
            # freed after we return; a restore here waits for its PIDs (wait_exits).
            with timer.phase("stop-original"):
                proc.kill_tree(pid, wait=False)
    except BaseException as exc:
        if digester is not None:
            digester.cancel()
        proc.continue_pids(pids)
        if gpu:
            gpu.rollback()
        store.abort(staging)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise StoreError(
                f"the snapshot store {store.root} is full",
                hint="free space there or choose another with --store",
            ) from None
        raise
    finally:
        guard.done()
    timer.stop()
    return CheckpointResult(manifest=manifest, path=path, timer=timer)
