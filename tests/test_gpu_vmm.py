"""ReservedRegion over the fake driver: the address stays, physical memory comes
and goes, and nothing leaks when a step fails."""

from __future__ import annotations

import pytest

from warmstart.errors import UsageError
from warmstart.gpu.driver import CudaCallError, CudaDriver
from warmstart.gpu.fake import OUT_OF_MEMORY, FakeCudaLib, FakeGpu
from warmstart.gpu.vmm import HandleType, ReservedRegion, round_up

A = "GPU-11111111-2222-3333-4444-555555555555"
MiB = 1 << 20


def make(size: int = 5 * MiB, **kw: object) -> tuple[ReservedRegion, FakeCudaLib]:
    lib = FakeCudaLib([FakeGpu(A)])
    return ReservedRegion(size, 0, driver=CudaDriver(lib), **kw), lib  # type: ignore[arg-type]


def test_round_up() -> None:
    assert round_up(1, 2 * MiB) == 2 * MiB
    assert round_up(4 * MiB, 2 * MiB) == 4 * MiB


def test_reserve_map_release_remap_keeps_address() -> None:
    r, lib = make()
    assert r.size == 6 * MiB and r.granularity == 2 * MiB
    assert lib.reservations == {r.address: 6 * MiB}
    assert r.is_mapped and lib.mappings == {r.address: 1} and lib.access[r.address] == 3
    assert lib.ctx_refs == 1 and lib.current_ctx
    r.fill(0xAB)
    assert set(lib.memory[1]) == {0xAB}

    addr = r.address
    r.release()
    assert not r.is_mapped
    assert lib.mappings == {} and lib.allocations == {}
    assert lib.reservations == {addr: 6 * MiB}  # the range is still ours
    r.release()  # idempotent
    with pytest.raises(UsageError, match="released"):
        r.fill(0)

    r.map()
    assert r.address == addr and lib.mappings == {addr: 2} and r.generation == 2
    r.fill(1)
    r.close()
    assert lib.reservations == {} and lib.allocations == {} and lib.ctx_refs == 0
    with pytest.raises(UsageError, match="closed"):
        r.map()
    r.close()  # idempotent


def test_reserve_without_mapping() -> None:
    r, lib = make(map=False)
    assert not r.is_mapped and lib.allocations == {} and r.generation == 0
    r.map()
    r.map()  # no-op
    assert len(lib.allocations) == 1


@pytest.mark.parametrize("step", ["cuMemMap", "cuMemSetAccess"])
def test_failed_map_leaks_nothing(step: str) -> None:
    r, lib = make(map=False)
    lib.fail(step, code=OUT_OF_MEMORY)
    with pytest.raises(CudaCallError, match="OUT_OF_MEMORY"):
        r.map()
    assert not r.is_mapped and lib.allocations == {} and lib.mappings == {}
    r.map()  # works the next time
    assert r.is_mapped


def test_failed_reserve_releases_context() -> None:
    lib = FakeCudaLib([FakeGpu(A)])
    lib.fail("cuMemAddressReserve", code=OUT_OF_MEMORY)
    with pytest.raises(CudaCallError):
        ReservedRegion(MiB, driver=CudaDriver(lib))
    assert lib.ctx_refs == 0


def test_failed_initial_map_frees_everything() -> None:
    lib = FakeCudaLib([FakeGpu(A)])
    lib.fail("cuMemCreate", code=OUT_OF_MEMORY)
    with pytest.raises(CudaCallError):
        ReservedRegion(MiB, driver=CudaDriver(lib))
    assert lib.reservations == {} and lib.ctx_refs == 0


def test_export_fd_needs_posix_handle_type() -> None:
    r, _ = make()
    with pytest.raises(UsageError, match="not exportable"):
        r.export_fd()
    r2, _ = make(handle_type=HandleType.POSIX_FILE_DESCRIPTOR)
    assert r2.export_fd() == 101


def test_bad_size_and_device() -> None:
    with pytest.raises(UsageError):
        make(size=0)
    lib = FakeCudaLib([FakeGpu(A)])
    with pytest.raises(CudaCallError, match="INVALID_DEVICE"):
        ReservedRegion(MiB, 3, driver=CudaDriver(lib))


def test_context_manager() -> None:
    lib = FakeCudaLib([FakeGpu(A)])
    with ReservedRegion(MiB, driver=CudaDriver(lib)) as r:
        assert r.is_mapped
    assert lib.reservations == {} and "released" not in repr(r) and "closed" in repr(r)
