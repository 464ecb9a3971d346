"""Push and pull snapshots through a remote store: a directory, and a real S3 server (moto) on loopback."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from _store_support import make_snapshot, pages, snapshot_files, tree_bytes

from warmstart.errors import NotFoundError, SnapshotCorrupt, Untrusted, UsageError
from warmstart.store.chunking import ChunkParams
from warmstart.store.local import LocalStore
from warmstart.store.remote import RemoteStore, StoreBusy, chunk_key, index_key
from warmstart.store.signing import SigningKey, TrustPolicy, generate

SMALL = ChunkParams.around(256 << 10)


class Counting:
    """Wraps a backend; counts chunk reads (to prove refusals fetch nothing)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url
        self.chunk_gets = 0

    def get(self, key: str) -> bytes:
        if key.startswith("chunks/"):
            self.chunk_gets += 1
        return self.inner.get(key)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def _no_trust() -> TrustPolicy:
    return TrustPolicy([])


def test_round_trip(store_url: str, tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    files = snapshot_files(1)
    manifest = make_snapshot(src, "w1", files)
    remote = RemoteStore.open(store_url, jobs=4)

    pushed = remote.push(src, "w1", params=SMALL)
    assert pushed.logical_bytes == sum(p.stat().st_size for p in src.path_of("w1").rglob("*") if p.is_file())
    assert pushed.uploaded_chunks == pushed.chunks > 8
    assert [s.name for s in remote.snapshots()] == ["w1"]

    pulled = remote.pull("w1", dst, as_name="copy", trust=_no_trust())
    assert pulled.path == dst.root / "copy"
    assert tree_bytes(pulled.path) == tree_bytes(src.path_of("w1"))
    assert dst.manifest("copy") == manifest
    # owner-only on the way in
    for p in pulled.path.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, (p, oct(mode))


def test_file_store_is_owner_only(file_url: str, tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "a")
    make_snapshot(src, "w1", snapshot_files(2, mib=1))
    RemoteStore.open(file_url).push(src, "w1", params=SMALL)
    root = Path(file_url.removeprefix("file://"))
    for p in root.rglob("*"):
        mode = stat.S_IMODE(p.stat().st_mode)
        assert mode & 0o077 == 0, (p, oct(mode))


def test_second_snapshot_shares_chunks(store_url: str, tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "a")
    first = snapshot_files(3, mib=16)
    mem = first["images/pages-1.img"]
    second = dict(first)
    # a page touched in between shifts the rest of the file; one region changed
    second["images/pages-1.img"] = mem[: 5 << 20] + os.urandom(4096) + mem[5 << 20 : 12 << 20] + os.urandom(1 << 20) + mem[13 << 20 :]
    make_snapshot(src, "t1", first)
    make_snapshot(src, "t2", second)
    remote = RemoteStore.open(store_url)
    a = remote.push(src, "t1", params=SMALL)
    b = remote.push(src, "t2", params=SMALL)
    assert b.present_chunks > 0
    assert b.uploaded_bytes < 0.2 * b.logical_bytes, (b.uploaded_bytes, b.logical_bytes)
    stats = remote.stats()
    assert stats.logical_bytes == a.logical_bytes + b.logical_bytes
    assert stats.stored_bytes == a.uploaded_bytes + b.uploaded_bytes
    assert stats.dedup_ratio > 1.6
    assert stats.unreferenced_chunks == 0


def test_push_is_idempotent_and_names_are_not_stolen(store_url: str, tmp_path: Path) -> None:
    src, other = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "o")
    make_snapshot(src, "w", snapshot_files(4, mib=1))
    make_snapshot(other, "w", snapshot_files(5, mib=1))
    remote = RemoteStore.open(store_url)
    remote.push(src, "w", params=SMALL)
    again = remote.push(src, "w", params=SMALL)
    assert again.already_pushed and again.uploaded_chunks == 0
    with pytest.raises(UsageError, match="already exists"):
        remote.push(other, "w", params=SMALL)
    remote.push(other, "w", as_name="w-other", params=SMALL)
    assert {s.name for s in remote.snapshots()} == {"w", "w-other"}


