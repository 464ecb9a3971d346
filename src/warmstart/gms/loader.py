"""Stream safetensors data sections into service allocations.

Several lanes (threads) take 64 MiB chunks from one queue in file order. Each
lane reads a chunk into one of its two staging buffers (pinned host memory
for CUDA) with ``preadv``, hashes it, waits for its previous copy and queues
the copy of this one, so reading chunk *k+1* overlaps copying chunk *k*. File
reads and driver calls release the GIL, so lanes run in parallel.

A file counts as filled when all its chunks are copied; ``on_progress``
reports that, so a worker can wait for only the files it still misses.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from warmstart.errors import WarmstartError
from warmstart.gms.backend import Lane, ServerBackend
from warmstart.gms.layout import DIGEST_CHUNK, chunk_digest, combine_digests


@dataclass
class FillFile:
    name: str
    path: str
    data_offset: int
    data_size: int
    #: the target returned by ServerBackend.open_fill
    target: int


@dataclass
class FillResult:
    digests: dict[str, str]
    seconds: float
    nbytes: int

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class _Chunk:
    file: int
    index: int
    offset: int  # inside the data section
    length: int


@dataclass
class _State:
    remaining: list[int]
    parts: list[list[bytes]]
    done_files: list[str] = field(default_factory=list)
    bytes_done: int = 0
    error: BaseException | None = None


class LoadError(WarmstartError):
    """Reading or copying the weights failed."""


def default_lanes() -> int:
    return max(2, min(8, os.cpu_count() or 2))


def fill(
    backend: ServerBackend,
    files: Sequence[FillFile],
    *,
    lanes: int | None = None,
    on_progress: Callable[[list[str], int], None] | None = None,
    cancel: threading.Event | None = None,
) -> FillResult:
    """Fill every file's target; returns the content digests (see `warmstart.gms.layout`)."""
    lanes = lanes or default_lanes()
    chunks = queue.SimpleQueue[_Chunk | None]()
    counts = []
    for i, f in enumerate(files):
        n = max(1, -(-f.data_size // DIGEST_CHUNK)) if f.data_size else 0
        counts.append(n)
        for c in range(n):
            off = c * DIGEST_CHUNK
            chunks.put(_Chunk(i, c, off, min(DIGEST_CHUNK, f.data_size - off)))
    for _ in range(lanes):
        chunks.put(None)
    chunk_size = max(4096, min(DIGEST_CHUNK, max((f.data_size for f in files), default=0)))
    state = _State(remaining=list(counts), parts=[[b""] * n for n in counts])
    lock = threading.Lock()
    fds: list[int] = []
    t0 = time.perf_counter()
    try:
        for f in files:
            fds.append(os.open(f.path, os.O_RDONLY | os.O_CLOEXEC))
        for i, f in enumerate(files):  # empty data sections are done at once
            if counts[i] == 0:
                state.done_files.append(f.name)

        def finished(ch: _Chunk) -> None:
            with lock:
                state.bytes_done += ch.length
                state.remaining[ch.file] -= 1
                newly = state.remaining[ch.file] == 0
                if newly:
                    state.done_files.append(files[ch.file].name)
                snapshot = (list(state.done_files), state.bytes_done)
            if on_progress is not None and newly:
                on_progress(*snapshot)

        def run_lane(lane: Lane) -> None:
            try:
                lane.bind()
                i, prev = 0, None
                while state.error is None and not (cancel and cancel.is_set()):
                    ch = chunks.get()
                    if ch is None:
                        break
                    f = files[ch.file]
                    buf = lane.buffers[i]
                    got = 0
                    while got < ch.length:
                        n = os.preadv(fds[ch.file], [buf[got : ch.length]], f.data_offset + ch.offset + got)
                        if n <= 0:
                            raise LoadError(f"{f.path} ended early (changed while loading?)")
                        got += n
                    state.parts[ch.file][ch.index] = chunk_digest(buf[: ch.length])
                    lane.sync()
                    if prev is not None:
                        finished(prev)
                    lane.submit(i, ch.length, f.target, ch.offset)
                    prev, i = ch, i ^ 1
                lane.sync()
                if prev is not None:
                    finished(prev)
            except BaseException as exc:  # noqa: BLE001 - reported below
                state.error = state.error or exc
            finally:
                try:
                    lane.close()
                except BaseException as exc:  # noqa: BLE001
                    state.error = state.error or exc

        # Every lane is taken before any runs: a lane that finished early and went
        # back to the backend's idle pool must not be handed out again in this fill.
        taken = []
        try:
            for _ in range(lanes):
                taken.append(backend.lane(chunk_size))
        except BaseException:
            for lane in taken:
                lane.close()
            raise
        threads = [
            threading.Thread(target=run_lane, args=(lane,), name=f"gms-lane-{k}", daemon=True)
            for k, lane in enumerate(taken)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for fd in fds:
            os.close(fd)
    if state.error is not None:
        err = state.error
        if isinstance(err, WarmstartError):
            raise err
        raise LoadError(f"loading the weights failed: {err}") from err
    if cancel is not None and cancel.is_set():
        raise LoadError("loading was cancelled")
    digests = {f.name: combine_digests(state.parts[i]) for i, f in enumerate(files)}
    return FillResult(digests, time.perf_counter() - t0, sum(f.data_size for f in files))
