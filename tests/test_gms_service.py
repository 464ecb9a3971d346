"""GPU memory service on CPU: the wire protocol, layouts and hashes, the service's
bookkeeping and locking, refusals, and what happens when the service dies.

The service runs with the memfd backend here (host memory behind the same
allocate / export fd / import / map lifecycle as CUDA VMM)."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from _support import wait_for  # noqa: E402

from warmstart.errors import GmsUnavailable, UsageError, WeightsMismatch  # noqa: E402
from warmstart.gms import protocol as P  # noqa: E402
from warmstart.gms.backend import MemfdServer  # noqa: E402
from warmstart.gms.client import GmsError, GmsWeights, evict, status  # noqa: E402
from warmstart.gms.layout import (  # noqa: E402
    DIGEST_CHUNK,
    digest_file,
    layout_hash,
    read_header,
    read_layout,
)
from warmstart.gms.server import GmsServer  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 48, generator=g),
        "b.weight": torch.randn(300, generator=g).to(torch.bfloat16),
        "c.ids": torch.arange(17, dtype=torch.int64),
    }


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    safetensors_torch.save_file(_tensors(1), str(d / "model-00001-of-00002.safetensors"))
    safetensors_torch.save_file({"d.weight": torch.ones(5, 5)}, str(d / "model-00002-of-00002.safetensors"))
    return d


@pytest.fixture
def server(tmp_path: Path):
    srv = GmsServer(tmp_path / "gms.sock", MemfdServer(granularity=64 << 10), lanes=2)
    srv.start()
    yield srv
    srv.close()


def reference(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(f)))
    return out


# ----------------------------------------------------------------------------- protocol


def test_frames_carry_messages_and_descriptors() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.memfd_create("t")
    os.write(fd, b"weights!")
    try:
        P.send(a, P.Progress(files_done=["x"], bytes_done=3, bytes_total=9), [fd, fd])
        P.send(a, P.Status())
        msg, fds = P.recv(b)
        assert isinstance(msg, P.Progress) and msg.files_done == ["x"] and len(fds) == 2
        assert all(f != fd for f in fds)  # new descriptors of the same file
        assert os.pread(fds[1], 8, 0) == b"weights!"
        P.close_fds(fds)
        msg, fds = P.recv(b)
        assert isinstance(msg, P.Status) and fds == []
        a.close()
        with pytest.raises(P.PeerClosed):
            P.recv(b)
    finally:
        os.close(fd)
        b.close()


def test_malformed_and_truncated_frames_are_protocol_errors() -> None:
    a, b = socket.socketpair()
    a.sendall(P.HEADER.pack(9, 0) + b'{"op":"x"}'[:9])
    with pytest.raises(P.ProtocolError, match="malformed"):
        P.recv(b)
    a.sendall(P.HEADER.pack(100, 0) + b"{}")
    a.close()
    with pytest.raises(P.PeerClosed, match="mid-message"):
        P.recv(b)
    b.close()
    a, b = socket.socketpair()
    a.sendall(P.HEADER.pack(2, 1) + b"{}")  # announces a descriptor it does not send
    with pytest.raises(P.ProtocolError, match="expected 1 descriptors"):
        P.recv(b)
    with pytest.raises(P.ProtocolError, match="at most"):
        P.send(a, P.Status(), list(range(P.MAX_FDS + 1)))


# ----------------------------------------------------------------------------- layouts


def test_layout_from_headers_and_hashes(model_dir: Path, tmp_path: Path) -> None:
    layout = read_layout(model_dir)
    assert [f.name for f in layout.files] == sorted(p.name for p in model_dir.glob("*.safetensors"))
    first = layout.files[0]
    assert {t.name: (t.dtype, t.shape) for t in first.tensors} == {
        "a.weight": ("F32", (64, 48)), "b.weight": ("BF16", (300,)), "c.ids": ("I64", (17,)),
    }  # fmt: skip
    assert first.size == (model_dir / first.name).stat().st_size
    assert first.data_size == sum(t.nbytes for t in first.tensors)

    # another shape under the same names is another structure
    other = tmp_path / "other"
    other.mkdir()
    t = _tensors(1)
    t["c.ids"] = torch.arange(18, dtype=torch.int64)
    safetensors_torch.save_file(t, str(other / first.name))
    assert read_header(other / first.name) != first
    assert read_layout(other).structure_hash() != read_layout(model_dir).structure_hash()

    digests = {f.name: digest_file(model_dir / f.name, f.data_offset) for f in layout.files}
    h = layout_hash(layout, digests)
    assert h == layout_hash(read_layout(model_dir), dict(digests))
    changed = dict(digests, **{first.name: "xxh3-128-c64m:00"})
    assert layout_hash(layout, changed) != h
    with pytest.raises(UsageError, match="no content digest"):
        layout_hash(layout, {})


def test_bad_safetensors_header_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "x.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(UsageError, match="past the file's end"):
        read_layout(tmp_path)
    with pytest.raises(UsageError, match="no \\*.safetensors"):
        read_layout(tmp_path / "missing")


# ----------------------------------------------------------------------------- service + client


def test_attach_maps_exact_bytes_and_detach_keeps_addresses(server: GmsServer, model_dir: Path) -> None:
    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    ref = reference(model_dir)
    assert set(w.tensors) == set(ref)
    for name, t in ref.items():
        assert w.tensors[name].dtype == t.dtype and torch.equal(w.tensors[name], t), name
    digests = {f.name: digest_file(model_dir / f.name, f.data_offset) for f in w.layout.files}
    assert w.digests == digests and w.layout_hash == layout_hash(w.layout, digests)
    assert {e["name"]: e["digest"] for e in w.expected_files()} == digests

    ptrs = {n: t.data_ptr() for n, t in w.tensors.items()}
    w.detach()
    assert not w.attached
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="reader gone")
    w.attach()  # re-attach: resident weights, same addresses, same tensors
    w.wait()
    assert {n: t.data_ptr() for n, t in w.tensors.items()} == ptrs
    assert torch.equal(w.tensors["a.weight"], ref["a.weight"])
    (entry,) = status(server.socket_path).entries
    assert entry.state == "ready" and entry.readers == 1 and entry.layout_hash == w.layout_hash
    w.close()


def test_mapping_is_read_only_by_default(server: GmsServer, model_dir: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from warmstart.gms.client import GmsWeights\n"
        f"w = GmsWeights({server.socket_path!r}, {str(model_dir)!r}); w.attach(); w.wait()\n"
        "print('mapped', flush=True)\n"
        "w.tensors['a.weight'].fill_(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert "mapped" in proc.stdout and proc.returncode == -11  # SIGSEGV: the weights are read-only
    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    assert torch.equal(w.tensors["a.weight"], reference(model_dir)["a.weight"])
    w.close()


def test_two_readers_share_one_copy(server: GmsServer, model_dir: Path) -> None:
    a = GmsWeights(server.socket_path, model_dir)
    b = GmsWeights(server.socket_path, model_dir)
    a.attach()
    b.attach()
    a.wait()
    b.wait()
    assert a.entry_id == b.entry_id and a.layout_hash == b.layout_hash
    (entry,) = status(server.socket_path).entries
    assert entry.readers == 2
    assert evict(server.socket_path) == []  # in use: stays
    a.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 1, what="one reader")
    assert torch.equal(b.tensors["d.weight"], torch.ones(5, 5))
    b.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="no reader")
    assert status(server.socket_path).entries[0].state == "ready"  # resident without readers
    assert evict(server.socket_path) == [entry.entry_id]
    assert status(server.socket_path).entries == []


def test_writer_holds_the_lock_and_publishes_on_commit(server: GmsServer, model_dir: Path) -> None:
    layout = read_layout(model_dir)
    writer = GmsWeights(server.socket_path, layout=layout, mode="write")
    writer.attach()
    assert writer.writable and not writer.ready
    with pytest.raises(GmsError, match="another client is filling"):
        GmsWeights(server.socket_path, layout=layout, mode="write").attach()

    reader = GmsWeights(server.socket_path, layout=layout)
    reader.attach()  # maps at once; waits for the commit
    got: list[BaseException | None] = []
    t = threading.Thread(target=lambda: got.append(_wait(reader)))
    t.start()
    ref = reference(model_dir)
    for name, value in ref.items():
        writer.tensors[name].copy_(value)
    time.sleep(0.2)
    assert t.is_alive()  # nothing published before the commit
    digests = {f.name: digest_file(model_dir / f.name, f.data_offset) for f in layout.files}
    h = writer.commit(digests)
    t.join(10)
    assert got == [None] and reader.layout_hash == h
    assert torch.equal(reader.tensors["a.weight"], ref["a.weight"])
    with pytest.raises(GmsError, match="already filled"):
        GmsWeights(server.socket_path, layout=layout, mode="write").attach()
    writer.close()
    reader.close()


def _wait(w: GmsWeights) -> BaseException | None:
    try:
        w.wait(timeout=20)
    except BaseException as exc:  # noqa: BLE001
        return exc
    return None


def test_writer_that_leaves_without_commit_drops_the_entry(server: GmsServer, model_dir: Path) -> None:
    layout = read_layout(model_dir)
    writer = GmsWeights(server.socket_path, layout=layout, mode="write")
    writer.attach()
    reader = GmsWeights(server.socket_path, layout=layout)
    reader.attach()
    writer.close()  # connection closed before commit
    with pytest.raises(GmsError, match="writer went away"):
        reader.wait(timeout=20)
    wait_for(lambda: status(server.socket_path).entries == [], what="entry dropped")
    again = GmsWeights(server.socket_path, layout=layout, mode="write")
    again.attach()  # the lock is free again
    again.close()
    reader.close()


def test_reader_without_a_filler_is_refused(server: GmsServer, model_dir: Path) -> None:
    with pytest.raises(GmsError, match="holds no weights of this layout"):
        GmsWeights(server.socket_path, layout=read_layout(model_dir)).attach()


def test_expected_layout_hash_guards_reattach(server: GmsServer, model_dir: Path) -> None:
    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    good = w.layout_hash
    w.detach()
    with pytest.raises(WeightsMismatch, match="expects sha256:0"):
        GmsWeights(server.socket_path, model_dir).attach(expect_hash="sha256:0")

    # same names, shapes and sizes, other bytes on disk
    name = w.layout.files[1].name
    safetensors_torch.save_file({"d.weight": torch.full((5, 5), 2.0)}, str(model_dir / name))
    fresh = GmsWeights(server.socket_path, model_dir)  # a new worker gets the new bytes
    fresh.attach()
    fresh.wait()
    assert fresh.layout_hash != good and torch.equal(fresh.tensors["d.weight"], torch.full((5, 5), 2.0))
    fresh.close()
    w.attach()  # the old worker re-attaches to the bytes it had: still resident
    w.wait()
    assert torch.equal(w.tensors["d.weight"], torch.ones(5, 5))
    w.detach()
    wait_for(lambda: all(e.readers == 0 for e in status(server.socket_path).entries), what="detached")
    assert len(evict(server.socket_path)) == 2
    with pytest.raises(WeightsMismatch, match="expects"):  # gone: loading the new bytes is refused
        w.attach()
        w.wait()
    assert not w.attached and w.layout_hash == good
    hashes = {e.layout_hash for e in status(server.socket_path).entries}
    assert good not in hashes and len(hashes) == 1
    w.close()


def test_files_that_differ_from_the_workers_layout_are_refused(server: GmsServer, model_dir: Path) -> None:
    w = GmsWeights(server.socket_path, model_dir)
    safetensors_torch.save_file({"d.weight": torch.ones(6, 5)}, str(model_dir / w.layout.files[1].name))
    with pytest.raises(WeightsMismatch, match="another layout"):
        w.attach()


def test_loader_fills_multi_chunk_files(server: GmsServer, tmp_path: Path) -> None:
    d = tmp_path / "big"
    d.mkdir()
    big = torch.arange((DIGEST_CHUNK * 2 + 12345) // 4, dtype=torch.int32)
    safetensors_torch.save_file({"big": big}, str(d / "big.safetensors"))
    w = GmsWeights(server.socket_path, d)
    w.attach()
    w.wait(files=["big.safetensors"])
    assert torch.equal(w.tensors["big"], big)
    w.wait()
    assert w.digests["big.safetensors"] == digest_file(d / "big.safetensors", w.layout.files[0].data_offset)
    w.close()


# ----------------------------------------------------------------------------- service death


def _serve(sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmstart", "gms", "serve", "--memfd", "--socket", str(sock)],
        env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_for(lambda: _answers(sock) or proc.poll() is not None, timeout=60, what="service up")
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    return proc


def _answers(sock: Path) -> bool:
    try:
        status(str(sock), timeout=2)
        return True
    except GmsUnavailable:
        return False


def test_killed_service_leaves_mapped_weights_and_clear_errors(tmp_path: Path, model_dir: Path) -> None:
    sock = tmp_path / "svc.sock"
    proc = _serve(sock)
    try:
        w = GmsWeights(sock, model_dir)
        w.attach()
        w.wait()
        proc.kill()
        proc.wait()
        # the worker keeps its weights: its mapping holds the memory
        ref = reference(model_dir)
        for name, t in ref.items():
            assert torch.equal(w.tensors[name], t)
        # a new request errors at once, it does not hang
        t0 = time.monotonic()
        with pytest.raises(GmsUnavailable, match="connection refused"):
            GmsWeights(sock, model_dir).attach()
        assert time.monotonic() - t0 < 5
        w.detach()
        with pytest.raises(GmsUnavailable, match="start the node's service"):
            w.attach()

        # a restarted service adopts nothing; the worker re-attaches to a fresh load
        proc = _serve(sock)
        assert status(str(sock)).entries == []
        w.attach()
        w.wait()
        assert torch.equal(w.tensors["a.weight"], ref["a.weight"])
        w.close()
    finally:
        proc.kill()
        proc.wait()


def test_silent_or_vanishing_service_is_an_error_not_a_hang(tmp_path: Path, model_dir: Path) -> None:
    path = str(tmp_path / "mute.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    w = GmsWeights(path, model_dir, reply_timeout=0.5)
    with pytest.raises(GmsUnavailable, match="did not answer"):
        w.attach()
    listener.close()
    os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def answer_then_vanish() -> None:
        conn, _ = listener.accept()
        P.recv(conn)
        fds = [os.memfd_create("x") for _ in w.layout.files]
        for fd in fds:
            os.ftruncate(fd, 64 << 10)
        P.send(conn, P.Attached(entry_id="e1", backend="memfd", device=-1, granularity=64 << 10,
                                allocations=[P.AllocationInfo(file=f.name, size=64 << 10, data_size=f.data_size)
                                             for f in w.layout.files], state="filling"), fds)  # fmt: skip
        P.close_fds(fds)
        conn.close()

    listener2 = threading.Thread(target=answer_then_vanish)
    listener2.start()
    w2 = GmsWeights(path, model_dir)
    w2.attach()
    listener2.join()
    with pytest.raises(GmsUnavailable, match="went away"):
        w2.wait(timeout=10)
    w2.close()
    listener.close()


# ----------------------------------------------------------------------------- restore preflight


def _labels(w: GmsWeights, sock: str, model_dir: Path) -> dict[str, str]:
    import json

    return {"gms.layout_hash": w.layout_hash or "", "gms.socket": sock, "model_dir": str(model_dir),
            "gms.files": json.dumps(w.expected_files())}  # fmt: skip


def test_restore_preflight_refuses_or_prefetches(tmp_path: Path, model_dir: Path) -> None:
    from warmstart.gms.preflight import prepare_restore

    assert prepare_restore({"model": "x"}) is None  # weights inside the snapshot
    srv = GmsServer(tmp_path / "a.sock", MemfdServer(granularity=64 << 10), lanes=2)
    srv.start()
    w = GmsWeights(srv.socket_path, model_dir)
    w.attach()
    w.wait()
    labels = _labels(w, srv.socket_path, model_dir)
    w.close()
    assert prepare_restore(labels).state == "resident"  # type: ignore[union-attr]
    srv.close()

    with pytest.raises(GmsUnavailable):
        prepare_restore(labels)  # no service on this node
    srv = GmsServer(tmp_path / "a.sock", MemfdServer(granularity=64 << 10), lanes=2)
    srv.start()
    try:
        pre = prepare_restore(labels)  # a fresh service: streaming starts before the restore
        assert pre is not None and pre.state == "streaming"
        pre.wait(20)
        (entry,) = status(srv.socket_path).entries
        assert entry.state == "ready" and entry.layout_hash == labels["gms.layout_hash"]
        assert evict(srv.socket_path, keep_host=True) == [entry.entry_id]
        pre = prepare_restore(labels)  # parked in host memory: copied back, not read from the files
        assert pre is not None and pre.state == "parked"
        pre.wait(20)
        (entry,) = status(srv.socket_path).entries
        assert entry.state == "ready" and entry.layout_hash == labels["gms.layout_hash"]

        name = w.layout.files[1].name
        safetensors_torch.save_file({"d.weight": torch.full((5, 5), 3.0)}, str(model_dir / name))
        assert prepare_restore(labels).state == "resident"  # type: ignore[union-attr]  # the service still holds them
        w.attach()  # and the worker gets them, though the file changed since
        w.wait()
        assert torch.equal(w.tensors["d.weight"], torch.ones(5, 5))
        w.close()
        wait_for(lambda: evict(srv.socket_path), what="eviction")
        pre = prepare_restore(labels)  # same sizes, other bytes: known once they are read
        assert pre is not None and pre.state == "streaming"
        with pytest.raises(WeightsMismatch, match="expects"):
            pre.wait(20)
        (model_dir / name).write_bytes(b"short")
        with pytest.raises(WeightsMismatch, match="cannot provide the weights"):
            prepare_restore(labels)
    finally:
        srv.close()


# ----------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "warmstart", *args], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_gms_cli_status_evict_and_errors(server: GmsServer, model_dir: Path, tmp_path: Path) -> None:
    import json

    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    out = _cli("gms", "status", "--socket", server.socket_path, "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["backend"] == "memfd" and data["entries"][0]["readers"] == 1
    assert data["entries"][0]["layout_hash"] == w.layout_hash
    w.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="detached")
    out = _cli("gms", "evict", "--socket", server.socket_path, "--json")
    assert json.loads(out.stdout) == {"evicted": [data["entries"][0]["entry_id"]]}

    for args, message in [
        (("gms", "status", "--socket", str(tmp_path / "none.sock")), "no GPU memory service socket"),
        (("gms", "serve"), "exactly one of --gpu N and --memfd"),
        (("gms", "serve", "--memfd", "--socket", server.socket_path), "already listens"),
    ]:
        out = _cli(*args)
        assert out.returncode != 0 and out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


# ----------------------------------------------------------------------------- host tier (parked entries)


def _memfds() -> int:
    """Descriptors of this process on the service's memfd allocations (the service runs in-process)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:warmstart-gms")
        except OSError:
            pass
    return n


