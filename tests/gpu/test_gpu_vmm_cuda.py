"""ReservedRegion on a real GPU: write, release, re-map at the same address."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu


def test_reserve_write_release_remap_same_address(torch_cuda: None) -> None:
    import torch

    from warmstart.gpu.vmm import ReservedRegion

    torch.cuda.init()
    free0, _ = torch.cuda.mem_get_info()
    with ReservedRegion(64 << 20 | 12345, torch.cuda.current_device()) as region:
        assert region.size % region.granularity == 0 and region.size >= (64 << 20) + 12345
        addr = region.address
        t = region.as_tensor(torch.int32)
        assert t.data_ptr() == addr and t.numel() * 4 == region.size
        pattern = torch.arange(t.numel(), device="cuda", dtype=torch.int32) * 7
        t.copy_(pattern)
        assert torch.equal(region.as_tensor(torch.int32), pattern)
        # the memory is really ours: torch kernels write and read it
        region.fill(0x5A)
        assert bool((region.as_tensor() == 0x5A).all())
        mapped_free, _ = torch.cuda.mem_get_info()

        region.release()
        assert not region.is_mapped and region.address == addr
        released_free, _ = torch.cuda.mem_get_info()
        assert released_free - mapped_free >= region.size  # physical memory given back

        region.map()
        assert region.is_mapped and region.address == addr and region.generation == 2
        t2 = region.as_tensor(torch.int32)
        assert t2.data_ptr() == addr
        t2.copy_(pattern + 1)
        assert torch.equal(region.as_tensor(torch.int32), pattern + 1)
        torch.cuda.synchronize()
        remapped_free, _ = torch.cuda.mem_get_info()
    torch.cuda.synchronize()
    # closing gave the region's physical memory back (kernels loaded lazily by
    # torch since free0 make a comparison with free0 meaningless)
    assert torch.cuda.mem_get_info()[0] - remapped_free >= region.size


def test_dtype_and_shape_view(torch_cuda: None) -> None:
    import torch

    from warmstart.gpu.vmm import ReservedRegion

    with ReservedRegion(2 << 20) as region:
        t = region.as_tensor(torch.float16, (1024, region.size // 2 // 1024))
        t.fill_(1.5)
        assert t.dtype is torch.float16 and float(t.float().sum()) == 1.5 * t.numel()
