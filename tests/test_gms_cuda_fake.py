"""The CUDA VMM backends of the memory service against the fake libcuda: the calls,
their arguments and the order of the allocation lifecycle (the real ABI is covered
by tests/gpu/test_gms.py)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
from _support import wait_for

from warmstart.errors import GpuError
from warmstart.gms.cuda import CudaClient, CudaServer
from warmstart.gms.layout import TensorSpec, digest_file
from warmstart.gms.loader import FillFile, fill
from warmstart.gpu.driver import CudaCallError, CudaDriver
from warmstart.gpu.fake import OUT_OF_MEMORY, FakeCudaLib, FakeGpu

A = "GPU-11111111-2222-3333-4444-555555555555"
GRAN = 2 << 20


def make() -> tuple[FakeCudaLib, CudaDriver]:
    lib = FakeCudaLib([FakeGpu(A)], granularity=GRAN)
    return lib, CudaDriver(lib)


def test_server_creates_exportable_memory_and_fills_through_a_temporary_mapping(tmp_path: Path) -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    assert srv.granularity == GRAN and lib.ctx_refs == 1
    handle = srv.create(2 * GRAN)
    assert lib.handle_types[handle] == 1  # requestedHandleTypes = POSIX_FILE_DESCRIPTOR
    assert srv.export(handle) == 100 + handle

    data = bytes(range(256)) * (3 * GRAN // 256 // 2)
    f = tmp_path / "w.bin"
    f.write_bytes(b"HEADER" + data)
    target = srv.open_fill(handle, 2 * GRAN)
    assert lib.mappings == {target: handle} and lib.access[target] == 3  # read-write for filling
    result = fill(srv, [FillFile("w.bin", str(f), 6, len(data), target)], lanes=2)
    srv.close_fill(target, 2 * GRAN)
    assert lib.mappings == {} and lib.reservations == {}  # the service keeps no mapping
    assert bytes(lib.memory[handle][: len(data)]) == data
    assert result.digests["w.bin"] == digest_file(f, 6)
    assert len(lib.streams) == 2 and len(lib.host_buffers) == 4  # two lanes, pooled for the next fill
    assert srv.read_back(handle, 2 * GRAN, 1000, 16) == data[1000:1016]

    calls = len(lib.calls)
    target = srv.open_fill(handle, 2 * GRAN)
    fill(srv, [FillFile("w.bin", str(f), 6, len(data), target)], lanes=2)
    srv.close_fill(target, 2 * GRAN)
    assert not any(c == "cuMemHostAlloc" for c, _ in lib.calls[calls:])  # lanes reused
    srv.release(handle)
    srv.close()
    assert lib.allocations == {} and lib.ctx_refs == 0
    assert lib.host_buffers == {} and lib.streams == set()  # pinned buffers and streams freed


def test_lanes_can_share_copy_streams_and_wait_on_their_own_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib, drv = make()
    srv = CudaServer(0, drv, copy_streams=2)
    size = 4 * GRAN
    handle = srv.create(size)
    data = os.urandom(7 * GRAN // 2)
    f = tmp_path / "w.bin"
    f.write_bytes(data)
    target = srv.open_fill(handle, size)
    monkeypatch.setattr("warmstart.gms.loader.DIGEST_CHUNK", GRAN // 2)  # seven chunks, four lanes
    result = fill(srv, [FillFile("w.bin", str(f), 0, len(data), target)], lanes=4)
    srv.close_fill(target, size)
    assert bytes(lib.memory[handle][: len(data)]) == data
    assert result.nbytes == len(data)
    assert len(lib.streams) == 2 and len(lib.events) == 4  # four lanes on two streams
    copies = [a for c, a in lib.calls if c == "cuMemcpyHtoDAsync_v2"]
    records = [c for c, _ in lib.calls if c == "cuEventRecord"]
    assert len(records) == len(copies) == 7  # one event per copy, no stream-wide waits
    assert not any(c == "cuStreamSynchronize" for c, _ in lib.calls)
    recorded_on = {s for s in lib.events.values() if s is not None}  # a lane may have got no chunk
    assert recorded_on and recorded_on <= lib.streams
    srv.release(handle)
    srv.close()
    assert lib.streams == set() and lib.events == {} and lib.host_buffers == {}


def test_copy_streams_must_not_be_negative() -> None:
    _, drv = make()
    with pytest.raises(ValueError, match="copy_streams"):
        CudaServer(0, drv, copy_streams=-1)


def test_export_fails_without_the_fd_handle_type() -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    handle = srv.create(GRAN)
    lib.handle_types[handle] = 0
    with pytest.raises(CudaCallError, match="cuMemExportToShareableHandle"):
        srv.export(handle)


def test_client_imports_maps_read_only_and_keeps_its_range() -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    handle = srv.create(GRAN)
    lib.memory[handle][:4] = b"\x01\x02\x03\x04"
    fd = srv.export(handle)

    cli = CudaClient(0, drv)
    addr = cli.reserve(GRAN)
    local = cli.import_fd(fd)
    assert lib.imported[local] == handle
    cli.map(addr, GRAN, local, writable=False)
    assert lib.mappings[addr] == local and lib.access[addr] == 1  # CU_MEM_ACCESS_FLAGS_PROT_READ
    out = ctypes.create_string_buffer(4)
    assert drv.call("cuMemcpyDtoH_v2", out, addr, 4) is None and out.raw == b"\x01\x02\x03\x04"

    srv.release(handle)  # the service lets go: the worker's import keeps the memory
    assert bytes(lib.memory[local][:4]) == b"\x01\x02\x03\x04"
    cli.synchronize()
    cli.unmap(addr, GRAN)
    cli.release(local)
    assert lib.mappings == {} and lib.reservations == {addr: GRAN}  # range kept for re-mapping
    cli.free(addr, GRAN)
    cli.close()
    srv.close()
    assert lib.allocations == {} and lib.reservations == {} and lib.ctx_refs == 0


def test_failed_map_releases_nothing_twice() -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    handle = srv.create(GRAN)
    cli = CudaClient(0, drv)
    addr = cli.reserve(GRAN)
    local = cli.import_fd(srv.export(handle))
    lib.fail("cuMemSetAccess", code=OUT_OF_MEMORY)
    with pytest.raises(CudaCallError):
        cli.map(addr, GRAN, local, writable=False)
    assert addr not in lib.mappings  # unmapped again; the caller releases the handle
    cli.release(local)


def test_copy_failure_surfaces_as_a_load_error(tmp_path: Path) -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    handle = srv.create(GRAN)
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    target = srv.open_fill(handle, GRAN)
    lib.fail("cuMemcpyHtoDAsync_v2", code=OUT_OF_MEMORY)
    with pytest.raises(GpuError, match="cuMemcpyHtoDAsync_v2"):
        fill(srv, [FillFile("w.bin", str(f), 0, 1000, target)], lanes=1)
    srv.close_fill(target, GRAN)
    srv.release(handle)
    srv.close()
    assert lib.host_buffers == {} and lib.streams == set()


def test_service_evicts_idle_entries_when_memory_runs_out(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from warmstart.gms.client import GmsWeights, status
    from warmstart.gms.server import GmsServer

    lib, drv = make()
    server, Client = _fake_fd_backends(drv)
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        st.save_file({"w": torch.zeros(8)}, str(tmp_path / name / "a.safetensors"))
    srv = GmsServer(tmp_path / "s.sock", server, lanes=1)
    srv.start()
    try:
        w = GmsWeights(srv.socket_path, tmp_path / "m1", backend=Client(0, drv))
        w.attach()
        w.wait()
        w.close()
        first = status(srv.socket_path).entries[0].entry_id
        lib.fail("cuMemCreate", code=OUT_OF_MEMORY)  # the GPU is full once
        w2 = GmsWeights(srv.socket_path, tmp_path / "m2", backend=Client(0, drv))
        w2.attach()
        w2.wait()
        ids = [e.entry_id for e in status(srv.socket_path).entries]
        assert first not in ids and len(ids) == 1
        assert len(lib.mappings) == 1 and set(lib.access.values()) == {1}  # the worker's read-only map
        w2.close()
    finally:
        srv.close()
    assert lib.allocations == {}


def test_failed_pinned_allocation_leaks_no_lane(tmp_path: Path) -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    handle = srv.create(GRAN)
    f = tmp_path / "w.bin"
    f.write_bytes(b"y" * 5000)
    target = srv.open_fill(handle, GRAN)
    lib.fail("cuMemHostAlloc", code=OUT_OF_MEMORY)
    with pytest.raises(GpuError, match="cuMemHostAlloc"):
        fill(srv, [FillFile("w.bin", str(f), 0, 5000, target)], lanes=1)
    assert lib.streams == set() and lib.host_buffers == {}  # the half-built lane was freed, not pooled
    result = fill(srv, [FillFile("w.bin", str(f), 0, 5000, target)], lanes=1)  # and the next fill works
    srv.close_fill(target, GRAN)
    assert result.digests["w.bin"] == digest_file(f) and bytes(lib.memory[handle][:5000]) == b"y" * 5000
    srv.release(handle)
    srv.close()


def test_park_and_unpark_move_bytes_through_pinned_host_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    size = 4 * GRAN
    handle = srv.create(size)
    data = os.urandom(3 * GRAN + 12345)
    lib.memory[handle][: len(data)] = data

    host = srv.park(handle, size, len(data))
    assert host.nbytes == len(data) and set(lib.host_buffers) == {host.address}  # one pinned buffer
    assert ctypes.string_at(host.address, len(data)) == data
    assert lib.mappings == {} and lib.reservations == {}  # the temporary mapping is gone
    srv.release(handle)
    assert lib.allocations == {}

    again = srv.create(size)
    assert not any(lib.memory[again])
    monkeypatch.setattr(CudaServer, "HOST_COPY_PIECE", GRAN)  # four pieces
    calls = len(lib.calls)
    srv.unpark(host, again, size)
    assert bytes(lib.memory[again][: len(data)]) == data and not any(lib.memory[again][len(data) :])
    assert [n for _, n, _ in lib.h2d_copies] == [GRAN, GRAN, GRAN, 12345]
    assert len({s for _, _, s in lib.h2d_copies}) == 1  # queued back to back on one stream
    assert [c for c, _ in lib.calls[calls:]].count("cuStreamSynchronize") == 1  # and waited for once
    assert lib.streams == set() and lib.mappings == {} and lib.reservations == {}
    srv.free_host(host)
    srv.free_host(host)  # a second free does nothing
    assert lib.host_buffers == {} and host.address == 0
    srv.release(again)
    srv.close()
    assert lib.ctx_refs == 0


def test_failed_park_frees_its_pinned_buffer_and_close_frees_the_rest() -> None:
    lib, drv = make()
    srv = CudaServer(0, drv)
    handle = srv.create(GRAN)
    lib.fail("cuMemcpyDtoH_v2", code=OUT_OF_MEMORY)
    with pytest.raises(CudaCallError, match="cuMemcpyDtoH_v2"):
        srv.park(handle, GRAN, 1000)
    assert lib.host_buffers == {} and lib.mappings == {} and lib.reservations == {}
    lib.fail("cuMemHostAlloc", code=OUT_OF_MEMORY)
    with pytest.raises(CudaCallError, match="cuMemHostAlloc"):
        srv.park(handle, GRAN, 1000)
    assert lib.host_buffers == {} and lib.reservations == {}
    srv.release(handle)
    srv.close()


def _fake_fd_backends(drv: CudaDriver) -> tuple[CudaServer, type[CudaClient]]:
    """The fake's exported "fds" are numbers, not descriptors: carry each through the
    socket inside a memfd named after it, so the service and worker code run unchanged."""

    class Server(CudaServer):
        def export(self, handle: int) -> int:
            return os.memfd_create(f"fake-{super().export(handle)}")

    class Client(CudaClient):
        def import_fd(self, fd: int) -> int:
            return super().import_fd(int(os.readlink(f"/proc/self/fd/{fd}").split("fake-")[1].split()[0]))

        def tensor(self, address: int, spec: TensorSpec) -> object:
            return address  # no torch CUDA here: the address stands for the tensor

    return Server(0, drv), Client


def test_service_parks_on_pinned_memory_and_copies_back_on_attach(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from warmstart.gms.client import GmsWeights, evict, status
    from warmstart.gms.server import GmsServer

    lib, drv = make()
    (tmp_path / "m").mkdir()
    weights = torch.arange(3000, dtype=torch.float32)
    st.save_file({"w": weights}, str(tmp_path / "m" / "a.safetensors"))
    server, Client = _fake_fd_backends(drv)
    srv = GmsServer(tmp_path / "s.sock", server, lanes=1)
    srv.start()
    try:
        w = GmsWeights(srv.socket_path, tmp_path / "m", backend=Client(0, drv))
        w.attach()
        w.wait()
        good = w.layout_hash
        w.detach()
        wait_for(lambda: status(srv.socket_path).entries[0].readers == 0)
        assert len(lib.allocations) == 1 and (handle := next(iter(lib.allocations)))
        assert bytes(lib.memory[handle][: weights.numel() * 4]) == weights.numpy().tobytes()
        pooled = set(lib.host_buffers)  # the loader's staging buffers, kept for the next fill

        (entry,) = status(srv.socket_path).entries
        assert evict(srv.socket_path, keep_host=True) == [entry.entry_id]
        (parked,) = status(srv.socket_path).entries
        assert parked.state == "parked" and parked.host_bytes == weights.numel() * 4
        assert lib.allocations == {}  # no device memory held
        (pinned,) = set(lib.host_buffers) - pooled
        assert ctypes.string_at(pinned, parked.host_bytes) == weights.numpy().tobytes()

        w.attach()  # re-attach with the expected hash: copied back from the pinned buffer
        w.wait()
        assert w.layout_hash == good
        local = lib.mappings[w._maps[0].address]  # the worker's import of the new allocation
        assert lib.imported[local] in lib.allocations and lib.imported[local] != handle
        assert bytes(lib.memory[local][: parked.host_bytes]) == weights.numpy().tobytes()
        wait_for(lambda: set(lib.host_buffers) == pooled)  # the pinned copy is freed
        assert status(srv.socket_path).entries[0].state == "ready"
        w.close()
        wait_for(lambda: status(srv.socket_path).entries[0].readers == 0)
        assert evict(srv.socket_path, keep_host=True) == [entry.entry_id]
    finally:
        srv.close()
    assert lib.allocations == {} and lib.host_buffers == {}  # close frees the parked copy too


def test_out_of_memory_eviction_passes_parked_entries_by(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    from warmstart.gms.client import GmsError, GmsWeights, evict, status
    from warmstart.gms.server import GmsServer

    lib, drv = make()
    server, Client = _fake_fd_backends(drv)
    for i, name in enumerate(("m1", "m2", "m3")):
        (tmp_path / name).mkdir()
        st.save_file({"w": torch.full((8,), float(i))}, str(tmp_path / name / "a.safetensors"))
    srv = GmsServer(tmp_path / "s.sock", server, lanes=1)
    srv.start()
    try:
        ids = {}
        for name in ("m1", "m2"):
            w = GmsWeights(srv.socket_path, tmp_path / name, backend=Client(0, drv))
            w.attach()
            w.wait()
            w.close()
            ids[name] = w.entry_id
        wait_for(lambda: all(e.readers == 0 for e in status(srv.socket_path).entries))
        assert evict(srv.socket_path, ids["m1"], keep_host=True) == [ids["m1"]]
        lib.fail("cuMemCreate", code=OUT_OF_MEMORY)  # the GPU is full once
        w3 = GmsWeights(srv.socket_path, tmp_path / "m3", backend=Client(0, drv))
        w3.attach()
        w3.wait()
        states = {e.entry_id: e.state for e in status(srv.socket_path).entries}
        assert states == {ids["m1"]: "parked", w3.entry_id: "ready"}  # m2 (on the device) made room
        w3.close()
        wait_for(lambda: all(e.readers == 0 for e in status(srv.socket_path).entries))
        assert evict(srv.socket_path, w3.entry_id) == [w3.entry_id]
        lib.fail("cuMemCreate", code=OUT_OF_MEMORY)  # full again, and only a parked entry to evict
        w1 = GmsWeights(srv.socket_path, tmp_path / "m1", backend=Client(0, drv))
        with pytest.raises(GmsError, match="OUT_OF_MEMORY"):
            w1.attach()
        assert [(e.entry_id, e.state) for e in status(srv.socket_path).entries] == [(ids["m1"], "parked")]
        w1.attach()  # the next try copies it back
        w1.wait()
        assert status(srv.socket_path).entries[0].state == "ready"
        w1.close()
    finally:
        srv.close()
    assert lib.allocations == {} and lib.host_buffers == {}