def _entry(srv: GmsServer):
    (entry,) = srv._entries.values()
    return entry


def test_parked_entry_releases_its_memory_and_comes_back_identical(server: GmsServer, model_dir: Path) -> None:
    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    good, digests = w.layout_hash, dict(w.digests)
    w.detach()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="detached")
    assert _memfds() == 2 * len(w.layout.files)  # an allocation and its exported fd per file

    (before,) = status(server.socket_path).entries
    assert evict(server.socket_path, keep_host=True) == [before.entry_id]
    (parked,) = status(server.socket_path).entries
    assert parked.state == "parked" and parked.host_bytes == w.layout.total_bytes == parked.bytes
    assert parked.layout_hash == good and parked.entry_id == before.entry_id
    e = _entry(server)
    assert e.handles == [] and e.fds == [] and _memfds() == 0  # the memfd allocations are gone
    assert [h.nbytes for h in e.host] == [f.data_size for f in w.layout.files]
    assert evict(server.socket_path, keep_host=True) == []  # parked already: stays as it is

    w.attach()  # the re-attach (expected layout hash) copies the bytes back
    w.wait()
    assert w.layout_hash == good and w.digests == digests
    (back,) = status(server.socket_path).entries
    assert back.state == "ready" and back.entry_id == before.entry_id and back.layout_hash == good
    assert back.readers == 1 and back.fill_seconds is not None and back.fill_seconds > 0
    wait_for(lambda: status(server.socket_path).entries[0].host_bytes == 0, what="host copies freed")
    assert _entry(server).host == [] and _memfds() == 3 * len(w.layout.files)  # + the worker's imports
    for name, t in reference(model_dir).items():
        assert torch.equal(w.tensors[name], t), name
    for f, m in zip(w.layout.files, w._maps):  # the mapped bytes are the files' data, byte for byte
        mapped = bytes((ctypes.c_char * f.data_size).from_address(m.address))
        with open(model_dir / f.name, "rb") as fh:
            fh.seek(f.data_offset)
            assert mapped == fh.read(f.data_size), f.name
    assert evict(server.socket_path, keep_host=True) == []  # a reader: not parked
    assert status(server.socket_path).entries[0].state == "ready"
    w.close()


