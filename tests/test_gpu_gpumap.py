"""--gpu-map parsing and the snapshot-GPU -> host-GPU compatibility rules."""

from __future__ import annotations

import pytest

from warmstart.errors import Incompatible, UsageError
from warmstart.gpu.devices import GpuDevice, GpuInventory
from warmstart.gpu.gpumap import SourceGpu, needs_remap, parse_gpu_map, resolve_gpu_map

H100 = "NVIDIA H100 80GB HBM3"
U = [f"GPU-{i}{i}{i}{i}{i}{i}{i}{i}-0000-0000-0000-00000000000{i}" for i in range(4)]


def inv(*devs: tuple[str, str], driver: str = "580.65.06", api: int | None = 13000) -> GpuInventory:
    return GpuInventory(
        tuple(GpuDevice(i, u, n, 80 << 30) for i, (u, n) in enumerate(devs)), driver, api, "nvml"
    )


def rec(uuid: str, model: str = H100, driver: str = "580.65.06", index: int | None = 0,
        mem: int = 0, pid: int = 1) -> SourceGpu:
    return SourceGpu(uuid, model, driver, index, mem, pid)


def test_parse_forms() -> None:
    assert parse_gpu_map(["0=1, 2=3", f"{U[1].upper()}={U[2][4:]}"]) == [
        ("0", "1"), ("2", "3"), (U[1], U[2]),
    ]
    assert parse_gpu_map("") == []
    assert parse_gpu_map("007=1") == [("7", "1")]


