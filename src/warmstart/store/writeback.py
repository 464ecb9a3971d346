"""Start the kernel's write-back of files while another process still appends to them.

A durable snapshot is on disk before it is published (fsync). CRIU writes its
page images through the page cache and exits as soon as they are there, so an
fsync after it would wait for every byte at once. :class:`EarlyWriteback`
follows the files of a directory as they grow and asks the kernel
(``sync_file_range(SYNC_FILE_RANGE_WRITE)``) to start writing each whole chunk
as soon as it is in the file: the disk works while CRIU still dumps, and the
final fsync only waits for the tail.

It never reads or changes a file; it only changes *when* the kernel writes
dirty pages back. Durability still comes from the fsync at publish: where
``sync_file_range`` is missing or refused, the writer stops quietly and the
fsync does all the work.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

SYNC_FILE_RANGE_WRITE = 2
DEFAULT_CHUNK = 64 << 20
#: How often the directory is listed for new files (growing ones are polled every ``poll_s``).
_RESCAN_S = 0.1


@functools.cache
def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def start_writeback(fd: int, offset: int = 0, nbytes: int = 0) -> bool:
    """Ask the kernel to start writing ``nbytes`` at ``offset`` of ``fd`` back now (0: to EOF).

    Asynchronous: it returns once the write-out is queued, not when it is on
    disk. False where the call is not available or refused (nothing to do then:
    a later fsync writes everything anyway).
    """
    fn = _sync_file_range()
    if fn is None:
        return False
    if fn(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err))


@dataclass
class _Followed:
    fd: int
    #: Bytes from the start of the file whose write-back was started.
    started: int = 0


class EarlyWriteback:
    """Start write-back of the files of ``root`` in ``chunk``-sized steps while they grow.

    Use as a context manager around the writer (CRIU), or :meth:`start` and
    :meth:`stop`. Only files whose name matches ``follow`` (CRIU's page
    images: the bulk of a snapshot) are followed, and only whole chunks are
    started while the writer runs; ``stop(tail=True)`` then starts the rest of
    every followed file, so an fsync right after waits for as little as
    possible. The small files are left to that fsync.
    """

    def __init__(
        self,
        root: Path,
        *,
        follow: str = "pages-*.img",
        chunk: int = DEFAULT_CHUNK,
        poll_s: float = 0.02,
    ) -> None:
        if chunk <= 0 or chunk % 4096:
            raise ValueError("chunk must be a positive multiple of 4096")
        self.root = Path(root)
        self.follow = follow
        self.chunk = chunk
        self.poll_s = poll_s
        #: Bytes whose write-back this writer started, over all files.
        self.started_bytes = 0
        #: Why it gave up early (sync_file_range unavailable, an I/O error), or None.
        self.disabled: str | None = None
        self._files: dict[str, _Followed] = {}
        self._scanned = 0.0
        self._stop = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="early-writeback", daemon=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop(tail=exc_type is None)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, *, tail: bool = False) -> None:
        """Stop following; with ``tail``, start write-back of what is left of every file.

        Only the first call acts.
        """
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            if tail and self.disabled is None:
                self._step(final=True)
        except OSError as exc:
            self.disabled = f"sync_file_range: {exc.strerror}"
        finally:
            for f in self._files.values():
                os.close(f.fd)
            self._files.clear()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._step(final=False)
            except OSError as exc:
                # Only timing is lost: the fsync at publish still writes everything.
                self.disabled = f"sync_file_range: {exc.strerror}"
                return
            if self.disabled is not None:
                return

    def _scan(self, *, now: bool) -> None:
        if not now and time.monotonic() - self._scanned < _RESCAN_S:
            return
        self._scanned = time.monotonic()
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name in self._files or not fnmatch.fnmatchcase(entry.name, self.follow):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            except FileNotFoundError:
                continue
            self._files[entry.name] = _Followed(fd)

    def _step(self, *, final: bool) -> None:
        self._scan(now=final)
        for f in self._files.values():
            size = os.fstat(f.fd).st_size
            end = size if final else size - size % self.chunk
            if end <= f.started:
                continue
            if not start_writeback(f.fd, f.started, end - f.started):
                self.disabled = "sync_file_range is not available here"
                return
            self.started_bytes += end - f.started
            f.started = end