def test_new_worker_unparks_by_files_and_evict_drops_a_parked_entry(server: GmsServer, model_dir: Path) -> None:
    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    good = w.layout_hash
    w.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="detached")
    assert evict(server.socket_path, keep_host=True) == [status(server.socket_path).entries[0].entry_id]

    fresh = GmsWeights(server.socket_path, model_dir)  # no expected hash: found by the files' key
    fresh.attach()
    assert not fresh.ready  # copied back like a load: Progress, then Ready
    fresh.wait()
    assert fresh.layout_hash == good and torch.equal(fresh.tensors["d.weight"], torch.ones(5, 5))
    fresh.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="detached")

    (entry,) = status(server.socket_path).entries
    assert evict(server.socket_path, keep_host=True) == [entry.entry_id]
    assert status(server.socket_path).entries[0].state == "parked"
    assert evict(server.socket_path) == [entry.entry_id]  # without keep_host: dropped with its host copy
    assert status(server.socket_path).entries == [] and server._entries == {}


def test_failed_parking_releases_the_entry(server: GmsServer, model_dir: Path, monkeypatch) -> None:
    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    w.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="detached")
    freed: list[int] = []
    real_park, real_free = server.backend.park, server.backend.free_host
    calls = iter([real_park, None])

    def park(handle: int, size: int, nbytes: int):
        fn = next(calls)
        if fn is None:
            raise MemoryError("no host memory left")
        return fn(handle, size, nbytes)

    def free_host(host) -> None:
        freed.append(host.nbytes)
        real_free(host)

    monkeypatch.setattr(server.backend, "park", park)
    monkeypatch.setattr(server.backend, "free_host", free_host)
    (entry,) = status(server.socket_path).entries
    assert evict(server.socket_path, keep_host=True) == [entry.entry_id]  # released as without keep_host
    assert status(server.socket_path).entries == [] and _memfds() == 0
    assert freed == [w.layout.files[0].data_size]  # the first file's copy was freed again


