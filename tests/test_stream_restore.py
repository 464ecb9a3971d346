"""``restore URL`` streaming: CRIU restores while the page images are still arriving (real CRIU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _support import Tree

from warmstart.errors import SnapshotCorrupt
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.restore import RestoreRequest
from warmstart.snapshot.streaming import restore_streaming
from warmstart.store.chunking import ChunkParams
from warmstart.store.local import LocalStore
from warmstart.store.remote import RemoteStore, chunk_key, index_key
from warmstart.store.signing import TrustPolicy
from warmstart.store.stream import is_page_image

SMALL = ChunkParams.around(256 << 10)
MEM_MIB = 48


def _snapshot_in(url: str, tree_factory, tmp_path: Path, *, compress: str | None = None):
    """A real snapshot of a test tree pushed to ``url``; returns (tree, its digests, remote)."""
    tree = tree_factory(mem_mib=MEM_MIB)
    before = tree.digests()
    node_a = LocalStore(tmp_path / "node-a")
    checkpoint(tree.pid, store=node_a, name="snap", options=CheckpointOptions(compress=compress))
    tree.popen.wait(timeout=10)
    remote = RemoteStore.open(url, jobs=4)
    remote.push(node_a, "snap", params=SMALL)
    return tree, before, remote


def _stream_and_check(tree, before, remote, tmp_path: Path, **kwargs):  # type: ignore[no-untyped-def]
    """Restore ``snap`` from ``remote`` while it streams; the tree continues with ``before``."""
    node_b = LocalStore(tmp_path / "node-b")
    streamed = restore_streaming(
        remote, "snap", local=node_b, request=RestoreRequest(), trust=TrustPolicy([]),
        durable=False, **kwargs,
    )  # fmt: skip
    back = Tree(tree.state, None, streamed.result.pid)
    try:
        back.wait_progress()
        assert back.digests() == before
    finally:
        back.kill()
    return streamed, node_b


def _page_chunk_events(events: list[str]) -> list[int]:
    return [
        i
        for i, e in enumerate(events)
        if e.startswith("chunk ") and is_page_image(e[6:].rsplit("#", 1)[0])
    ]


@pytest.mark.criu
@pytest.mark.parametrize("backend", ["file", "s3"])
def test_streaming_restore_continues_with_identical_state(
    tree_factory, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(f"{backend}_url")
    tree, before, remote = _snapshot_in(url, tree_factory, tmp_path)
    streamed, node_b = _stream_and_check(tree, before, remote, tmp_path)
    assert streamed.overlapped
    assert streamed.stats.bulk_bytes >= MEM_MIB << 20
    assert streamed.events.index("meta-complete") < streamed.events.index("phase criu-restore")
    # published like a pull: complete, with the manifest, and no staging left behind
    assert streamed.path == node_b.root / "snap"
    assert (
        node_b.manifest("snap").snapshot_id
        == remote.open_index("snap", TrustPolicy([]))[0].snapshot_id
    )
    assert not list((node_b.root / ".staging").iterdir())
    phases = [p.name for p in streamed.result.timer.phases]
    assert phases[0] == "fetch-meta" and "fetch-wait" in phases and "publish" in phases


@pytest.mark.criu
def test_throttled_download_restore_starts_before_the_last_chunk(
    tree_factory, tmp_path: Path, file_url: str
) -> None:
    tree, before, remote = _snapshot_in(file_url, tree_factory, tmp_path)
    streamed, _node_b = _stream_and_check(tree, before, remote, tmp_path, limit_rate=24e6)
    ev = streamed.events
    criu_started = ev.index("phase criu-restore")
    # CRIU started while page chunks were still to come; the tasks resumed only after the last one
    assert ev.index("mark") < ev.index("fetch-complete")
    late = [i for i in _page_chunk_events(ev) if i > criu_started]
    assert late, "every page chunk arrived before CRIU started"
    assert ev.index("fetch-complete") < ev.index("phase resume")
    assert streamed.stats.overlapped_bytes > 0
    assert streamed.report()["page_bytes_during_restore"] == streamed.stats.overlapped_bytes


@pytest.mark.criu
def test_streaming_compressed_snapshot(tree_factory, tmp_path: Path, file_url: str) -> None:
    tree, before, remote = _snapshot_in(file_url, tree_factory, tmp_path, compress="zstd")
    streamed, node_b = _stream_and_check(tree, before, remote, tmp_path, limit_rate=8e6)
    assert streamed.overlapped and list((node_b.root / "snap" / "images").glob("pages-*.img.zstd"))


@pytest.mark.criu
def test_corrupt_chunk_mid_stream_refuses_kills_and_publishes_nothing(
    tree_factory, tmp_path: Path, file_url: str
) -> None:
    tree, _before, remote = _snapshot_in(file_url, tree_factory, tmp_path)
    index, _ = remote.open_index("snap", TrustPolicy([]))
    pages = max((f for f in index.files if is_page_image(f.path)), key=lambda f: f.size)
    victim = pages.chunks[
        len(pages.chunks) * 3 // 4
    ]  # deep in the pattern: lazy memory, page server's
    blob = Path(file_url.removeprefix("file://")) / chunk_key(victim.digest)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    assert (Path(file_url.removeprefix("file://")) / index_key("snap")).is_file()

    node_b = LocalStore(tmp_path / "node-b")
    events: list[str] = []
    with pytest.raises(SnapshotCorrupt, match="BLAKE3"):
        restore_streaming(
            remote, "snap", local=node_b, request=RestoreRequest(), trust=TrustPolicy([]),
            limit_rate=24e6, on_event=events.append,
        )  # fmt: skip
    # Usually it fails mid-restore (after CRIU started); on a slow machine the download can
    # reach the chunk first. Either way: refused, nothing runs, nothing is published.
    assert "failed SnapshotCorrupt" in events
    assert "phase resume" not in events
    assert not Tree(tree.state, None, tree.pid).alive()  # the restored tree (same PIDs) is gone
    assert not (node_b.root / "snap").exists()
    assert not list((node_b.root / ".staging").iterdir())


@pytest.mark.criu
def test_cli_restore_url_streams_by_default_and_no_stream_pulls_first(
    tree_factory, tmp_path: Path, file_url: str
) -> None:
    from test_store_cli import cli

    tree, before, _remote = _snapshot_in(file_url, tree_factory, tmp_path)
    node_b = tmp_path / "node-b"
    for flags, overlapped in (((), True), (("--no-stream",), False)):
        out = json.loads(
            cli("restore", f"{file_url}/snap", "--store", str(node_b), "--json", *flags).stdout
        )
        back = Tree(tree.state, None, out["pid"])
        try:
            back.wait_progress()
            assert back.digests() == before
        finally:
            back.kill()
        phases = [p["name"] for p in out["timings"]]
        if overlapped:
            assert out["stream"]["overlapped"] and out["stream"]["page_bytes"] >= MEM_MIB << 20
            assert phases[0] == "fetch-meta" and "  fetch overlapped" in phases
        else:
            assert out["stream"] is None and "fetch-meta" not in phases
        assert (node_b / "snap" / "manifest.json").is_file()
        shutil.rmtree(node_b / "snap")
