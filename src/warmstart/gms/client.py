"""The worker side: ask the node's service for weights and map them.

::

    weights = GmsWeights("/run/warmstart/gms-0.sock", model_dir, device=0)
    weights.attach()          # connect, receive fds, import, map at our own addresses
    weights.wait()            # until the service has filled what we map
    model.load_state_dict(weights.tensors, assign=True, strict=False)
    ...
    weights.detach()          # checkpoint point: unmap + release, keep the address ranges
    ...                       # (snapshot holds no weights; the process is restored)
    weights.attach()          # same addresses, refused unless the layout hash matches

Tensors alias the mapped memory. Between :meth:`GmsWeights.detach` and the
next :meth:`GmsWeights.attach` they must not be used; afterwards they are
valid again (same addresses), as are CUDA graphs that captured them.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from warmstart.errors import GmsUnavailable, UsageError, WarmstartError, WeightsMismatch
from warmstart.gms import protocol as P
from warmstart.gms.backend import ClientBackend, MemfdClient
from warmstart.gms.layout import Layout, read_layout

log = logging.getLogger("warmstart.gms.client")

BackendFactory = Callable[[P.Attached], ClientBackend]


class GmsError(WarmstartError):
    """The service refused a request."""


def _start_hint(path: str) -> str:
    return f"start the node's service (`warmstart gms serve --gpu N --socket {path}`)"


def connect(path: str, timeout: float = 10.0) -> socket.socket:
    """A connected socket, or a one-line GmsUnavailable (never a hang)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise GmsUnavailable(f"no GPU memory service socket at {path}", hint=_start_hint(path)) from None
    except OSError as exc:
        sock.close()
        what = "connection refused" if exc.errno == errno.ECONNREFUSED else (exc.strerror or str(exc))
        raise GmsUnavailable(f"cannot reach the GPU memory service at {path}: {what}",
                             hint=_start_hint(path)) from None  # fmt: skip
    return sock


def _recv(sock: socket.socket, path: str, what: str) -> tuple[P.Message, list[int]]:
    try:
        return P.recv(sock)
    except TimeoutError:
        raise GmsUnavailable(f"the GPU memory service at {path} did not answer {what} in time",
                             hint="check `warmstart gms status`; the service may be stuck") from None  # fmt: skip
    except (P.PeerClosed, ConnectionError) as exc:
        raise GmsUnavailable(f"the GPU memory service at {path} went away {what} ({exc})",
                             hint=_start_hint(path)) from None  # fmt: skip
    except P.ProtocolError as exc:
        raise GmsError(f"bad answer from the GPU memory service: {exc}") from None


def _raise(err: P.Error) -> None:
    if err.kind == "mismatch":
        raise WeightsMismatch(err.message, hint=err.hint)
    raise GmsError(err.message, hint=err.hint)


def request(path: str, msg: Any, timeout: float = 10.0) -> Any:
    """One request/reply on its own connection (status, evict)."""
    sock = connect(path, timeout)
    try:
        P.send(sock, msg)
        reply, fds = _recv(sock, path, "the request")
        P.close_fds(fds)
        if isinstance(reply, P.Error):
            _raise(reply)
        return reply
    finally:
        sock.close()


def default_backend(reply: P.Attached, device: int | None) -> ClientBackend:
    if reply.backend == "memfd":
        return MemfdClient(reply.granularity)
    from warmstart.gms.cuda import CudaClient

    return CudaClient(reply.device if device is None else device)


class _Mapping:
    __slots__ = ("file", "size", "address", "handle")

    def __init__(self, file: str, size: int, address: int) -> None:
        self.file, self.size, self.address = file, size, address
        self.handle: int | None = None