def _two_models(tmp_path: Path) -> list[Path]:
    dirs = []
    for i in range(2):
        d = tmp_path / f"m{i}"
        d.mkdir()
        safetensors_torch.save_file({"w": torch.full((64, 64), float(i))}, str(d / "a.safetensors"))
        dirs.append(d)
    return dirs


def _park_each(srv: GmsServer, dirs: list[Path]) -> list[str]:
    ids = []
    for d in dirs:
        w = GmsWeights(srv.socket_path, d)
        w.attach()
        w.wait()
        w.close()
        wait_for(lambda: all(e.readers == 0 for e in status(srv.socket_path).entries), what="detached")
        ids.append(w.entry_id)
        assert evict(srv.socket_path, w.entry_id, keep_host=True) == [w.entry_id]
    return ids


def test_host_cache_limit_drops_the_least_recently_used_parked_entry(tmp_path: Path) -> None:
    dirs = _two_models(tmp_path)
    one = 64 * 64 * 4
    srv = GmsServer(tmp_path / "h.sock", MemfdServer(granularity=64 << 10), lanes=1, host_cache_bytes=one + 100)
    srv.start()
    try:
        first, second = _park_each(srv, dirs)
        (entry,) = status(srv.socket_path).entries  # the first one made room for the second
        assert entry.entry_id == second and entry.state == "parked" and entry.host_bytes == one
        w = GmsWeights(srv.socket_path, dirs[1])
        w.attach()
        w.wait()
        assert torch.equal(w.tensors["w"], torch.full((64, 64), 1.0))
        w.close()
    finally:
        srv.close()


