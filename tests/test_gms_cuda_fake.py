"""The CUDA VMM backends of the memory service against the fake libcuda: the calls,
their arguments and the order of the allocation lifecycle (the real ABI is covered
by tests/gpu/test_gms.py)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

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

    # The fake's exported "fds" are numbers, not descriptors: carry each through the
    # socket inside a memfd named after it, so the service and worker code run unchanged.
    class Server(CudaServer):
        def export(self, handle: int) -> int:
            return os.memfd_create(f"fake-{super().export(handle)}")

    class Client(CudaClient):
        def import_fd(self, fd: int) -> int:
            return super().import_fd(int(os.readlink(f"/proc/self/fd/{fd}").split("fake-")[1].split()[0]))

        def tensor(self, address: int, spec: TensorSpec) -> object:
            return address  # no torch CUDA here: the address stands for the tensor

    lib, drv = make()
    for name in ("m1", "m2"):
        (tmp_path / name).mkdir()
        st.save_file({"w": torch.zeros(8)}, str(tmp_path / name / "a.safetensors"))
    srv = GmsServer(tmp_path / "s.sock", Server(0, drv), lanes=1)
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
