"""StreamingPull without CRIU: reads that wait for (or fetch) their chunks, failures, resume, publish."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from _store_support import make_snapshot, snapshot_files, tree_bytes

from warmstart.errors import SnapshotCorrupt, StoreError
from warmstart.store.chunking import ChunkParams
from warmstart.store.local import LocalStore
from warmstart.store.remote import RemoteStore, chunk_key
from warmstart.store.signing import TrustPolicy
from warmstart.store.stream import StreamingPull, is_page_image

SMALL = ChunkParams.around(256 << 10)
PAGES = "images/pages-1.img"


class Gated:
    """Wraps a backend: records chunk reads; reads of ``held`` chunks wait for ``release``."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url
        self.got: list[str] = []
        self.held: set[str] = set()
        self.release = threading.Event()

    def get(self, key: str) -> bytes:
        if key in self.held:
            assert self.release.wait(30), "never released"
        if key.startswith("chunks/"):
            self.got.append(key)
        return self.inner.get(key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _pushed(store_url: str, tmp_path: Path, seed: int = 3) -> tuple[LocalStore, RemoteStore, Gated]:
    src = LocalStore(tmp_path / "a")
    make_snapshot(src, "w", snapshot_files(seed, mib=4))
    remote = RemoteStore.open(store_url, jobs=4)
    remote.push(src, "w", params=SMALL)
    gated = Gated(remote.backend)
    return src, RemoteStore(gated, jobs=4), gated  # type: ignore[arg-type]


def _pages_keys(remote: RemoteStore) -> list[str]:
    index, _ = remote.open_index("w", TrustPolicy([]))
    ref = next(f for f in index.files if f.path == PAGES)
    return [chunk_key(c.digest) for c in ref.chunks]


def test_page_images_are_the_bulk() -> None:
    assert is_page_image("images/pages-1.img") and is_page_image("images/pages-12.img.zstd")
    assert not is_page_image("images/pagemap-1.img") and not is_page_image("logs/pages-1.img")
    assert not is_page_image("images/pages-1.img.bak")


def test_open_fetches_everything_but_the_pages_then_reads_fetch_on_demand(
    store_url: str, tmp_path: Path
) -> None:
    src, remote, gated = _pushed(store_url, tmp_path)
    pages_keys = _pages_keys(remote)
    dst = LocalStore(tmp_path / "b")
    pull = StreamingPull(remote, "w", dst, trust=TrustPolicy([]))
    pull.open()
    assert not set(gated.got) & set(pages_keys)  # no page chunk fetched yet
    want = src.path_of("w") / PAGES
    assert (pull.path / "images/core-1.img").read_bytes() == (
        src.path_of("w") / "images/core-1.img"
    ).read_bytes()
    assert pull.bulk_files() == [PAGES]

    # a read deep into the pages image fetches just the chunks under it, before the background starts
    reader = pull.open_pages(pull.path / PAGES)
    offset, buf = 3 << 20, bytearray(100_000)
    assert reader.readinto(memoryview(buf), offset) == len(buf)
    assert bytes(buf) == want.read_bytes()[offset : offset + len(buf)]
    fetched = [k for k in gated.got if k in pages_keys]
    assert 1 <= len(fetched) <= 2 and pages_keys[0] not in fetched
    reader.close()

    pull.start()
    pull.wait()
    path = pull.publish(durable=False)
    assert tree_bytes(path) == tree_bytes(src.path_of("w"))
    assert dst.manifest("w") == src.manifest("w")
    assert not list((dst.root / ".staging").iterdir())
    assert pull.stats.on_demand_chunks == len(fetched)
    assert (
        pull.stats.fetched_bytes == pull.stats.logical_bytes
    )  # each chunk once (manifest included)


def test_a_read_waits_for_its_chunk_while_the_background_fetches_it(
    file_url: str, tmp_path: Path
) -> None:
    src, remote, gated = _pushed(file_url, tmp_path)
    last = _pages_keys(remote)[-1]
    gated.held.add(last)
    pull = StreamingPull(remote, "w", LocalStore(tmp_path / "b"), trust=TrustPolicy([]))
    pull.open()
    pull.start()
    reader = pull.open_pages(pull.path / PAGES)
    size = (src.path_of("w") / PAGES).stat().st_size
    got: list[bytes] = []
    t = threading.Thread(target=lambda: got.append(_read(reader, size - 10, 10)))
    t.start()
    t.join(1.0)
    assert t.is_alive() and not got  # blocked: its chunk is in flight, held
    gated.release.set()
    t.join(10)
    assert got == [(src.path_of("w") / PAGES).read_bytes()[-10:]]
    pull.wait()
    reader.close()
    pull.publish(durable=False)


def _read(reader, offset: int, n: int) -> bytes:  # type: ignore[no-untyped-def]
    buf = bytearray(n)
    return bytes(buf[: reader.readinto(memoryview(buf), offset)])


def test_damaged_chunk_fails_waiting_readers_and_leaves_nothing(
    file_url: str, tmp_path: Path
) -> None:
    _src, remote, gated = _pushed(file_url, tmp_path)
    keys = _pages_keys(remote)
    victim = keys[len(keys) // 2]
    path = Path(file_url.removeprefix("file://")) / victim
    data = bytearray(path.read_bytes())
    data[7] ^= 0x40
    path.write_bytes(bytes(data))
    gated.held.add(victim)  # the reader below is waiting when the damage is found
    dst = LocalStore(tmp_path / "b")
    pull = StreamingPull(remote, "w", dst, trust=TrustPolicy([]))
    pull.open()
    pull.start()
    reader = pull.open_pages(pull.path / PAGES)
    errors: list[BaseException] = []

    def read_all() -> None:
        try:
            _read(reader, 0, 4 << 20)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=read_all)
    t.start()
    gated.release.set()
    t.join(10)
    assert (
        len(errors) == 1 and isinstance(errors[0], SnapshotCorrupt) and "BLAKE3" in str(errors[0])
    )
    with pytest.raises(SnapshotCorrupt, match="BLAKE3"):
        pull.wait()
    reader.close()
    pull.abort(errors[0])
    assert dst.entries() == [] and not list((dst.root / ".staging").iterdir())


def test_an_interrupted_stream_is_resumed_by_pull(store_url: str, tmp_path: Path) -> None:
    src, remote, _gated = _pushed(store_url, tmp_path)
    dst = LocalStore(tmp_path / "b")
    pull = StreamingPull(remote, "w", dst, trust=TrustPolicy([]))
    pull.open()
    reader = pull.open_pages(pull.path / PAGES)
    _read(reader, 0, 2 << 20)
    reader.close()
    pull.abort(StoreError("the restore was refused"))  # not damage: staging stays, resumable
    assert dst.entries() == [] and len(list((dst.root / ".staging").iterdir())) == 1
    again = remote.pull("w", dst, trust=TrustPolicy([]))
    assert again.resumed_bytes >= 2 << 20
    assert tree_bytes(dst.path_of("w")) == tree_bytes(src.path_of("w"))
