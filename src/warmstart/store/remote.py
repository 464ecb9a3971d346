"""A remote (shared or object) store: deduplicated chunks plus one index per snapshot.

Layout below the store URL::

    chunks/ab/ab12...ef      a chunk, named by the BLAKE3 of its bytes
    snapshots/NAME.json      a published snapshot: its envelope (index + signature)
    locks/push-ID.json       lease of a push in progress (refreshed while it runs)
    locks/gc-ID.json         lease of a garbage collection in progress
    gc-last.json             written by every collection that reached its delete phase

The local :class:`~warmstart.store.local.LocalStore` stays the working store
that checkpoint and restore use; this is the transfer layer. ``push`` chunks a
published local snapshot, uploads the chunks the store lacks, and then
publishes the index with one exclusive put: a half-pushed snapshot is
invisible, and chunks already present (from another snapshot or from a killed
push) are not sent again. ``pull`` checks the index's signature against the
node's trust policy *before fetching anything*, verifies every chunk's BLAKE3
as it arrives, writes into a local staging directory (resumable) and publishes
it locally.

Garbage collection and pushes exclude each other by leases, announce-then-look:
a push writes its lease and then waits while a collection's lease is live; a
collection writes its lease and then gives up while any push's lease is live.
With a strongly consistent store (a POSIX file system; S3 since 2020) one of
the two always sees the other, and the push wins. A collection also never
deletes a chunk younger than its grace period.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import blake3
from pydantic import ValidationError

from warmstart.errors import NotFoundError, SnapshotCorrupt, StoreError, UsageError
from warmstart.host.sparse import write_sparse
from warmstart.snapshot.manifest import MANIFEST_NAME, Manifest
from warmstart.store.backend import Backend, ObjectExists, ObjectInfo, ObjectMissing, open_backend
from warmstart.store.chunking import DEFAULT_PARAMS, ChunkParams, chunks
from warmstart.store.index import (
    ChunkRef,
    Envelope,
    FileRef,
    SnapshotIndex,
    parse_envelope,
)
from warmstart.store.local import LocalStore, check_name
from warmstart.store.signing import SigningKey, TrustDecision, TrustPolicy

LEASE_TTL = 300.0
HEARTBEAT = 30.0
GC_GRACE = 3600.0


class StoreBusy(StoreError):
    """Another writer holds a lease that excludes this operation."""


def chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def index_key(name: str) -> str:
    return f"snapshots/{name}.json"


def create_sized(root: Path, rel: str, size: int, mode: int) -> int:
    """Create ``root/rel`` (owner-only) at its final ``size``; return its descriptor."""
    fd = _create(root, rel)
    try:
        os.fchmod(fd, mode & 0o700)
        os.ftruncate(fd, size)
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot write {root / rel}: {exc.strerror}") from None
    return fd


def check_pulled_manifest(name: str, manifest: Manifest | None, index: SnapshotIndex) -> Manifest:
    """The manifest a pull fetched, checked against the index it came with."""
    assert manifest is not None  # the index validator requires it
    if manifest.snapshot_id != index.snapshot_id:
        raise SnapshotCorrupt(
            f"{name}: the manifest's snapshot id {manifest.snapshot_id} is not the index's",
            hint="the pushed snapshot is inconsistent; push it again",
        )
    listed = {f.path for f in index.files}
    missing = [f.path for f in manifest.files if f.path not in listed]
    if missing:
        raise SnapshotCorrupt(
            f"{name}: {missing[0]} is in the manifest but was not pushed",
            hint="push the snapshot again",
        )
    return manifest


def _digest(data: bytes | memoryview) -> str:
    return blake3.blake3(data).hexdigest()


def _create(root: Path, rel: str) -> int:
    """Open ``root/rel`` for writing (0600), its missing directories 0700; never through a symlink."""
    path = root
    try:
        for part in rel.split("/")[:-1]:
            path = path / part
            try:
                path.mkdir(mode=0o700)
            except FileExistsError:
                pass
        return os.open(root / rel, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except (IsADirectoryError, NotADirectoryError, FileExistsError):
        raise SnapshotCorrupt(
            f"the index lists {rel} where the snapshot has a directory or a file already",
            hint="the pushed snapshot is malformed; do not restore it",
        ) from None
    except OSError as exc:
        raise StoreError(f"cannot write {root / rel}: {exc.strerror}") from None


class Progress:
    """Receives transfer progress; the CLI draws a bar from it."""

    def start(self, total: int, what: str) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        pass


class RateLimit:
    """A shared byte budget per second (``--limit-rate``)."""

    def __init__(self, bytes_per_s: float) -> None:
        self.rate = bytes_per_s
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + nbytes / self.rate
        if start + nbytes / self.rate > now:
            time.sleep(start + nbytes / self.rate - now)


@dataclass
class PushResult:
    name: str
    url: str
    logical_bytes: int = 0
    uploaded_bytes: int = 0
    chunks: int = 0
    uploaded_chunks: int = 0
    present_chunks: int = 0
    seconds: float = 0.0
    signed_by: str | None = None
    already_pushed: bool = False


@dataclass
class PullResult:
    name: str
    path: Path
    url: str
    logical_bytes: int = 0
    fetched_bytes: int = 0
    resumed_bytes: int = 0
    chunks: int = 0
    seconds: float = 0.0
    trust: TrustDecision | None = None


@dataclass
class RemoteSnapshot:
    name: str
    snapshot_id: str | None
    logical_bytes: int | None
    pushed_at: dt.datetime | None
    pushed_from: str | None
    signed_by: str | None
    error: str | None = None


@dataclass
class StoreStats:
    url: str
    snapshots: int
    logical_bytes: int
    stored_bytes: int
    chunks: int
    referenced_bytes: int
    unreferenced_chunks: int
    unreferenced_bytes: int
    pushes_in_progress: int
    broken_snapshots: list[str] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.referenced_bytes if self.referenced_bytes else 1.0


@dataclass
class VerifyResult:
    url: str
    chunks: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)
    repaired: bool = False


@dataclass
class GcResult:
    url: str
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    kept_young_chunks: int = 0
    referenced_chunks: int = 0
    dry_run: bool = False


class Lease:
    """``locks/KIND-ID.json``, re-written every ``heartbeat`` seconds until released."""

    def __init__(self, backend: Backend, kind: str, what: str, *, heartbeat: float) -> None:
        self.backend = backend
        self.key = f"locks/{kind}-{uuid.uuid4().hex}.json"
        self.body = json.dumps(
            {"kind": kind, "what": what, "host": socket.gethostname(), "pid": os.getpid(), "id": self.key}
        ).encode()
        self.heartbeat = heartbeat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="lease", daemon=True)

    def refresh(self) -> float:
        """Re-write the lease; return its modification time (the server's 'now')."""
        self.backend.put(self.key, self.body)
        info = self.backend.head(self.key)
        if info is None:
            raise StoreError(f"lease {self.key} vanished right after it was written")
        return info.mtime

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                self.refresh()
            except StoreError:
                continue

    def __enter__(self) -> Lease:
        self.now = self.refresh()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.backend.delete(self.key)
        except StoreError:
            pass


class _Bounded:
    """A thread pool that holds at most ``limit`` tasks (and their buffers) at once."""

    def __init__(self, jobs: int) -> None:
        self.pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="transfer")
        self.slots = threading.BoundedSemaphore(jobs * 2)
        self.futures: list[Future] = []
        self.failed = threading.Event()

    def submit(self, fn: Callable, *args: object) -> Future:
        self.slots.acquire()
        if self.failed.is_set():
            self.slots.release()
            self.raise_first()
        fut = self.pool.submit(fn, *args)

        def done(f: Future) -> None:
            self.slots.release()
            if f.exception() is not None:
                self.failed.set()

        fut.add_done_callback(done)
        self.futures.append(fut)
        return fut

    def raise_first(self) -> None:
        for f in self.futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    def wait(self) -> None:
        for f in self.futures:
            f.result()

    def close(self) -> None:
        for f in self.futures:
            f.cancel()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RemoteStore:
    def __init__(
        self,
        backend: Backend,
        *,
        jobs: int = 8,
        lease_ttl: float = LEASE_TTL,
        heartbeat: float = HEARTBEAT,
    ) -> None:
        self.backend = backend
        self.jobs = max(1, jobs)
        self.lease_ttl = lease_ttl
        self.heartbeat = heartbeat

    @classmethod
    def open(cls, url: str, *, jobs: int = 8, **kwargs: float) -> RemoteStore:
        return cls(open_backend(url, connections=max(10, jobs * 2)), jobs=jobs, **kwargs)

    @property
    def url(self) -> str:
        return self.backend.url

    def __repr__(self) -> str:
        return f"RemoteStore({self.url!r})"

    # -- leases ------------------------------------------------------------
    def _live(self, kind: str, now: float) -> list[str]:
        return [
            o.key
            for o in self.backend.list("locks/")
            if o.key.startswith(f"locks/{kind}-") and now - o.mtime < self.lease_ttl
        ]

    def _gc_mark(self) -> bytes | None:
        """Who collected last (each collection writes its unique lease body)."""
        try:
            return self.backend.get("gc-last.json")
        except ObjectMissing:
            return None

    def _outlive_gcs(self, lease: Lease, deadline: float) -> None:
        """Wait until the collections whose leases are live now are over.

        Collections that start later see this push's (fresh) lease and back
        off, so only those already running matter; waiting for "no live gc
        lease at all" could starve behind a collector that keeps retrying.
        """
        running = set(self._live("gc", lease.refresh()))
        while running:
            if time.monotonic() > deadline:
                raise StoreBusy(
                    f"{self.url} is being garbage-collected",
                    hint="push again in a minute (chunks already sent are kept)",
                )
            time.sleep(min(0.5, self.heartbeat))
            running &= set(self._live("gc", lease.refresh()))

    @contextmanager
    def _push_lease(self, name: str, *, wait: float) -> Iterator[Lease]:
        with Lease(self.backend, "push", name, heartbeat=self.heartbeat) as lease:
            lease.deadline = time.monotonic() + wait  # type: ignore[attr-defined]
            self._outlive_gcs(lease, lease.deadline)  # type: ignore[attr-defined]
            lease.gc_seen = self._gc_mark()  # type: ignore[attr-defined]
            yield lease

    # -- push --------------------------------------------------------------
    def push(
        self,
        local: LocalStore,
        name: str,
        *,
        as_name: str | None = None,
        sign: SigningKey | None = None,
        params: ChunkParams = DEFAULT_PARAMS,
        progress: Progress | None = None,
        limit_rate: float | None = None,
        gc_wait: float = 600.0,
    ) -> PushResult:
        """Upload local snapshot ``name``; publish it as ``as_name`` (default: the same)."""
        t0 = time.perf_counter()
        remote_name = check_name(as_name or name)
        path = local.path_of(name)
        manifest = Manifest.load(path)
        result = PushResult(remote_name, self.url)
        existing = self._read_envelope(remote_name, missing_ok=True)
        if existing is not None:
            idx = existing.parse_index(where=f"{self.url}/{index_key(remote_name)}")
            if idx.snapshot_id == manifest.snapshot_id:
                result.already_pushed = True
                result.logical_bytes = idx.logical_bytes
                result.chunks = len(idx.chunk_sizes())
                return result
            raise UsageError(
                f"snapshot {remote_name!r} already exists in {self.url} (another snapshot id)",
                hint="push it under another name with --as, or remove it with `warmstart store rm`",
            )
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not p.is_symlink() and not p.relative_to(path).parts[0].startswith(".")
        )
        progress = progress or Progress()
        progress.start(sum(p.stat().st_size for p in files), f"push {remote_name}")
        limiter = RateLimit(limit_rate) if limit_rate else None
        seen: set[str] = set()
        lock = threading.Lock()

        def upload(data: bytes) -> ChunkRef:
            digest = _digest(data)
            with lock:
                first = digest not in seen
                seen.add(digest)
            key = chunk_key(digest)
            if first:
                info = self.backend.head(key)
                if info is None or info.size != len(data):
                    if limiter:
                        limiter.take(len(data))
                    self.backend.put(key, data)
                    with lock:
                        result.uploaded_chunks += 1
                        result.uploaded_bytes += len(data)
                else:
                    with lock:
                        result.present_chunks += 1
            progress.advance(len(data))
            return ChunkRef(digest=digest, size=len(data))

        with self._push_lease(remote_name, wait=gc_wait) as lease:
            pool = _Bounded(self.jobs)
            try:
                planned: list[tuple[Path, os.stat_result, list[Future]]] = []
                for p in files:
                    futs = []
                    with open(p, "rb") as f:
                        st = os.fstat(f.fileno())
                        for data in chunks(f, params):
                            futs.append(pool.submit(upload, data))
                    planned.append((p, st, futs))
                pool.wait()
            finally:
                pool.close()
            try:
                index = SnapshotIndex(
                    name=remote_name,
                    snapshot_id=manifest.snapshot_id,
                    created_at=manifest.created_at,
                    pushed_at=dt.datetime.now(dt.timezone.utc),
                    pushed_from=socket.gethostname()[:256],
                    files=[
                        FileRef(
                            path=str(p.relative_to(path)),
                            size=sum(f.result().size for f in futs),
                            mode=st.st_mode & 0o777,
                            chunks=[f.result() for f in futs],
                        )
                        for p, st, futs in planned
                    ],
                )
            except ValidationError as exc:
                raise self._unindexable(remote_name, exc) from None
            self.backend.flush()  # chunks durable before the index that names them
            body = index.to_bytes()
            envelope = Envelope(index=body.decode(), signature=sign.sign(body) if sign else None)
            # A collection that ran while this push's lease had lapsed (stalled
            # past the TTL) may have removed chunks found present: never
            # publish an index that could name them. Collections running now
            # either back off (they see the fresh lease) or started while it
            # had lapsed and will change the mark: wait for them, then compare.
            self._outlive_gcs(lease, time.monotonic() + self.lease_ttl)
            if self._gc_mark() != lease.gc_seen:  # type: ignore[attr-defined]
                raise StoreBusy(
                    f"a garbage collection of {self.url} ran while this push was stalled",
                    hint="push again (chunks already sent are skipped)",
                )
            try:
                self.backend.put(index_key(remote_name), envelope.to_bytes(), exclusive=True)
            except ObjectExists:
                raise UsageError(
                    f"snapshot {remote_name!r} was pushed to {self.url} by someone else meanwhile",
                    hint="push it under another name with --as",
                ) from None
        result.logical_bytes = index.logical_bytes
        result.chunks = len(index.chunk_sizes())
        result.signed_by = envelope.signature.key_id if envelope.signature else None
        result.seconds = time.perf_counter() - t0
        return result

    @staticmethod
    def _unindexable(name: str, exc: ValidationError) -> StoreError:
        first = exc.errors()[0]
        return StoreError(
            f"cannot index snapshot {name!r}: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}",
            hint="the local snapshot directory holds a file a remote store cannot name",
        )

    # -- reading -------------------------------------------------------------
    def _read_envelope(self, name: str, *, missing_ok: bool = False) -> Envelope | None:
        check_name(name)
        try:
            data = self.backend.get(index_key(name))
        except ObjectMissing:
            if missing_ok:
                return None
            raise NotFoundError(
                f"snapshot {name!r} not found in {self.url}",
                hint="list the store with `warmstart store ls URL`",
            ) from None
        return parse_envelope(data, where=f"{self.url}/{index_key(name)}")

    def open_index(self, name: str, trust: TrustPolicy) -> tuple[SnapshotIndex, TrustDecision]:
        """The index of ``name``, after the trust check (which runs first)."""
        envelope = self._read_envelope(name)
        assert envelope is not None
        decision = trust.check(envelope, what=f"snapshot {name!r} in {self.url}")
        index = envelope.parse_index(where=f"{self.url}/{index_key(name)}")
        if index.name != name:
            raise SnapshotCorrupt(
                f"{self.url}/{index_key(name)} holds the index of {index.name!r}",
                hint="the index was copied or renamed; do not restore it",
            )
        return index, decision

    def snapshots(self) -> list[RemoteSnapshot]:
        out = []
        for obj in sorted(self.backend.list("snapshots/"), key=lambda o: o.key):
            if not obj.key.endswith(".json"):
                continue
            name = obj.key.removeprefix("snapshots/").removesuffix(".json")
            try:
                env = self._read_envelope(name)
                assert env is not None
                idx = env.parse_index()
            except ObjectMissing:
                continue
            except (SnapshotCorrupt, UsageError) as exc:
                out.append(RemoteSnapshot(name, None, None, None, None, None, error=str(exc)))
                continue
            out.append(
                RemoteSnapshot(
                    name,
                    idx.snapshot_id,
                    idx.logical_bytes,
                    idx.pushed_at,
                    idx.pushed_from,
                    env.signature.key_id if env.signature else None,
                )
            )
        return out

    def remove(self, name: str) -> None:
        self._read_envelope(name)
        self.backend.delete(index_key(name))

    # -- pull --------------------------------------------------------------
    def pull(
        self,
        name: str,
        local: LocalStore,
        *,
        as_name: str | None = None,
        trust: TrustPolicy | None = None,
        progress: Progress | None = None,
        limit_rate: float | None = None,
        durable: bool = True,
    ) -> PullResult:
        """Fetch snapshot ``name`` into ``local`` (as ``as_name``); resumes an interrupted pull."""
        t0 = time.perf_counter()
        trust = trust or TrustPolicy.from_env()
        index, decision = self.open_index(name, trust)
        local_name = check_name(as_name or name)
        tag = "pull-" + _digest(index.to_bytes())[:24]
        staging, resumed = local.begin_resumable(local_name, tag)
        result = PullResult(local_name, staging.path, self.url, trust=decision)
        result.logical_bytes = index.logical_bytes
        result.chunks = len(index.chunk_sizes())
        progress = progress or Progress()
        progress.start(index.logical_bytes, f"pull {name}")
        limiter = RateLimit(limit_rate) if limit_rate else None
        lock = threading.Lock()

        def fetch(ref: ChunkRef, where: str) -> bytes:
            data = self.fetch_chunk(ref, where, limiter)
            with lock:
                result.fetched_bytes += len(data)
            return data

        def place(fd: int, ref: ChunkRef, offset: int, where: str) -> None:
            if resumed:
                have = os.pread(fd, ref.size, offset)
                if len(have) == ref.size and _digest(have) == ref.digest:
                    with lock:
                        result.resumed_bytes += ref.size
                    progress.advance(ref.size)
                    return
            data = fetch(ref, where)
            try:
                write_sparse(fd, data, offset)  # zero runs stay holes, as at checkpoint
            except OSError as exc:
                raise StoreError(
                    f"cannot write {staging.path / where}: {exc.strerror}",
                    hint="free space in the local store and pull again (it resumes)",
                ) from None
            progress.advance(ref.size)

        manifest: Manifest | None = None
        fds: list[int] = []
        pool = _Bounded(self.jobs)
        ok = False
        try:
            for f in index.files:
                if f.path == MANIFEST_NAME:
                    manifest = Manifest.from_json(
                        b"".join(fetch(c, f.path) for c in f.chunks), where=f"{self.url} {name}/{f.path}"
                    )
                    progress.advance(f.size)
                    continue
                fd = create_sized(staging.path, f.path, f.size, f.mode)
                fds.append(fd)
                offset = 0
                for c in f.chunks:
                    pool.submit(place, fd, c, offset, f.path)
                    offset += c.size
            pool.wait()
            manifest = check_pulled_manifest(name, manifest, index)
            ok = True
        except (SnapshotCorrupt, UsageError):
            pool.close()
            local.abort(staging)
            raise
        finally:
            pool.close()
            for fd in fds:
                os.close(fd)
        if ok:
            result.path = local.publish(staging, manifest, durable=durable)
        result.seconds = time.perf_counter() - t0
        return result

    def fetch_chunk(self, ref: ChunkRef, where: str, limiter: RateLimit | None = None) -> bytes:
        """One chunk's bytes, checked against its BLAKE3 (``where``: the file it belongs to)."""
        if limiter:
            limiter.take(ref.size)
        try:
            data = self.backend.get(chunk_key(ref.digest))
        except ObjectMissing:
            raise SnapshotCorrupt(
                f"chunk {ref.digest[:16]}… of {where} is missing from {self.url}",
                hint="the store lost data (removed by hand?); push the snapshot again",
            ) from None
        if len(data) != ref.size or _digest(data) != ref.digest:
            raise SnapshotCorrupt(
                f"chunk {ref.digest[:16]}… of {where} fails its BLAKE3 check",
                hint="the store holds a damaged chunk; push the snapshot again",
            )
        return data

    def verify(self, *, repair: bool = False, progress: Progress | None = None) -> VerifyResult:
        """Read every chunk back and check its BLAKE3; with ``repair``, delete the bad ones.

        A deleted chunk is sent again by the next push of any snapshot that has it.
        """
        result = VerifyResult(self.url)
        objs = list(self.backend.list("chunks/"))
        progress = progress or Progress()
        progress.start(sum(o.size for o in objs), "verify")
        lock = threading.Lock()

        def check(obj: ObjectInfo) -> None:
            digest = obj.key.rsplit("/", 1)[-1]
            try:
                ok = _digest(self.backend.get(obj.key)) == digest
            except ObjectMissing:  # collected meanwhile
                return
            with lock:
                result.chunks += 1
                result.bytes += obj.size
                if not ok:
                    result.bad.append(digest)
            if not ok and repair:
                self.backend.delete(obj.key)
            progress.advance(obj.size)

        with ThreadPoolExecutor(max_workers=self.jobs, thread_name_prefix="verify") as pool:
            list(pool.map(check, objs))
        result.repaired = repair and bool(result.bad)
        return result

    # -- accounting and collection -------------------------------------------
    def _referenced(self) -> tuple[int, int, dict[str, int], list[str]]:
        """(snapshots, logical bytes, referenced chunks, unreadable snapshot names)."""
        refs: dict[str, int] = {}
        logical = count = 0
        broken = []
        for obj in self.backend.list("snapshots/"):
            name = obj.key.removeprefix("snapshots/").removesuffix(".json")
            try:
                idx = parse_envelope(self.backend.get(obj.key), where=obj.key).parse_index(where=obj.key)
            except ObjectMissing:
                continue
            except SnapshotCorrupt:
                broken.append(name)
                continue
            count += 1
            logical += idx.logical_bytes
            refs.update(idx.chunk_sizes())
        return count, logical, refs, broken

    def stats(self) -> StoreStats:
        count, logical, refs, broken = self._referenced()
        stored = n = unref = unref_bytes = 0
        for obj in self.backend.list("chunks/"):
            n += 1
            stored += obj.size
            if obj.key.rsplit("/", 1)[-1] not in refs:
                unref += 1
                unref_bytes += obj.size
        now = time.time()
        pushes = len(
            [o for o in self.backend.list("locks/") if "/push-" in o.key and now - o.mtime < self.lease_ttl]
        )
        return StoreStats(
            url=self.url,
            snapshots=count,
            logical_bytes=logical,
            stored_bytes=stored,
            chunks=n,
            referenced_bytes=sum(refs.values()),
            unreferenced_chunks=unref,
            unreferenced_bytes=unref_bytes,
            pushes_in_progress=pushes,
            broken_snapshots=broken,
        )

    def gc(self, *, grace: float = GC_GRACE, dry_run: bool = False, wait: float = 0.0) -> GcResult:
        """Delete chunks that no snapshot references and that are older than ``grace`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            with Lease(self.backend, "gc", "gc", heartbeat=self.heartbeat) as lease:
                pushes = self._live("push", lease.now)
                if not pushes:
                    return self._collect(lease, grace=grace, dry_run=dry_run)
            # let the pushes through (they wait while our lease is live), then look again
            if time.monotonic() >= deadline:
                raise StoreBusy(
                    f"{len(pushes)} push(es) to {self.url} in progress; nothing collected",
                    hint="run `warmstart store gc` again later, or with --wait SECONDS",
                )
            time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))

    def _collect(self, lease: Lease, *, grace: float, dry_run: bool) -> GcResult:
        result = GcResult(self.url, dry_run=dry_run)
        _count, _logical, refs, broken = self._referenced()
        if broken:
            raise SnapshotCorrupt(
                f"cannot read the index of {broken[0]!r} in {self.url}; nothing collected",
                hint="remove the damaged snapshot with `warmstart store rm` first",
            )
        result.referenced_chunks = len(refs)
        for obj in list(self.backend.list("chunks/")):
            if obj.key.rsplit("/", 1)[-1] in refs:
                continue
            if lease.now - obj.mtime < grace:
                result.kept_young_chunks += 1
                continue
            if not dry_run:
                self.backend.delete(obj.key)
            result.deleted_chunks += 1
            result.deleted_bytes += obj.size
        # temp files of killed writers (file:// stores only; S3 has none)
        for obj in list(self.backend.list(".tmp/")):
            if lease.now - obj.mtime >= max(grace, self.lease_ttl) and not dry_run:
                self.backend.delete(obj.key)
        if not dry_run:
            self.backend.put("gc-last.json", lease.body)
        return result