def test_concurrent_writers(store_url: str, tmp_path: Path) -> None:
    """Eight writers at once, overlapping content, two of them racing for one name."""
    shared = pages(6, 4)
    stores = []
    for i in range(8):
        s = LocalStore(tmp_path / f"n{i}")
        files = snapshot_files(100 + i, mib=2)
        files["images/pages-2.img"] = shared
        make_snapshot(s, "same" if i >= 6 else f"w{i}", files)
        stores.append(s)
    errors: list[Exception] = []
    barrier = threading.Barrier(8)

    def push(i: int) -> None:
        barrier.wait()
        name = "same" if i >= 6 else f"w{i}"
        try:
            RemoteStore.open(store_url, jobs=3).push(stores[i], name, params=SMALL)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=push, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], UsageError), errors
    remote = RemoteStore.open(store_url)
    assert sorted(s.name for s in remote.snapshots()) == ["same", *(f"w{i}" for i in range(6))]
    dst = LocalStore(tmp_path / "dst")
    for i in range(6):
        remote.pull(f"w{i}", dst, trust=_no_trust())
        assert tree_bytes(dst.path_of(f"w{i}")) == tree_bytes(stores[i].path_of(f"w{i}"))
    got = tree_bytes(remote.pull("same", dst, trust=_no_trust()).path)
    assert got in (tree_bytes(stores[6].path_of("same")), tree_bytes(stores[7].path_of("same")))
    # the loser's own chunks are garbage now; collecting them leaves every snapshot whole
    remote.gc(grace=0)
    assert remote.stats().unreferenced_chunks == 0
    again = LocalStore(tmp_path / "again")
    for s in remote.snapshots():
        remote.pull(s.name, again, trust=_no_trust())


