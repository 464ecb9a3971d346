"""Durability of a checkpoint: the fsync/none choice, and early write-back during the dump."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
from pathlib import Path
from typing import ClassVar

import psutil
import pytest
from _support import Tree, wait_for, warmstart_cmd

from warmstart.errors import CriuError
from warmstart.host.criu import CriuVersion, DumpOptions
from warmstart.host.process import kill_tree
from warmstart.snapshot import checkpoint as checkpoint_mod
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.manifest import Manifest
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store import local as local_mod
from warmstart.store.local import LocalStore
from warmstart.store.writeback import EarlyWriteback

MiB = 1 << 20


class _CacheStat(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64) for n in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


def dirty_pages(path: Path) -> int | None:
    """Pages of ``path`` still dirty in the page cache (cachestat(2), Linux 6.5+), or None."""
    libc = ctypes.CDLL(None, use_errno=True)
    stat = _CacheStat()
    fd = os.open(path, os.O_RDONLY)
    try:
        rc = libc.syscall(
            451, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(stat), 0
        )  # x86-64/arm64
    finally:
        os.close(fd)
    if rc != 0:
        assert ctypes.get_errno() in (errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP)
        return None
    return stat.dirty


class RecordingWriteback(EarlyWriteback):
    """EarlyWriteback with a small chunk that remembers what it did before it was stopped."""

    made: ClassVar[list[RecordingWriteback]] = []

    def __init__(self, root: Path, **kw: object) -> None:
        super().__init__(root, chunk=4 * MiB, poll_s=0.005)
        self.before_stop = -1
        RecordingWriteback.made.append(self)

    def stop(self, *, tail: bool = False) -> None:
        self.before_stop = self.started_bytes
        super().stop(tail=tail)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type[RecordingWriteback]:
    RecordingWriteback.made = []
    monkeypatch.setattr(checkpoint_mod, "EarlyWriteback", RecordingWriteback)
    return RecordingWriteback


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- EarlyWriteback on its own ---------------------------------------------------


def test_writeback_follows_a_growing_file_in_whole_chunks(tmp_path: Path) -> None:
    data = os.urandom(MiB) * 74
    path = tmp_path / "pages-1.img"
    writer = EarlyWriteback(tmp_path, chunk=16 * MiB, poll_s=0.005).start()
    try:
        with open(path, "wb") as f:
            f.write(data[: 64 * MiB])  # four whole chunks
            f.flush()
            wait_for(lambda: writer.started_bytes == 64 * MiB, what="four chunks started")
            f.write(data[64 * MiB :])  # 10 MiB: not a whole chunk
        (tmp_path / "pages-2.img").write_bytes(b"x" * 100)
        (tmp_path / "core-1.img").write_bytes(b"y" * (20 * MiB))  # not a page image: not followed
        assert writer.started_bytes % (16 * MiB) == 0
    finally:
        writer.stop(tail=True)
    assert writer.disabled is None
    # the tails of both page images were started at stop(tail=True)
    assert writer.started_bytes == 74 * MiB + 100
    assert path.read_bytes() == data
    dirty = dirty_pages(path)
    if dirty is not None:  # the kernel really writes it back, no fsync needed
        wait_for(lambda: dirty_pages(path) == 0, 30, 0.05, "pages written back")


def test_writeback_stop_without_tail_starts_nothing_more(tmp_path: Path) -> None:
    path = tmp_path / "pages-1.img"
    path.write_bytes(b"\1" * (3 * MiB))
    writer = EarlyWriteback(tmp_path, chunk=2 * MiB, poll_s=0.005).start()
    wait_for(lambda: writer.started_bytes == 2 * MiB, what="one chunk started")
    writer.stop(tail=False)
    assert writer.started_bytes == 2 * MiB
    writer.stop(tail=True)  # a second stop is harmless (files already closed)
    assert writer.started_bytes == 2 * MiB


def test_writeback_rejects_a_chunk_that_is_not_whole_pages(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        EarlyWriteback(tmp_path, chunk=1000)


# -- checkpoint with real CRIU -----------------------------------------------------


@pytest.mark.criu
def test_checkpoint_with_early_writeback_restores_identical_state(
    tree_factory, store_dir: Path, recording: type[RecordingWriteback]
) -> None:
    tree = tree_factory(mem_mib=256)
    before = tree.digests()
    store = LocalStore(store_dir)

    result = checkpoint(tree.pid, store=store, name="wb")
    assert tree.popen is not None
    tree.popen.wait(timeout=10)
    at_checkpoint = tree.status()

    (writer,) = recording.made
    assert writer.disabled is None
    assert writer.before_stop > 0, "no chunk was written back while CRIU was dumping"
    pages = sum(f.size for f in result.manifest.files if "pages-" in f.path)
    assert writer.started_bytes >= pages
    assert result.manifest.durability == "fsync"
    assert Manifest.load(store_dir / "wb").durability == "fsync"

    restored = restore("wb", store=store, request=RestoreRequest(verify=True))
    back = Tree(tree.state, None, restored.pid)
    try:
        now = back.wait_progress()
        assert now["counter"] > at_checkpoint["counter"]
        assert back.digests() == before
    finally:
        kill_tree(restored.pid)


@pytest.mark.criu
def test_durability_none_is_recorded_and_never_fsyncs(
    tree_factory,
    store_dir: Path,
    recording: type[RecordingWriteback],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_fsync(*_a: object) -> None:
        raise AssertionError("durability none must not fsync")

    monkeypatch.setattr(local_mod, "fsync_tree", no_fsync)
    monkeypatch.setattr(local_mod, "fsync_dir", no_fsync)
    tree = tree_factory()
    store = LocalStore(store_dir)
    result = checkpoint(
        tree.pid,
        store=store,
        name="fast",
        options=CheckpointOptions(durable=False, leave_running=True),
    )
    assert result.manifest.durability == "none"
    assert CheckpointOptions(durable=False).durability == "none"
    assert [e.name for e in store.entries()] == ["fast"]
    assert store.manifest("fast").durability == "none"
    assert recording.made == []  # nothing to overlap without an fsync
    assert tree.alive()
    tree.wait_progress()


# -- a dump that fails while the writer runs ------------------------------------------


class FailingCriu:
    """Stands in for CRIU: stops the tree, writes a growing pages image, then fails."""

    version = CriuVersion(4, 1, 1)
    path = Path("/nonexistent/criu")

    def __init__(self, writer_seen: type[RecordingWriteback]) -> None:
        self.writer_seen = writer_seen

    def dump(
        self, pid: int, images: Path, options: DumpOptions, *, log: Path, on_start=None
    ) -> None:
        for p in [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]:
            os.kill(p, signal.SIGSTOP)  # as criu dump --leave-stopped does
        chunk = os.urandom(MiB)
        with open(images / "pages-1.img", "wb") as f:
            f.write(chunk * 24)
            f.flush()
            (writer,) = self.writer_seen.made
            wait_for(lambda: writer.started_bytes > 0, what="early write-back during the dump")
            f.write(chunk[:12345])
        log.write_text("Error (criu/cr-dump.c:1): simulated failure\n")
        raise CriuError("criu dump failed: simulated", log=str(log))


def test_failed_dump_with_writer_running_publishes_nothing_and_resumes_the_tree(
    tree_factory, store_dir: Path, recording: type[RecordingWriteback]
) -> None:
    tree = tree_factory()
    store = LocalStore(store_dir)
    with pytest.raises(CriuError, match="simulated"):
        checkpoint(tree.pid, store=store, name="broken", criu=FailingCriu(recording))  # type: ignore[arg-type]
    (writer,) = recording.made
    assert writer.before_stop > 0
    assert not writer._thread.is_alive()
    assert writer._files == {}  # its descriptors are closed
    assert store.entries() == []
    assert not (store_dir / "broken").exists()
    assert list((store_dir / ".staging").iterdir()) == []
    running = (psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING, psutil.STATUS_DISK_SLEEP)
    wait_for(lambda: psutil.Process(tree.pid).status() in running, 10, what="tree resumed")
    tree.wait_progress()


# -- the digester that runs beside the writer ---------------------------------------


def test_following_digester_hashes_a_file_growing_in_odd_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from warmstart.store import integrity

    monkeypatch.setattr(integrity, "_WINDOW", 1 * MiB)  # many windows, unaligned starts
    pages = tmp_path / "pages-1.img"
    digester = integrity.FollowingDigester(tmp_path).start()
    rnd = random.Random(7)
    written = 0
    with open(pages, "wb", buffering=0) as f:
        while written < 5 * MiB:
            piece = os.urandom(rnd.randint(1, 300_000))
            f.write(piece)
            written += len(piece)
            if rnd.random() < 0.3:
                wait_for(lambda: digester._state.get(pages) is not None, what="digester follows")
    (tmp_path / "core-1.img").write_bytes(b"core" * 999)
    result = digester.finish()
    assert (
        result["pages-1.img"] == integrity.digest_file(pages) == (written, result["pages-1.img"][1])
    )
    assert result["core-1.img"] == integrity.digest_file(tmp_path / "core-1.img")


# -- the command line -------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*warmstart_cmd(), "checkpoint", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_rejects_an_unknown_durability_in_one_line(store_dir: Path) -> None:
    proc = _cli("--pid", "4999999", "--durability", "sometimes", "--store", str(store_dir))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown durability 'sometimes'" in lines[0], proc.stderr


@pytest.mark.criu
def test_cli_durability_none_is_reported_and_recorded(tree_factory, store_dir: Path) -> None:
    tree = tree_factory()
    proc = _cli(
        "--pid", str(tree.pid), "--name", "quick", "--durability", "none", "--leave-running",
        "--store", str(store_dir), "--json",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["durability"] == "none"
    assert LocalStore(store_dir).manifest("quick").durability == "none"
    proc = _cli(
        "--pid",
        str(tree.pid),
        "--name",
        "safe",
        "--leave-running",
        "--store",
        str(store_dir),
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["durability"] == "fsync"
    tree.wait_progress()


def test_piece_digests_cover_every_byte_and_catch_one_flipped_byte(tmp_path: Path) -> None:
    """Pages images get one digest per PIECE_SIZE piece; verify checks them in parallel."""
    import os

    from warmstart.errors import SnapshotCorrupt
    from warmstart.store.integrity import PIECE_SIZE, Expected, FollowingDigester, digest_file, verify_files

    root = tmp_path / "img"
    root.mkdir()
    data = os.urandom(1 << 20) * (2 * PIECE_SIZE // (1 << 20)) + b"tail" * 1000
    digester = FollowingDigester(root).start()
    with open(root / "pages-1.img", "wb") as f:
        for pos in range(0, len(data), 7 << 20):  # grows in pieces that straddle the boundaries
            f.write(data[pos : pos + (7 << 20)])
            f.flush()
    digests = digester.finish()
    pieces = digester.pieces()["pages-1.img"]
    assert len(pieces) == 3
    size, whole = digests["pages-1.img"]
    assert (size, whole) == digest_file(root / "pages-1.img")
    expected = [Expected("pages-1.img", size, whole, tuple(pieces))]
    assert verify_files(root, expected) == size
    with open(root / "pages-1.img", "r+b") as f:
        f.seek(PIECE_SIZE + 12345)
        f.write(b"\0" if data[PIECE_SIZE + 12345] else b"\1")
    with pytest.raises(SnapshotCorrupt, match="fails its checksum"):
        verify_files(root, expected)