class GmsWeights:
    """One model's weights, mapped from the service (see the module docstring)."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        model_dir: str | os.PathLike[str] | None = None,
        *,
        layout: Layout | None = None,
        device: int | None = None,
        kind: str | None = None,
        writable: bool = False,
        mode: str = "read",
        backend: ClientBackend | None = None,
        connect_timeout: float = 10.0,
        reply_timeout: float = 60.0,
    ) -> None:
        self.socket_path = str(socket_path)
        self.model_dir = str(Path(model_dir).resolve()) if model_dir is not None else None
        if layout is None:
            if self.model_dir is None:
                raise UsageError("GmsWeights needs a model directory or a layout")
            layout = read_layout(self.model_dir)
        self.layout = layout
        self.device = device
        #: the memory kind this worker can use ("cuda" or "memfd"); None: whatever the service has
        self.kind = kind
        self.writable = writable or mode == "write"
        self.mode = mode
        self.backend = backend
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self._sock: socket.socket | None = None
        self._maps: list[_Mapping] = []
        self.tensors: dict[str, Any] = {}
        self.entry_id: str | None = None
        #: set once the service reported the weights complete; guards every later attach
        self.layout_hash: str | None = None
        self.digests: dict[str, str] = {}
        self.files_done: set[str] = set()
        self.ready = False
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ state

    @property
    def attached(self) -> bool:
        return bool(self._maps) and all(m.handle is not None for m in self._maps)

    @property
    def nbytes(self) -> int:
        return self.layout.total_bytes

    def expected_files(self) -> list[dict[str, Any]]:
        """File names, sizes and content digests: what a snapshot of this worker expects."""
        return [{"name": f.name, "size": f.size, "digest": self.digests.get(f.name)} for f in self.layout.files]

    # ------------------------------------------------------------------ attach / detach

    def attach(self, expect_hash: str | None = None) -> None:
        """Connect, get the allocations' fds, map them at our addresses.

        After the first attach the layout hash is known and every later attach
        (a re-attach after restore) is refused unless the service's weights
        have that same hash.
        """
        if self.attached:
            return
        expect = expect_hash or self.layout_hash
        t0 = time.perf_counter()
        sock = connect(self.socket_path, self.connect_timeout)
        fds: list[int] = []
        try:
            sock.settimeout(self.reply_timeout)
            P.send(sock, P.Attach(layout=self.layout, model_dir=self.model_dir, expect_hash=expect,
                                  mode=self.mode, client_pid=os.getpid()))  # type: ignore[arg-type]
            reply, fds = _recv(sock, self.socket_path, "the attach request")
            if isinstance(reply, P.Error):
                _raise(reply)
            if not isinstance(reply, P.Attached) or len(fds) != len(reply.allocations):
                raise GmsError("the GPU memory service answered the attach request with something else")
            if expect and reply.layout_hash and reply.layout_hash != expect:
                raise WeightsMismatch(
                    f"the service's weights have layout hash {reply.layout_hash}, this worker expects {expect}",
                    hint="the weight files changed since the snapshot; restore with the original files",
                )
            if self.kind is not None and reply.backend != self.kind:
                raise UsageError(
                    f"the service at {self.socket_path} serves {reply.backend} memory, "
                    f"this worker needs {self.kind}",
                    hint="a GPU worker needs `warmstart gms serve --gpu N`, a CPU one `--memfd`",
                )
            if self.backend is None:
                self.backend = default_backend(reply, self.device)
            self._map_all(reply, fds)
        except BaseException:
            P.close_fds(fds)
            sock.close()
            raise
        P.close_fds(fds)
        self._sock = sock
        self.entry_id = reply.entry_id
        self.files_done = set()
        self.ready = False
        if reply.state == "ready" and reply.layout_hash:
            self._set_ready(reply.layout_hash, reply.digests)
        self.timings["attach_s"] = time.perf_counter() - t0
        log.info("attached %d weight files (%.2f GB) from %s: %s", len(self._maps), self.nbytes / 1e9,
                 self.socket_path, reply.state)  # fmt: skip

    def _map_all(self, reply: P.Attached, fds: list[int]) -> None:
        assert self.backend is not None
        if not self._maps:
            try:
                for a in reply.allocations:
                    self._maps.append(_Mapping(a.file, a.size, self.backend.reserve(a.size)))
            except BaseException:
                self._free_reservations()
                raise
        elif [(m.file, m.size) for m in self._maps] != [(a.file, a.size) for a in reply.allocations]:
            raise WeightsMismatch("the service's allocations differ in size from this worker's address ranges",
                                  hint="the layout or the GPU changed since the snapshot")  # fmt: skip
        done: list[_Mapping] = []
        try:
            for m, fd in zip(self._maps, fds):
                handle = self.backend.import_fd(fd)
                try:
                    self.backend.map(m.address, m.size, handle, writable=self.writable)
                except BaseException:
                    self.backend.release(handle)
                    raise
                m.handle = handle
                done.append(m)
        except BaseException:
            for m in done:
                self._unmap(m)
            raise
        if not self.tensors:
            for f, m in zip(self.layout.files, self._maps):
                for t in f.tensors:
                    self.tensors[t.name] = self.backend.tensor(m.address + t.start, t)

    def _unmap(self, m: _Mapping) -> None:
        assert self.backend is not None
        if m.handle is None:
            return
        self.backend.unmap(m.address, m.size)
        handle, m.handle = m.handle, None
        self.backend.release(handle)

    def _free_reservations(self) -> None:
        assert self.backend is not None
        for m in self._maps:
            self._unmap(m)
            self.backend.free(m.address, m.size)
        self._maps = []
        self.tensors = {}

    def detach(self) -> None:
        """Unmap and release the weights (the snapshot holds none); keep the address ranges."""
        if self.backend is not None and self._maps:
            self.backend.synchronize()
            for m in self._maps:
                self._unmap(m)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.ready = False

    def close(self) -> None:
        """Detach and give the address ranges back (tensors become invalid for good)."""
        self.detach()
        if self.backend is not None:
            self._free_reservations()
            self.backend.close()
            self.backend = None

    # ------------------------------------------------------------------ waiting

    def _set_ready(self, lhash: str, digests: dict[str, str]) -> None:
        if self.layout_hash is not None and lhash != self.layout_hash:
            raise WeightsMismatch(
                f"the service filled weights with layout hash {lhash}, this worker expects {self.layout_hash}",
                hint="the weight files changed since the snapshot; restore with the original files",
            )
        self.layout_hash = lhash
        self.digests = dict(digests)
        self.files_done = {f.name for f in self.layout.files}
        self.ready = True

    def wait(self, files: Iterable[str] | None = None, timeout: float | None = None) -> None:
        """Block until the service has filled ``files``; by default until it reported
        all of them complete, with their digests (which sets :attr:`layout_hash`)."""
        want = set(files) if files is not None else None
        t0 = time.perf_counter()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready and (want is None or not want <= self.files_done):
            if self._sock is None:
                raise UsageError("not attached", hint="call attach() first")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise GmsUnavailable(f"the weights were not filled within {timeout:g} s",
                                     hint="check `warmstart gms status`")  # fmt: skip
            self._sock.settimeout(left)
            msg, fds = _recv(self._sock, self.socket_path, "while filling the weights")
            P.close_fds(fds)
            if isinstance(msg, P.Error):
                self.detach()
                _raise(msg)
            elif isinstance(msg, P.Progress):
                self.files_done = set(msg.files_done)
            elif isinstance(msg, P.Ready):
                try:
                    self._set_ready(msg.layout_hash, msg.digests)
                except WeightsMismatch:
                    self.detach()
                    raise
        self.timings["wait_s"] = time.perf_counter() - t0

    def commit(self, digests: dict[str, str]) -> str:
        """For a ``write`` attachment: the memory is filled; publish it to readers."""
        if self._sock is None or self.mode != "write":
            raise UsageError("commit needs a write attachment")
        assert self.backend is not None
        self.backend.synchronize()
        P.send(self._sock, P.Commit(digests=digests))
        msg, fds = _recv(self._sock, self.socket_path, "the commit")
        P.close_fds(fds)
        if isinstance(msg, P.Error):
            _raise(msg)
        assert isinstance(msg, P.Ready)
        self._set_ready(msg.layout_hash, msg.digests)
        return msg.layout_hash


def status(socket_path: str, timeout: float = 10.0) -> P.StatusReply:
    return request(socket_path, P.Status(), timeout)


def evict(socket_path: str, entry_id: str | None = None, timeout: float = 10.0, *,
          keep_host: bool = False) -> list[str]:  # fmt: skip
    """Release idle entries (``entry_id``, or all); the ids that left the device.

    ``keep_host``: park idle ready entries in the service's pinned host memory
    instead, to be copied back at host-to-device speed on the next attach. The
    service answers once the copies are made, so ``timeout`` must cover copying
    the entries out of device memory (and pinning that much host memory).
    """
    return request(socket_path, P.Evict(entry_id=entry_id, keep_host=keep_host), timeout).entry_ids