def test_corrupt_chunk_is_refused(store_url: str, tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    make_snapshot(src, "w", snapshot_files(7, mib=2))
    remote = RemoteStore.open(store_url)
    remote.push(src, "w", params=SMALL)
    victim = next(o for o in remote.backend.list("chunks/"))
    data = bytearray(remote.backend.get(victim.key))
    data[len(data) // 2] ^= 0x01
    remote.backend.put(victim.key, bytes(data))
    with pytest.raises(SnapshotCorrupt, match="BLAKE3"):
        remote.pull("w", dst, trust=_no_trust())
    assert dst.entries() == []
    assert list((dst.root / ".staging").iterdir()) == []
    # verify finds it; repair deletes it; a push of the snapshot sends it again
    found = remote.verify()
    assert found.bad == [victim.key.rsplit("/", 1)[-1]] and found.chunks == len(list(remote.backend.list("chunks/")))
    assert remote.verify(repair=True).repaired
    remote.remove("w")
    assert remote.push(src, "w", params=SMALL).uploaded_chunks == 1
    assert remote.verify().bad == []
    assert tree_bytes(remote.pull("w", dst, trust=_no_trust()).path) == tree_bytes(src.path_of("w"))


def test_missing_snapshot_is_a_clear_error(store_url: str, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="not found"):
        RemoteStore.open(store_url).pull("nope", LocalStore(tmp_path / "b"), trust=_no_trust())


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("prod", "other"):
        key, pub, _ = generate(name, tmp_path / "keys")
        out[name], out[f"{name}.pub"] = key, pub
    assert stat.S_IMODE(out["prod"].stat().st_mode) == 0o600
    return out


def test_signature_trust(store_url: str, tmp_path: Path, keys: dict[str, Path]) -> None:
    src = LocalStore(tmp_path / "a")
    make_snapshot(src, "w", snapshot_files(8, mib=1))
    remote = RemoteStore.open(store_url)
    remote.push(src, "w", params=SMALL, sign=SigningKey.load(keys["prod"]))
    remote.push(src, "w", as_name="by-other", params=SMALL, sign=SigningKey.load(keys["other"]))
    remote.push(src, "w", as_name="unsigned", params=SMALL)
    trust = TrustPolicy.from_sources([keys["prod.pub"]])

    ok = remote.pull("w", LocalStore(tmp_path / "ok"), trust=trust)
    assert ok.trust is not None and ok.trust.trusted and ok.trust.key_name == "prod"

    counting = Counting(remote.backend)
    guarded = RemoteStore(counting)
    dst = LocalStore(tmp_path / "refused")
    with pytest.raises(Untrusted, match="unknown key"):
        guarded.pull("by-other", dst, trust=trust)
    with pytest.raises(Untrusted, match="unsigned"):
        guarded.pull("unsigned", dst, trust=trust)

    # alter the signed index: the signature no longer verifies
    env = json.loads(remote.backend.get(index_key("w")))
    env["index"] = env["index"].replace('"pushed_from":"', '"pushed_from":"evil-')
    remote.backend.put(index_key("w"), json.dumps(env).encode())
    with pytest.raises(Untrusted, match="does not verify"):
        guarded.pull("w", dst, trust=trust)
    # a signature moved onto another index does not verify either
    good = json.loads(remote.backend.get(index_key("by-other")))
    unsigned = json.loads(remote.backend.get(index_key("unsigned")))
    unsigned["signature"] = good["signature"]
    remote.backend.put(index_key("unsigned"), json.dumps(unsigned).encode())
    with pytest.raises(Untrusted, match="does not verify"):
        guarded.pull("unsigned", dst, trust=TrustPolicy.from_sources([keys["other.pub"]]))

    assert counting.chunk_gets == 0, "a refused snapshot must not be fetched"
    assert not dst.root.exists() or dst.entries() == []
    # with no trusted keys and no requirement, unsigned snapshots still pull
    assert remote.pull("by-other", LocalStore(tmp_path / "open"), trust=_no_trust()).trust.trusted is False
    with pytest.raises(Untrusted, match="no trusted keys"):
        remote.pull("by-other", LocalStore(tmp_path / "x"), trust=TrustPolicy([], require_signed=True))


def test_gc_removes_only_unreferenced_old_chunks(store_url: str, tmp_path: Path) -> None:
    src = LocalStore(tmp_path / "a")
    a, b = snapshot_files(9, mib=2), snapshot_files(10, mib=2)
    b["images/pages-2.img"] = a["images/pages-1.img"]  # b shares a's memory
    make_snapshot(src, "a", a)
    make_snapshot(src, "b", b)
    remote = RemoteStore.open(store_url)
    remote.push(src, "a", params=SMALL)
    remote.push(src, "b", params=SMALL)
    remote.remove("a")
    before = remote.stats()
    assert before.unreferenced_chunks > 0
    young = remote.gc(grace=3600)
    assert young.deleted_chunks == 0 and young.kept_young_chunks == before.unreferenced_chunks
    dry = remote.gc(grace=0, dry_run=True)
    assert dry.deleted_chunks == before.unreferenced_chunks
    assert remote.stats().unreferenced_chunks == before.unreferenced_chunks
    done = remote.gc(grace=0)
    assert done.deleted_chunks == before.unreferenced_chunks
    after = remote.stats()
    assert after.unreferenced_chunks == 0 and after.stored_bytes == before.stored_bytes - done.deleted_bytes
    pulled = remote.pull("b", LocalStore(tmp_path / "b"), trust=_no_trust())
    assert tree_bytes(pulled.path) == tree_bytes(src.path_of("b"))


def test_gc_racing_a_push_keeps_the_push_intact(store_url: str, tmp_path: Path) -> None:
    """The dedup race: a push finds chunks present that only a removed snapshot referenced."""
    src = LocalStore(tmp_path / "a")
    old = snapshot_files(11, mib=4)
    new = dict(old, **{"images/pages-9.img": pages(12, 2)})
    make_snapshot(src, "old", old)
    make_snapshot(src, "new", new)
    remote = RemoteStore.open(store_url, jobs=2, heartbeat=0.2)
    remote.push(src, "old", params=SMALL)
    remote.remove("old")  # its chunks are now garbage, but "new" is about to reuse them

    outcome: dict[str, object] = {}

    def push() -> None:
        try:
            outcome["push"] = RemoteStore.open(store_url, jobs=2, heartbeat=0.2).push(
                src, "new", params=SMALL, limit_rate=6 << 20
            )
        except Exception as exc:  # noqa: BLE001
            outcome["push"] = exc

    t = threading.Thread(target=push)
    t.start()
    busy = collected = 0
    while t.is_alive():
        try:
            r = remote.gc(grace=0)
            collected += r.deleted_chunks
        except StoreBusy:
            busy += 1
        time.sleep(0.05)
    t.join()
    result = outcome["push"]
    assert not isinstance(result, Exception), result
    assert busy > 0, "the collector never met the push"
    remote.gc(grace=0)
    pulled = remote.pull("new", LocalStore(tmp_path / "b"), trust=_no_trust())
    assert tree_bytes(pulled.path) == tree_bytes(src.path_of("new"))


def test_stalled_push_does_not_publish_after_a_gc(store_url: str, tmp_path: Path) -> None:
    """A push whose lease expired (no heartbeat) while a collection ran refuses to publish."""
    src = LocalStore(tmp_path / "a")
    files = snapshot_files(13, mib=2)
    make_snapshot(src, "old", files)
    make_snapshot(src, "new", dict(files, **{"logs/extra.log": b"x"}))
    remote = RemoteStore.open(store_url)
    remote.push(src, "old", params=SMALL)
    remote.remove("old")
    stalled = RemoteStore.open(store_url, lease_ttl=0.5, heartbeat=3600)
    collector = RemoteStore.open(store_url, lease_ttl=0.5)

    class CollectMidway:
        def __init__(self) -> None:
            self.done = False

        def start(self, total: int, what: str) -> None:
            pass

        def advance(self, n: int) -> None:
            if not self.done:
                self.done = True
                time.sleep(1.5)  # the push's lease expires
                assert collector.gc(grace=0).deleted_chunks > 0

    with pytest.raises(StoreBusy, match="garbage collection"):
        stalled.push(src, "new", params=SMALL, progress=CollectMidway())
    assert [s.name for s in remote.snapshots()] == []
    # pushing again re-sends what the collector removed
    remote.push(src, "new", params=SMALL)
    pulled = remote.pull("new", LocalStore(tmp_path / "b"), trust=_no_trust())
    assert tree_bytes(pulled.path) == tree_bytes(src.path_of("new"))


def test_pull_resumes_into_its_staging_directory(store_url: str, tmp_path: Path) -> None:
    src, dst = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    make_snapshot(src, "w", snapshot_files(14, mib=4))
    remote = RemoteStore.open(store_url, jobs=1)
    remote.push(src, "w", params=SMALL)

    class Interrupt:
        seen = 0

        def start(self, total: int, what: str) -> None:
            pass

        def advance(self, n: int) -> None:
            self.seen += n
            if self.seen > 2 << 20:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        remote.pull("w", dst, trust=_no_trust(), progress=Interrupt())
    assert dst.entries() == []
    assert len(list((dst.root / ".staging").iterdir())) == 1
    again = remote.pull("w", dst, trust=_no_trust())
    assert again.resumed_bytes >= 2 << 20
    assert again.fetched_bytes <= again.logical_bytes - again.resumed_bytes + (1 << 20)
    assert tree_bytes(dst.path_of("w")) == tree_bytes(src.path_of("w"))
    assert list((dst.root / ".staging").iterdir()) == []


def test_bad_urls_are_clear(tmp_path: Path) -> None:
    from warmstart.errors import StoreError

    for url, fragment in [
        ("ftp://x/y", "scheme"),
        ("file://relative/path", "absolute"),
        ("s3:///prefix", "no bucket"),
        ("/plain/path", "not a store URL"),
    ]:
        with pytest.raises(StoreError, match=fragment):
            RemoteStore.open(url)


def test_chunk_objects_are_named_by_content(file_url: str, tmp_path: Path) -> None:
    import blake3

    src = LocalStore(tmp_path / "a")
    make_snapshot(src, "w", snapshot_files(15, mib=1))
    remote = RemoteStore.open(file_url)
    remote.push(src, "w", params=SMALL)
    objs = list(remote.backend.list("chunks/"))
    assert objs
    for o in objs:
        digest = o.key.rsplit("/", 1)[-1]
        assert chunk_key(digest) == o.key
        assert blake3.blake3(remote.backend.get(o.key)).hexdigest() == digest


def test_index_naming_a_directory_as_file_is_refused(file_url: str, tmp_path: Path) -> None:
    """A (signed or not) index may not make pull write over the staging layout."""
    src, dst = LocalStore(tmp_path / "a"), LocalStore(tmp_path / "b")
    make_snapshot(src, "w", snapshot_files(16, mib=1))
    remote = RemoteStore.open(file_url)
    remote.push(src, "w", params=SMALL)
    env = json.loads(remote.backend.get(index_key("w")))
    index = json.loads(env["index"])
    clash = next(f for f in index["files"] if f["path"] == "logs/dump.log")
    clash["path"] = "logs"  # 'logs' is a directory of every staging snapshot
    env["index"] = json.dumps(index)
    remote.backend.put(index_key("w"), json.dumps(env).encode())
    with pytest.raises(SnapshotCorrupt, match="directory"):
        remote.pull("w", dst, trust=_no_trust())
    assert dst.entries() == [] and list((dst.root / ".staging").iterdir()) == []


def test_gc_sweeps_temp_files_of_killed_writers(file_url: str, tmp_path: Path) -> None:
    root = Path(file_url.removeprefix("file://"))
    src = LocalStore(tmp_path / "a")
    make_snapshot(src, "w", snapshot_files(17, mib=1))
    remote = RemoteStore.open(file_url, lease_ttl=1.0)
    remote.push(src, "w", params=SMALL)
    old, fresh = root / ".tmp" / "dead.part", root / ".tmp" / "live.part"
    old.write_bytes(b"half a chunk")
    fresh.write_bytes(b"being written")
    os.utime(old, (time.time() - 60, time.time() - 60))
    remote.gc(grace=0)
    assert not old.exists() and fresh.exists()


def test_unindexable_local_file_is_a_clear_error(file_url: str, tmp_path: Path) -> None:
    from warmstart.errors import StoreError

    src = LocalStore(tmp_path / "a")
    make_snapshot(src, "w", {**snapshot_files(18, mib=1), "images/odd\\name": b"x"})
    (src.path_of("w") / ".hidden").write_bytes(b"not pushed")
    with pytest.raises(StoreError, match="cannot index snapshot 'w'"):
        RemoteStore.open(file_url).push(src, "w", params=SMALL)
    assert RemoteStore.open(file_url).snapshots() == []