@pytest.mark.parametrize("bad", ["0", "0=", "=1", "0=1=2", "a=b", "0=GPU-zz"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(UsageError, match="--gpu-map"):
        parse_gpu_map(bad)


def test_default_is_same_uuid() -> None:
    host = inv((U[0], H100), (U[1], H100))
    pairs = resolve_gpu_map([rec(U[1], index=1), rec(U[1], index=1, pid=2)], host)
    assert pairs == [(U[1], U[1])]
    assert not needs_remap(pairs)


def test_missing_gpu_suggests_gpu_map() -> None:
    host = inv((U[0], H100))
    with pytest.raises(Incompatible) as info:
        resolve_gpu_map([rec(U[3])], host)
    assert U[3] in info.value.message
    assert info.value.hint and "--gpu-map" in info.value.hint and U[0] in info.value.hint


def test_map_by_index_and_uuid() -> None:
    host = inv((U[2], H100), (U[3], H100))
    records = [rec(U[0], index=0), rec(U[1], index=1)]
    assert resolve_gpu_map(records, host, ["0=1", f"{U[1]}={U[2]}"]) == [
        (U[0], U[3]), (U[1], U[2]),
    ]


def test_swap_is_allowed() -> None:
    host = inv((U[0], H100), (U[1], H100))
    records = [rec(U[0], index=0), rec(U[1], index=1)]
    pairs = resolve_gpu_map(records, host, ["0=1,1=0"])
    assert pairs == [(U[0], U[1]), (U[1], U[0])]
    assert needs_remap(pairs)


def test_duplicate_target_refused() -> None:
    host = inv((U[0], H100), (U[1], H100))
    records = [rec(U[0], index=0), rec(U[1], index=1)]
    with pytest.raises(UsageError, match="target of both"):
        resolve_gpu_map(records, host, ["0=1"])  # 1 stays on U[1] by default


def test_source_mapped_twice_refused() -> None:
    host = inv((U[0], H100), (U[1], H100))
    with pytest.raises(UsageError, match="twice"):
        resolve_gpu_map([rec(U[0])], host, ["0=0", f"{U[0]}=1"])


def test_unknown_source_and_target_refused() -> None:
    host = inv((U[0], H100))
    with pytest.raises(UsageError, match="does not use"):
        resolve_gpu_map([rec(U[0])], host, ["5=0"])
    with pytest.raises(UsageError, match="does not use"):
        resolve_gpu_map([rec(U[0])], host, [f"{U[3]}=0"])
    with pytest.raises(UsageError, match="does not have") as info:
        resolve_gpu_map([rec(U[0])], host, ["0=7"])
    assert info.value.hint and U[0] in info.value.hint
    with pytest.raises(UsageError, match="does not have"):
        resolve_gpu_map([rec(U[0])], host, [f"0={U[2]}"])


def test_model_must_match() -> None:
    host = inv((U[1], "NVIDIA H200"))
    with pytest.raises(Incompatible, match="same GPU model|H200"):
        resolve_gpu_map([rec(U[0])], host, ["0=0"])


@pytest.mark.parametrize(("src", "host_drv", "ok"), [
    ("580.65.06", "580.10.01", True),   # same major, older minor: fine
    ("580.65.06", "590.1", True),
    ("580.65.06", "575.57.08", False),
])
def test_driver_major_rule(src: str, host_drv: str, ok: bool) -> None:
    host = inv((U[0], H100), driver=host_drv, api=None)
    if ok:
        assert resolve_gpu_map([rec(U[0], driver=src)], host) == [(U[0], U[0])]
    else:
        with pytest.raises(Incompatible, match="older than"):
            resolve_gpu_map([rec(U[0], driver=src)], host)


def test_remap_needs_driver_580() -> None:
    host = inv((U[1], H100), driver="575.57.08", api=12090)
    with pytest.raises(Incompatible, match="580"):
        resolve_gpu_map([rec(U[0], driver="575.57.08")], host, ["0=0"])
    # staying on the same GPU works on that driver
    host2 = inv((U[0], H100), driver="575.57.08", api=12090)
    assert resolve_gpu_map([rec(U[0], driver="575.57.08")], host2) == [(U[0], U[0])]


def test_target_memory_must_fit() -> None:
    host = inv((U[1], H100))
    records = [rec(U[0], mem=50 << 30, pid=1), rec(U[0], mem=40 << 30, pid=2)]
    with pytest.raises(Incompatible, match="bytes"):
        resolve_gpu_map(records, host, ["0=0"])


def test_accepts_manifest_records() -> None:
    manifest = pytest.importorskip("warmstart.snapshot.manifest")
    gp = manifest.GpuProcess(pid=7, gpu_uuid=U[0], gpu_model=H100, gpu_index=0,
                             driver_version="580.65.06")
    assert resolve_gpu_map([gp], inv((U[2], H100)), ["0=0"]) == [(U[0], U[2])]


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    from warmstart.gpu.gpumap import visible_gpus

    host = inv((U[0], H100), (U[1], H100), (U[2], H100))
    assert visible_gpus(None, host) == (U[0], U[1], U[2])
    assert visible_gpus("2,0", host) == (U[2], U[0])
    assert visible_gpus(U[1][:12], host) == (U[1],)  # a UUID prefix, as CUDA takes it
    assert visible_gpus("1,7,0", host) == (U[1],)  # CUDA stops at the first it cannot match
    assert visible_gpus("", host) == ()


@pytest.mark.parametrize(
    ("pairs", "visible", "expected"),
    [
        # a one-GPU worker moved 0 -> 1 on a host whose two GPUs it could both see
        ([(U[0], U[1])], [U[0], U[1]], [(U[0], U[1]), (U[1], U[0])]),
        # both GPUs already mapped (a TP=2 swap): nothing to add
        ([(U[0], U[1]), (U[1], U[0])], [U[0], U[1]], [(U[0], U[1]), (U[1], U[0])]),
        # GPUs nobody moves onto stay where they are
        ([(U[0], U[2])], U[:4], [(U[0], U[2]), (U[1], U[1]), (U[2], U[0]), (U[3], U[3])]),
        # what the process could not see is not mapped
        ([(U[0], U[1])], [U[0]], [(U[0], U[1])]),
    ],
)
def test_complete_pairs_maps_every_visible_gpu_once(pairs, visible, expected) -> None:  # type: ignore[no-untyped-def]
    from warmstart.gpu.gpumap import complete_pairs

    out = complete_pairs(pairs, visible)
    assert out == expected
    assert len({a for a, _ in out}) == len({b for _, b in out}) == len(out)  # a bijection
