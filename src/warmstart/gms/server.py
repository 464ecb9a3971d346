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
  then idle entries are released, least recently used first;
* states: ``filling`` -> ``ready`` (or ``failed``); an idle ready entry evicted
  with ``keep_host`` goes ``parking`` -> ``parked``: its bytes are copied into
  host memory the backend owns (``Entry.host``, one :class:`HostCopy` of each
  file's data size; pinned for CUDA), then its device memory is released and
  its exported fds closed. A parked entry keeps its key, digests and layout
  hash and holds no device memory (the out-of-memory eviction passes it by).
  The next read attach (by key, or by layout hash for a re-attach) allocates
  device memory again and copies the bytes back on a thread, as ``filling``
  with per-file progress, then frees the host copies; ``fill_seconds`` is then
  the copy-back time. Evicting a parked entry without ``keep_host`` drops it.
  ``host_cache_bytes`` bounds the host tier: parking drops the least recently
  used parked entries to make room, and releases the entry if it still does
  not fit (or if the copy fails).

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
from warmstart.gms.backend import HostCopy, ServerBackend, round_up
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
    state: str = "filling"  # filling | ready | failed | parking | parked
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
    #: the bytes kept in host memory while parked (one copy per file, data_size bytes)
    host: list[HostCopy] = field(default_factory=list)

    @property
    def host_bytes(self) -> int:
        return sum(h.nbytes for h in self.host)

    def status(self) -> P.EntryStatus:
        total = self.layout.total_bytes
        secs = self.fill_seconds
        return P.EntryStatus(
            entry_id=self.id, model_dir=self.model_dir, files=len(self.layout.files), bytes=total,
            state=self.state, readers=len(self.readers), writer=self.writer is not None,
            layout_hash=self.layout_hash, fill_seconds=secs,
            fill_gb_per_s=(total / secs / 1e9) if secs else None, host_bytes=self.host_bytes,
        )  # fmt: skip


class GmsServer:
    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        backend: ServerBackend,
        *,
        lanes: int | None = None,
        socket_mode: int = 0o660,
        host_cache_bytes: int | None = None,
    ) -> None:
        """``host_cache_bytes``: most bytes parked entries may hold in host memory
        (None: no limit; 0: evicting with ``keep_host`` parks nothing)."""
        if host_cache_bytes is not None and host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, not {host_cache_bytes}")
        self.socket_path = str(socket_path)
        self.backend = backend
        self.lanes = lanes
        self.host_cache_bytes = host_cache_bytes
        self.socket_mode = socket_mode
        self._lock = threading.Condition()
        self._entries: dict[str, Entry] = {}
        self._host_freeing = 0  # threads freeing host copies (close() waits for them)
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
            while any((e.state == "filling" and e.writer is None) or e.state == "parking"
                      for e in self._entries.values()):
                if not self._lock.wait(timeout=max(0.0, deadline - time.monotonic())):
                    break
            entries = list(self._entries.values())
            self._entries.clear()
        for e in entries:
            self._release(e)
            self._free_host(e)
        with self._lock:  # the backend frees host copies only while it is open
            self._lock.wait_for(lambda: self._host_freeing == 0, timeout=max(0.0, deadline - time.monotonic()))
        self.backend.close()

    # ------------------------------------------------------------------ queries

    def entries(self) -> list[P.EntryStatus]:
        with self._lock:
            return [e.status() for e in self._entries.values()]

    def status(self) -> P.StatusReply:
        return P.StatusReply(pid=os.getpid(), backend=self.backend.kind, device=self.backend.device,
                             socket=self.socket_path, entries=self.entries())  # fmt: skip

    def evict(self, entry_id: str | None = None, *, keep_host: bool = False) -> list[str]:
        """Release idle entries (no reader, no writer, not filling); returns the ids of
        those that left device memory.

        ``keep_host``: park idle *ready* entries instead (their bytes copied into
        host memory the backend owns, then their device memory released; see the
        module docstring); entries parked already stay as they are. Without it a
        parked entry is dropped with its host copy. Returns once the copies are made.
        """
        with self._lock:
            chosen = [
                e for e in self._entries.values()
                if (entry_id is None or e.id == entry_id) and _idle(e)
                and not (keep_host and e.state == "parked")
            ]  # fmt: skip
            park = [e for e in chosen if keep_host and e.state == "ready"]
            drop = [e for e in chosen if e not in park]
            for e in drop:
                del self._entries[e.key]
        for e in drop:
            self._release(e)
            self._free_host(e)
        gone = [e.id for e in drop]
        for e in park:
            if self._park(e):
                gone.append(e.id)
        return gone

    def _park(self, e: Entry) -> bool:
        """Move an idle ready entry's bytes to host memory; False if it was taken meanwhile."""
        need = e.layout.total_bytes
        dropped: list[Entry] = []
        with self._lock:
            if self._entries.get(e.key) is not e or not _idle(e) or e.state != "ready":
                return False
            fits = True
            if self.host_cache_bytes is not None:
                parked = sorted((x for x in self._entries.values() if x.state == "parked"),
                                key=lambda x: x.last_used)  # fmt: skip
                held = sum(x.layout.total_bytes for x in self._entries.values()
                           if x.host or x.state == "parking")  # fmt: skip
                # what the other parked entries cannot give back (being parked or copied back)
                fixed = held - sum(x.host_bytes for x in parked)
                fits = fixed + need <= self.host_cache_bytes
                for old in (parked if fits else []):  # least recently used first, until it fits
                    if held + need <= self.host_cache_bytes:
                        break
                    del self._entries[old.key]
                    dropped.append(old)
                    held -= old.host_bytes
            if fits:
                e.state = "parking"
            else:
                del self._entries[e.key]
            e.version += 1
            self._lock.notify_all()
        for old in dropped:
            self._free_host(old)
            log.info("dropped parked entry %s (%.2f GB) from host memory to make room for %s",
                     old.id, old.layout.total_bytes / 1e9, e.id)  # fmt: skip
        if not fits:
            log.info("entry %s (%.2f GB) does not fit the host cache of %.2f GB: released instead of parked",
                     e.id, need / 1e9, (self.host_cache_bytes or 0) / 1e9)  # fmt: skip
            self._release(e)
            return True
        t0 = time.perf_counter()
        copies: list[HostCopy] = []
        try:
            for f, h, size in zip(e.layout.files, e.handles, e.sizes):
                copies.append(self.backend.park(h, size, f.data_size))
        except Exception as exc:  # noqa: BLE001 - out of host memory and the like: release as before
            for c in copies:
                self._free_host_copy(e, c)
            with self._lock:
                if self._entries.get(e.key) is e:
                    del self._entries[e.key]
                e.version += 1
                self._lock.notify_all()
            log.warning("parking entry %s in host memory failed, releasing it instead: %s", e.id, exc)
            self._release(e)
            return True
        secs = time.perf_counter() - t0
        self._release(e)  # device memory and exported fds; nobody attaches while it is parking
        with self._lock:
            kept = self._entries.get(e.key) is e
            if kept:
                e.host, e.state = copies, "parked"
            e.version += 1
            self._lock.notify_all()
        if not kept:  # the service closed meanwhile
            for c in copies:
                self._free_host_copy(e, c)
            return True
        log.info("entry %s parked in host memory: %.2f GB in %.2f s (%.2f GB/s)", e.id, need / 1e9, secs,
                 need / secs / 1e9 if secs else 0.0)  # fmt: skip
        return True

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

    def _free_host(self, e: Entry) -> None:
        with self._lock:
            copies, e.host = e.host, []
            self._host_freeing += 1
        try:
            for c in copies:
                self._free_host_copy(e, c)
        finally:
            with self._lock:
                self._host_freeing -= 1
                self._lock.notify_all()

    def _free_host_copy(self, e: Entry, c: HostCopy) -> None:
        try:
            self.backend.free_host(c)
        except WarmstartError as exc:
            log.warning("freeing the host copy of entry %s failed: %s", e.id, exc)

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
            # parked entries hold no device memory: releasing them would free none
            idle = sorted(
                (e for e in self._entries.values() if _idle(e) and e.state != "parked"),
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
                P.send(conn, P.Evicted(entry_ids=self.evict(msg.entry_id, keep_host=msg.keep_host)))
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
                    if cid in e.readers:  # only the entries this connection used were used now
                        e.readers.discard(cid)
                        if not e.readers:
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
                if (e.state in ("ready", "parking", "parked") and e.layout_hash == msg.expect_hash
                        and e.layout == msg.layout):  # fmt: skip
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
                while entry is not None and entry.state == "parking":  # until its bytes are in host memory
                    self._lock.wait(timeout=1.0)
                    if self._stopping.is_set():
                        raise _Refuse("failed", "the service is stopping")
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
                if (entry is not None and msg.expect_hash and entry.state in ("ready", "parked")
                        and entry.layout_hash != msg.expect_hash):  # fmt: skip
                    raise _mismatch(msg.expect_hash, entry.layout_hash)
                if entry is not None and entry.state == "parked":  # back onto the device
                    entry.handles, entry.sizes, entry.fds = self._allocate(entry.layout)
                    entry.state, entry.files_done, entry.bytes_done = "filling", [], 0
                    entry.version += 1
                    self._lock.notify_all()
                    threading.Thread(target=self._unpark, args=(entry,), name=f"gms-unpark-{entry.id}",
                                     daemon=True).start()  # fmt: skip
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
                    # as for a load, the hash and digests come with Ready while copying back
                    layout_hash=entry.layout_hash if entry.state == "ready" else None,
                    digests=entry.digests if entry.state == "ready" else {},
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

    def _unpark(self, entry: Entry) -> None:
        """Copy a parked entry's host copies into its new device memory (state "filling")."""
        t0 = time.perf_counter()
        done: list[str] = []
        nbytes = 0
        try:
            for f, host, h, size in zip(entry.layout.files, entry.host, entry.handles, entry.sizes, strict=True):
                if entry.cancel.is_set():
                    raise WarmstartError("the service is stopping")
                self.backend.unpark(host, h, size)
                done.append(f.name)
                nbytes += host.nbytes
                with self._lock:
                    entry.files_done, entry.bytes_done = list(done), nbytes
                    entry.version += 1
                    self._lock.notify_all()
        except BaseException as exc:  # noqa: BLE001
            self._free_host(entry)
            self._fail(entry, f"copying entry {entry.id} back from host memory failed: {exc}", drop=True)
            return
        secs = time.perf_counter() - t0
        with self._lock:
            entry.state, entry.fill_seconds = "ready", secs
            entry.version += 1
            self._lock.notify_all()
        self._free_host(entry)
        log.info("entry %s unparked: %.2f GB in %.2f s (%.2f GB/s)", entry.id, nbytes / 1e9, secs,
                 nbytes / secs / 1e9 if secs else 0.0)  # fmt: skip


def _idle(e: Entry) -> bool:
    """No reader, no writer, and not being filled or parked: free to release or park."""
    return not e.readers and e.writer is None and e.state not in ("filling", "parking")


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
