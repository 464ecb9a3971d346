"""The GPU memory service: one per GPU, owns the weights' physical memory.

Bookkeeping, per *entry* (one layout's allocations, one per safetensors file):

* an entry is found by its layout's structure hash plus, for weights read from
  files, the model directory and each file's (size, mtime, inode) as the
  service sees them — a changed file is a new entry, never the old bytes;
* an open connection is the lock: a ``write`` attachment makes its connection
  the entry's only writer until it sends ``Commit`` (if it goes away first the
  entry is dropped and its readers are told); ``read`` attachments count as
  references while their connection stays open;
* entries stay resident with no readers (that is what makes a restore cheap)
  until evicted (``warmstart gms evict``) or until a new entry does not fit:
  then idle entries are released, least recently used first.

Filling: the service fills entries it reads from files itself, through a
temporary mapping (`warmstart.gms.loader`), and never maps memory otherwise.
It exports each allocation once and hands the same descriptor to every
attachment (SCM_RIGHTS duplicates it into the worker).

If the service dies its references go with it; memory a worker has imported
stays alive in that worker. A restarted service starts empty: it adopts
nothing it did not allocate itself.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.errors import GpuError, UsageError, WarmstartError
from warmstart.gms import protocol as P
from warmstart.gms.backend import ServerBackend, round_up
from warmstart.gms.layout import Layout, layout_hash, read_layout
from warmstart.gms.loader import FillFile, fill

log = logging.getLogger("warmstart.gms")

DEFAULT_SOCKET_DIR = "/run/warmstart"


def default_socket(gpu: int | str) -> str:
    """``$WARMSTART_GMS_SOCKET``, else ``/run/warmstart/gms-<gpu>.sock`` (``gms-cpu.sock`` for memfd)."""
    return os.environ.get("WARMSTART_GMS_SOCKET") or f"{DEFAULT_SOCKET_DIR}/gms-{gpu}.sock"


@dataclass
class Entry:
    id: str
    key: str
    layout: Layout
    model_dir: str | None
    handles: list[int]
    sizes: list[int]
    fds: list[int]
    state: str = "filling"  # filling | ready | failed
    files_done: list[str] = field(default_factory=list)
    bytes_done: int = 0
    digests: dict[str, str] = field(default_factory=dict)
    layout_hash: str | None = None
    error: str | None = None
    readers: set[int] = field(default_factory=set)
    writer: int | None = None
    fill_seconds: float | None = None
    last_used: float = field(default_factory=time.monotonic)
    cancel: threading.Event = field(default_factory=threading.Event)
    version: int = 0  # bumped on every change readers should hear about

    def status(self) -> P.EntryStatus:
        total = self.layout.total_bytes
        secs = self.fill_seconds
        return P.EntryStatus(
            entry_id=self.id, model_dir=self.model_dir, files=len(self.layout.files), bytes=total,
            state=self.state, readers=len(self.readers), writer=self.writer is not None,
            layout_hash=self.layout_hash, fill_seconds=secs,
            fill_gb_per_s=(total / secs / 1e9) if secs else None,
        )  # fmt: skip


class GmsServer:
    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        backend: ServerBackend,
        *,
        lanes: int | None = None,
        socket_mode: int = 0o660,
    ) -> None:
        self.socket_path = str(socket_path)
        self.backend = backend
        self.lanes = lanes
        self.socket_mode = socket_mode
        self._lock = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: dict[int, socket.socket] = {}
        self._stopping = threading.Event()

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # stale socket of a dead service
            else:
                raise UsageError(
                    f"a GPU memory service already listens on {path}",
                    hint="stop it first, or pass another --socket",
                )
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        os.chmod(path, self.socket_mode)
        sock.listen(64)
        self._sock = sock
        log.info("GPU memory service (%s, device %s) listening on %s",
                 self.backend.kind, self.backend.device, path)  # fmt: skip

    def serve_forever(self) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    break
                raise
            cid = next(self._conn_ids)
            with self._lock:
                self._conns[cid] = conn
            t = threading.Thread(target=self._handle, args=(cid, conn), name=f"gms-conn-{cid}", daemon=True)
            t.start()

    def start(self) -> threading.Thread:
        """Bind and serve on a background thread (for tests and embedding)."""
        self.bind()
        t = threading.Thread(target=self.serve_forever, name="gms-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def close(self) -> None:
        """Stop serving and release every allocation (mapped workers keep theirs)."""
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        with self._lock:
            conns = list(self._conns.values())
            for e in self._entries.values():
                e.cancel.set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + 30
        with self._lock:
            while any(e.state == "filling" and e.writer is None for e in self._entries.values()):
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    break
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            self._release(e)
        self.backend.close()

    # ------------------------------------------------------------------ queries

    def entries(self) -> list[P.EntryStatus]:
        with self._lock:
            return [e.status() for e in self._entries.values()]

    def status(self) -> P.StatusReply:
        return P.StatusReply(pid=os.getpid(), backend=self.backend.kind, device=self.backend.device,
                             socket=self.socket_path, entries=self.entries())  # fmt: skip

    def evict(self, entry_id: str | None = None) -> list[str]:
        """Release idle entries (no reader, no writer, not filling)."""
        with self._lock:
            gone = [
                e for e in self._entries.values()
                if (entry_id is None or e.id == entry_id)
                and not e.readers and e.writer is None and e.state != "filling"
            ]  # fmt: skip
            for e in gone:
                del self._entries[e.key]
        for e in gone:
            self._release(e)
        return [e.id for e in gone]

    # ------------------------------------------------------------------ allocations

    def _release(self, e: Entry) -> None:
        for fd in e.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for h in e.handles:
            try:
                self.backend.release(h)
            except WarmstartError as exc:
                log.warning("releasing an allocation of entry %s failed: %s", e.id, exc)
        e.fds, e.handles = [], []

    def _allocate(self, layout: Layout) -> tuple[list[int], list[int], list[int]]:
        sizes = [round_up(f.data_size, self.backend.granularity) for f in layout.files]
        handles: list[int] = []
        fds: list[int] = []
        try:
            for size in sizes:
                handles.append(self._create(size))
                fds.append(self.backend.export(handles[-1]))
        except BaseException:
            for fd in fds:
                os.close(fd)
            for h in handles:
                self.backend.release(h)
            raise
        return handles, sizes, fds

    def _create(self, size: int) -> int:
        try:
            return self.backend.create(size)
        except GpuError as exc:
            if "OUT_OF_MEMORY" not in str(exc):
                raise
            idle = sorted(
                (e for e in self._entries.values()
                 if not e.readers and e.writer is None and e.state != "filling"),
                key=lambda e: e.last_used,
            )  # fmt: skip
            if not idle:
                raise
            for e in idle:  # least recently used first, until it fits
                del self._entries[e.key]
                self._release(e)
                log.info("evicted idle entry %s to make room", e.id)
                try:
                    return self.backend.create(size)
                except GpuError as again:
                    if "OUT_OF_MEMORY" not in str(again):
                        raise
            raise

    # ------------------------------------------------------------------ connections

    def _handle(self, cid: int, conn: socket.socket) -> None:
        try:
            msg, fds = P.recv(conn)
            P.close_fds(fds)
            if isinstance(msg, P.Status):
                P.send(conn, self.status())
            elif isinstance(msg, P.Evict):
                P.send(conn, P.Evicted(entry_ids=self.evict(msg.entry_id)))
            elif isinstance(msg, P.Attach):
                self._attach(cid, conn, msg)
            else:
                P.send(conn, P.Error(kind="bad-request", message=f"unexpected {msg.op!r} message"))
        except P.PeerClosed:
            pass
        except (P.ProtocolError, OSError) as exc:
            log.debug("connection %d: %s", cid, exc)
            try:
                P.send(conn, P.Error(kind="bad-request", message=str(exc)))
            except OSError:
                pass
        except Exception as exc:  # noqa: BLE001 - one connection must not kill the service
            log.exception("connection %d failed", cid)
            try:
                P.send(conn, P.Error(kind="internal", message=str(exc)))
            except OSError:
                pass
        finally:
            with self._lock:
                self._conns.pop(cid, None)
                for e in list(self._entries.values()):
                    e.readers.discard(cid)
                    if e.readers == set():
                        e.last_used = time.monotonic()
            conn.close()

    def _key(self, msg: P.Attach) -> tuple[str, str | None]:
        structure = msg.layout.structure_hash()
        if msg.mode == "write" or msg.model_dir is None:
            return f"client:{structure}", None
        d = Path(msg.model_dir)
        if not d.is_absolute():
            raise _Refuse("bad-request", f"model directory {d} is not absolute")
        try:
            actual = read_layout(d)
        except WarmstartError as exc:
            raise _Refuse("failed", f"the service cannot read the weights: {exc}",
                          "the service reads the files itself; give it access to the model directory") from None
        if actual != msg.layout:
            raise _Refuse(
                "mismatch",
                f"the safetensors files in {d} have another layout than the worker's",
                "the files changed on disk since the worker read them",
            )
        ident = []
        for f in msg.layout.files:
            st = (d / f.name).stat()
            ident.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}")
        return f"files:{structure}:{d}:{'|'.join(ident)}", str(d)

    def _resident(self, msg: P.Attach) -> Entry | None:
        if not msg.expect_hash or msg.mode != "read":
            return None
        with self._lock:
            for e in self._entries.values():
                if e.state == "ready" and e.layout_hash == msg.expect_hash and e.layout == msg.layout:
                    return e
        return None

    def _attach(self, cid: int, conn: socket.socket, msg: P.Attach) -> None:
        if msg.version != P.PROTOCOL_VERSION:
            P.send(conn, P.Error(kind="bad-request",
                                 message=f"protocol version {msg.version}; the service speaks {P.PROTOCOL_VERSION}",
                                 hint="run the same warmstart version on both sides"))  # fmt: skip
            return
        try:
            entry = self._resident(msg)  # identical bytes already here: whatever the files say now
            key, model_dir = (entry.key, entry.model_dir) if entry is not None else self._key(msg)
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.state == "failed":
                    del self._entries[key]  # a failed fill: start over (readers keep their imports)
                    self._release(entry)
                    entry = None
                if entry is not None and msg.mode == "write":
                    if entry.writer is not None:
                        raise _Refuse("busy", "another client is filling these weights",
                                      "attach for reading, or wait for it to commit")  # fmt: skip
                    raise _Refuse("busy", "these weights are already filled", "attach for reading")
                if (entry is not None and msg.expect_hash and entry.state == "ready"
                        and entry.layout_hash != msg.expect_hash):  # fmt: skip
                    raise _mismatch(msg.expect_hash, entry.layout_hash)
                if entry is None:
                    if msg.mode == "read" and model_dir is None:
                        raise _Refuse("failed", "the service holds no weights of this layout",
                                      "attach with the model directory so the service can load them")  # fmt: skip
                    handles, sizes, fds = self._allocate(msg.layout)
                    entry = Entry(id=f"e{next(self._ids)}", key=key, layout=msg.layout, model_dir=model_dir,
                                  handles=handles, sizes=sizes, fds=fds)  # fmt: skip
                    self._entries[key] = entry
                    if msg.mode == "write":
                        entry.writer = cid
                    else:
                        threading.Thread(target=self._load, args=(entry,), name=f"gms-load-{entry.id}",
                                         daemon=True).start()  # fmt: skip
                if msg.mode == "read":
                    entry.readers.add(cid)
                entry.last_used = time.monotonic()
                reply = P.Attached(
                    entry_id=entry.id, backend=self.backend.kind, device=self.backend.device,  # type: ignore[arg-type]
                    granularity=self.backend.granularity,
                    allocations=[P.AllocationInfo(file=f.name, size=s, data_size=f.data_size)
                                 for f, s in zip(entry.layout.files, entry.sizes)],
                    state="ready" if entry.state == "ready" else "filling",
                    layout_hash=entry.layout_hash, digests=entry.digests,
                )  # fmt: skip
                fds = [os.dup(fd) for fd in entry.fds]  # ours to send even if the entry goes meanwhile
            try:
                P.send(conn, reply, fds)
            finally:
                P.close_fds(fds)
        except _Refuse as r:
            P.send(conn, r.error())
            return
        except WarmstartError as exc:
            P.send(conn, P.Error(kind="failed", message=exc.message, hint=exc.hint))
            return
        log.info("connection %d attached to %s (%s, %s)", cid, entry.id, msg.mode, entry.state)
        if msg.mode == "write":
            self._follow_writer(cid, conn, entry)
        else:
            self._follow_reader(conn, entry, msg.expect_hash)

    def _follow_reader(self, conn: socket.socket, entry: Entry, expect: str | None) -> None:
        seen = sent = -1
        while True:
            with self._lock:
                self._lock.wait_for(lambda: entry.version != seen or self._stopping.is_set(), timeout=0.2)
                seen, state = entry.version, entry.state
                progress = P.Progress(files_done=list(entry.files_done), bytes_done=entry.bytes_done,
                                      bytes_total=entry.layout.total_bytes)  # fmt: skip
                ready = (P.Ready(layout_hash=entry.layout_hash, digests=dict(entry.digests),
                                 fill_seconds=entry.fill_seconds or 0.0)
                         if state == "ready" and entry.layout_hash else None)  # fmt: skip
                error = entry.error
            if self._stopping.is_set():
                return
            if ready is not None:
                if expect and ready.layout_hash != expect:
                    P.send(conn, _mismatch(expect, ready.layout_hash).error())
                    return
                P.send(conn, ready)
                break
            if state == "failed":
                P.send(conn, P.Error(kind="failed", message=error or "filling the weights failed"))
                return
            if seen != sent:
                P.send(conn, progress)
                sent = seen
            if _peer_gone(conn):
                return
        # attached: the open connection is the reference; wait for the worker to go
        while not self._stopping.is_set():
            r, _, _ = select.select([conn], [], [], 1.0)
            if r and not conn.recv(4096):
                return

    def _follow_writer(self, cid: int, conn: socket.socket, entry: Entry) -> None:
        try:
            msg, fds = P.recv(conn)
            P.close_fds(fds)
            if not isinstance(msg, P.Commit):
                raise P.ProtocolError(f"expected commit, got {msg.op!r}")
            h = layout_hash(entry.layout, msg.digests)
        except (P.ProtocolError, OSError, WarmstartError) as exc:
            self._fail(entry, f"the writer went away before committing ({exc})", drop=True)
            return
        with self._lock:
            entry.digests, entry.layout_hash, entry.state = dict(msg.digests), h, "ready"
            entry.files_done = [f.name for f in entry.layout.files]
            entry.bytes_done = entry.layout.total_bytes
            entry.writer = None
            entry.version += 1
            self._lock.notify_all()
        P.send(conn, P.Ready(layout_hash=h, digests=dict(msg.digests)))
        log.info("writer committed entry %s", entry.id)

    def _fail(self, entry: Entry, message: str, *, drop: bool) -> None:
        with self._lock:
            entry.state, entry.error, entry.writer = "failed", message, None
            entry.version += 1
            if drop and self._entries.get(entry.key) is entry:
                del self._entries[entry.key]
            self._lock.notify_all()
        if drop:
            self._release(entry)
        log.warning("entry %s failed: %s", entry.id, message)

    def _load(self, entry: Entry) -> None:
        assert entry.model_dir is not None
        targets: list[tuple[int, int]] = []

        def progress(done: list[str], nbytes: int) -> None:
            with self._lock:
                entry.files_done, entry.bytes_done = done, nbytes
                entry.version += 1
                self._lock.notify_all()

        try:
            for h, size in zip(entry.handles, entry.sizes):
                targets.append((self.backend.open_fill(h, size), size))
            files = [
                FillFile(f.name, str(Path(entry.model_dir) / f.name), f.data_offset, f.data_size, t)
                for f, (t, _s) in zip(entry.layout.files, targets)
            ]
            result = fill(self.backend, files, lanes=self.lanes, on_progress=progress, cancel=entry.cancel)
            while targets:
                t, size = targets.pop()
                self.backend.close_fill(t, size)
            h = layout_hash(entry.layout, result.digests)
        except BaseException as exc:  # noqa: BLE001
            for t, size in targets:
                try:
                    self.backend.close_fill(t, size)
                except BaseException:  # noqa: BLE001
                    pass
            self._fail(entry, f"loading {entry.model_dir} failed: {exc}", drop=False)
            return
        with self._lock:
            entry.digests, entry.layout_hash, entry.state = result.digests, h, "ready"
            entry.fill_seconds = result.seconds
            entry.version += 1
            self._lock.notify_all()
        log.info("entry %s ready: %.2f GB in %.2f s (%.2f GB/s)", entry.id, result.nbytes / 1e9,
                 result.seconds, result.gb_per_s)  # fmt: skip


class _Refuse(Exception):
    def __init__(self, kind: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.kind, self.message, self.hint = kind, message, hint

    def error(self) -> P.Error:
        return P.Error(kind=self.kind, message=self.message, hint=self.hint)  # type: ignore[arg-type]


def _mismatch(expected: str, actual: str | None) -> _Refuse:
    return _Refuse(
        "mismatch",
        f"the service's weights have layout hash {actual}, the worker expects {expected}",
        "the weight files changed since the snapshot was taken; restore with the original files "
        "or take a new snapshot",
    )


def _peer_gone(conn: socket.socket) -> bool:
    r, _, _ = select.select([conn], [], [], 0)
    if not r:
        return False
    try:
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True