def test_entry_larger_than_the_host_cache_is_released(tmp_path: Path) -> None:
    dirs = _two_models(tmp_path)
    one = 64 * 64 * 4
    srv = GmsServer(tmp_path / "h.sock", MemfdServer(granularity=64 << 10), lanes=1, host_cache_bytes=one - 1)
    srv.start()
    try:
        w = GmsWeights(srv.socket_path, dirs[0])
        w.attach()
        w.wait()
        w.close()
        wait_for(lambda: status(srv.socket_path).entries[0].readers == 0, what="detached")
        assert evict(srv.socket_path, keep_host=True) == [w.entry_id]
        assert status(srv.socket_path).entries == [] and _memfds() == 0
    finally:
        srv.close()
    with pytest.raises(ValueError, match="host_cache_bytes"):
        GmsServer(tmp_path / "x.sock", MemfdServer(), host_cache_bytes=-1)


def test_gms_cli_evict_keep_host_and_status_table(server: GmsServer, model_dir: Path) -> None:
    import json

    w = GmsWeights(server.socket_path, model_dir)
    w.attach()
    w.wait()
    w.close()
    wait_for(lambda: status(server.socket_path).entries[0].readers == 0, what="detached")
    (entry,) = status(server.socket_path).entries
    out = _cli("gms", "evict", "--socket", server.socket_path, "--keep-host", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"evicted": [entry.entry_id], "parked": [entry.entry_id]}
    out = _cli("gms", "status", "--socket", server.socket_path)
    assert out.returncode == 0, out.stderr
    assert "parked" in out.stdout and "host" in out.stdout
    data = json.loads(_cli("gms", "status", "--socket", server.socket_path, "--json").stdout)
    assert data["entries"][0]["state"] == "parked" and data["entries"][0]["host_bytes"] == w.layout.total_bytes
