"""The wire protocol between a worker and the GPU memory service.

A unix ``SOCK_STREAM`` socket carries frames: an 8-byte header (``!II``: body
length, number of file descriptors) then a JSON body, one pydantic message.
File descriptors (exported memory handles) travel as ``SCM_RIGHTS`` ancillary
data with the frame's header (``socket.send_fds``/``recv_fds``); the header's
count says how many to expect, so a frame that lost its descriptors is caught.

Conversation (one connection = one attachment; closing it detaches):

* worker -> ``Attach`` (layout, expected layout hash, read or write);
  service -> ``Attached`` with one fd per file allocation, or ``Error``;
* service -> ``Progress`` while it streams the files in, then ``Ready`` (with
  the content digests and layout hash) or ``Error``;
* a writer -> ``Commit`` once it has filled the memory itself;
* ``Status`` (on its own connection) -> ``StatusReply``; ``Evict`` -> ``Evicted``
  (with ``keep_host``, once the evicted bytes are copied into host memory).
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from warmstart.gms.layout import Layout

HEADER = struct.Struct("!II")
MAX_BODY = 64 << 20
#: Linux's SCM_MAX_FD is 253
MAX_FDS = 250
PROTOCOL_VERSION = 1


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Attach(_Msg):
    op: Literal["attach"] = "attach"
    version: int = PROTOCOL_VERSION
    layout: Layout
    #: absolute directory the service reads the files from (source "files")
    model_dir: str | None = None
    #: refuse unless the weights' layout hash is this one (set on re-attach after restore)
    expect_hash: str | None = None
    #: "read": map weights the service fills (or a writer filled);
    #: "write": this client fills them itself and sends Commit (the open connection is the lock)
    mode: Literal["read", "write"] = "read"
    client_pid: int = 0


class AllocationInfo(_Msg):
    file: str
    #: bytes of physical memory (the data size rounded up to the granularity)
    size: int
    data_size: int


class Attached(_Msg):
    op: Literal["attached"] = "attached"
    entry_id: str
    backend: Literal["cuda", "memfd"]
    device: int
    granularity: int
    allocations: list[AllocationInfo]
    state: Literal["filling", "ready"]
    #: set when state is "ready"
    layout_hash: str | None = None
    digests: dict[str, str] = Field(default_factory=dict)


class Progress(_Msg):
    op: Literal["progress"] = "progress"
    #: files completely filled so far
    files_done: list[str]
    bytes_done: int
    bytes_total: int


class Ready(_Msg):
    op: Literal["ready"] = "ready"
    layout_hash: str
    digests: dict[str, str]
    fill_seconds: float = 0.0


class Commit(_Msg):
    op: Literal["commit"] = "commit"
    digests: dict[str, str]


class Status(_Msg):
    op: Literal["status"] = "status"


class EntryStatus(_Msg):
    entry_id: str
    model_dir: str | None
    files: int
    bytes: int
    state: str
    readers: int
    writer: bool
    layout_hash: str | None
    fill_seconds: float | None = None
    fill_gb_per_s: float | None = None
    #: bytes of this entry held in the service's host memory (state "parked", or
    #: while they are copied back)
    host_bytes: int = 0


class StatusReply(_Msg):
    op: Literal["status-reply"] = "status-reply"
    pid: int
    backend: str
    device: int
    socket: str
    entries: list[EntryStatus]


class Evict(_Msg):
    op: Literal["evict"] = "evict"
    entry_id: str | None = None  # None: every entry without readers
    #: park idle ready entries in the service's host memory instead of dropping them
    keep_host: bool = False


class Evicted(_Msg):
    op: Literal["evicted"] = "evicted"
    entry_ids: list[str]


class Error(_Msg):
    op: Literal["error"] = "error"
    kind: Literal["mismatch", "busy", "bad-request", "failed", "internal"]
    message: str
    hint: str | None = None


Message = Annotated[
    Union[Attach, Attached, Progress, Ready, Commit, Status, StatusReply, Evict, Evicted, Error],
    Field(discriminator="op"),
]
_adapter: TypeAdapter[Message] = TypeAdapter(Message)


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


class PeerClosed(ProtocolError):
    """The peer closed the connection."""


def encode(msg: BaseModel) -> bytes:
    return msg.model_dump_json().encode()


def decode(body: bytes) -> Message:
    try:
        return _adapter.validate_python(json.loads(body))
    except (ValueError, ValidationError) as exc:
        raise ProtocolError(f"malformed message: {str(exc).splitlines()[0]}") from None


def send(sock: socket.socket, msg: BaseModel, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one frame; ``fds`` are duplicated into the peer (the caller keeps its own)."""
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"{len(fds)} descriptors in one message; at most {MAX_FDS}")
    body = encode(msg)
    if len(body) > MAX_BODY:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_BODY}")
    head = HEADER.pack(len(body), len(fds))
    if fds:
        socket.send_fds(sock, [head], list(fds))
        sock.sendall(body)
    else:
        sock.sendall(head + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise PeerClosed("connection closed mid-message" if buf else "connection closed")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> tuple[Message, list[int]]:
    """Receive one frame: (message, received descriptors, owned by the caller)."""
    head, fds, flags, _addr = socket.recv_fds(sock, HEADER.size, MAX_FDS)
    try:
        if not head:
            raise PeerClosed("connection closed")
        if len(head) < HEADER.size:
            head += _recv_exact(sock, HEADER.size - len(head))
        length, nfds = HEADER.unpack(head)
        if flags & socket.MSG_CTRUNC or len(fds) != nfds:
            raise ProtocolError(f"expected {nfds} descriptors, received {len(fds)}")
        if length > MAX_BODY:
            raise ProtocolError(f"message of {length} bytes exceeds {MAX_BODY}")
        return decode(_recv_exact(sock, length)), fds
    except BaseException:
        close_fds(fds)
        raise


def close_fds(fds: list[int]) -> None:
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
