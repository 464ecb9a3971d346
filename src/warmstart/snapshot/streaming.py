"""``restore URL`` with the download overlapped: restore while the page images arrive.

Pull-then-restore waits for the last chunk before CRIU starts. Here:

1. *fetch-meta*: the trust check, the manifest and every file except the page
   images (``images/pages-*.img`` and their compressed forms) arrive and are
   checked; so do the page runs CRIU reads itself in a lazy restore (those not
   flagged lazy: stacks, vDSO, shared memory), fetched ahead of the rest.
2. The rest of the page images streams in the background (file order, many
   threads) while CRIU rebuilds the tree and warmstart's page server fills
   memory: a fill read blocks until its chunks arrived and passed BLAKE3, or
   fetches them itself if no one has started them yet.
3. *fetch-wait* and *verify-wait*: the tasks resume only once every chunk is
   in and every file matches the manifest's digest (as in any restore); a
   failed download fails the restore and the stopped tree is killed.
4. *publish*: the complete snapshot becomes visible in the local store, as
   after ``warmstart pull``.

This needs the page server (snapshots without GPU state, on a host that
allows userfaultfd); otherwise the snapshot is pulled in full, then restored.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.host import process as proc
from warmstart.host.criu import Criu
from warmstart.snapshot.manifest import IMAGES_DIR, Manifest
from warmstart.snapshot.restore import RestoreRequest, RestoreResult, restore, uses_page_server
from warmstart.snapshot.timing import PhaseListener, Timer
from warmstart.snapshot.unpack import eager_runs
from warmstart.store.local import LocalStore
from warmstart.store.remote import Progress, RemoteStore
from warmstart.store.signing import TrustPolicy
from warmstart.store.stream import StreamingPull, StreamStats


@dataclass
class StreamedRestore:
    name: str
    result: RestoreResult
    #: The snapshot, published in the local store.
    path: Path
    stats: StreamStats
    #: False where the page server did not apply: pulled in full, then restored.
    overlapped: bool
    #: What happened, in order: "phase NAME" as each restore phase starts, "mark"
    #: when CRIU starts, "chunk PATH#I" as each chunk lands, "fetch-complete".
    events: list[str] = field(default_factory=list)

    def report(self) -> dict[str, object]:
        s = self.stats
        return {
            "overlapped": self.overlapped,
            "logical_bytes": s.logical_bytes,
            "meta_bytes": s.meta_bytes,
            "page_bytes": s.bulk_bytes,
            "page_bytes_before_restore": s.bulk_at_mark,
            "page_bytes_during_restore": s.overlapped_bytes,
            "fetched_bytes": s.fetched_bytes,
            "resumed_bytes": s.resumed_bytes,
            "on_demand_chunks": s.on_demand_chunks,
            "fetch_seconds": (s.done_at or s.opened_at) - s.opened_at,
            "seconds_fetching_while_restoring": _overlap_seconds(s),
        }


def _overlap_seconds(s: StreamStats) -> float:
    if s.marked_at is None or s.done_at is None:
        return 0.0
    return max(0.0, s.done_at - s.marked_at)


RequestFor = Callable[[Manifest], RestoreRequest]


def restore_streaming(
    remote: RemoteStore,
    name: str,
    *,
    local: LocalStore,
    request: RestoreRequest | RequestFor | None = None,
    trust: TrustPolicy | None = None,
    criu: Criu | None = None,
    listener: PhaseListener | None = None,
    progress: Progress | None = None,
    limit_rate: float | None = None,
    durable: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> StreamedRestore:
    """Restore snapshot ``name`` of ``remote`` while it downloads into ``local``.

    ``request`` may be a function of the manifest (the CLI takes the control
    directory from its labels); it is called once the manifest is in.
    """
    events: list[str] = []

    def note(what: str) -> None:
        events.append(what)
        if on_event is not None:
            on_event(what)

    pull = StreamingPull(
        remote,
        name,
        local,
        trust=trust,
        progress=progress or Progress(),
        limit_rate=limit_rate,
        on_event=note,
    )

    def on_phase(phase: str) -> None:
        note(f"phase {phase}")
        if phase == "criu-restore":
            pull.mark()
        if listener is not None:
            listener(phase)

    timer = Timer(on_phase)
    with timer.phase("fetch-meta"):
        manifest = pull.open()
        try:
            req = request(manifest) if callable(request) else request or RestoreRequest()
            overlapped = uses_page_server(req, manifest)
            if overlapped:
                _fetch_eager_runs(pull)
        except BaseException as exc:
            pull.abort(exc)
            raise
    timer.set_bytes("fetch-meta", pull.stats.fetched_bytes + pull.stats.resumed_bytes)
    local_name = pull.staging.name if pull.staging else name
    pull.start()
    try:
        if overlapped:
            result = restore(
                local_name, store=local, request=req, criu=criu, incoming=pull, timer=timer
            )
        else:
            with timer.phase("fetch", pull.stats.bulk_bytes):
                pull.wait()
            pull.publish(durable=durable)
            result = restore(local_name, store=local, request=req, criu=criu, timer=timer)
    except BaseException as exc:
        pull.abort(exc)
        raise
    if overlapped:
        try:
            with timer.phase("publish"):
                path = pull.publish(durable=durable)
        except BaseException as exc:
            proc.kill_tree(result.pid)
            pull.abort(exc)
            raise
        timer.add("  fetch overlapped", _overlap_seconds(pull.stats), pull.stats.overlapped_bytes)
    else:
        path = local.path_of(local_name)
    timer.stop()
    return StreamedRestore(local_name, result, path, pull.stats, overlapped, events)


def _fetch_eager_runs(pull: StreamingPull) -> int:
    """Fetch the page runs CRIU reads from the images itself (not the page server's); return their bytes."""
    images = pull.path / IMAGES_DIR
    jobs = []
    readers = []
    try:
        for raw_name, runs in eager_runs(images).items():
            reader = pull.open_pages(images / raw_name)
            readers.append(reader)
            jobs += [(reader, r.offset, r.length) for r in runs]
        with ThreadPoolExecutor(pull.remote.jobs, thread_name_prefix="stream-eager") as pool:
            list(pool.map(lambda job: job[0].prefetch(job[1], job[2]), jobs))
    finally:
        for reader in readers:
            reader.close()
    return sum(length for _r, _o, length in jobs)
