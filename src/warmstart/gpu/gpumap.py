"""Which GPU of this host each GPU of a snapshot is restored onto (``--gpu-map``).

Specs are ``SRC=DST`` items, comma-separated or repeated; each side is an
index (the snapshot's recorded ``gpu_index`` on the left, this host's
inventory index on the right) or a GPU UUID. Rules:

* a snapshot GPU not named in a spec maps to the same UUID when this host has
  it; otherwise restore is refused with a hint to use ``--gpu-map``;
* target model must equal the source model (the driver needs the same chip);
* this host's driver major must be >= the snapshot's;
* a target may be used once; unknown indices and UUIDs are refused;
* a target must have room for the device memory of the processes sent to it;
* moving to a different GPU needs the remap API (CUDA 13.0 / driver 580).

The snapshot's records are taken as plain objects with ``gpu_uuid``,
``gpu_model`` and ``driver_version`` attributes (``gpu_index``, ``pid`` and
``device_memory_bytes`` are used when present), so the manifest's
``GpuProcess`` fits as it is; :class:`SourceGpu` is a stand-alone equivalent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from warmstart.errors import Incompatible, UsageError, WarmstartError
from warmstart.gpu.devices import GpuDevice, GpuInventory, driver_major
from warmstart.gpu.driver import normalize_uuid

GpuPairs = list[tuple[str, str]]


class GpuRecord(Protocol):
    gpu_uuid: str
    gpu_model: str
    driver_version: str


@dataclass(frozen=True)
class SourceGpu:
    """One process-on-GPU record of a snapshot (the shape of manifest ``GpuProcess``)."""

    gpu_uuid: str
    gpu_model: str
    driver_version: str
    gpu_index: int | None = None
    device_memory_bytes: int = 0
    pid: int | None = None


@dataclass(frozen=True)
class _Source:
    uuid: str
    model: str
    index: int | None
    memory_bytes: int


def _token(text: str, spec: str) -> str:
    text = text.strip()
    if text.isdigit():
        return str(int(text))
    try:
        return normalize_uuid(text)
    except WarmstartError:
        raise UsageError(
            f"bad --gpu-map item {spec!r}: {text!r} is neither a GPU index nor a GPU UUID",
            hint="write SRC=DST, e.g. --gpu-map 0=1 or --gpu-map GPU-…=GPU-…",
        ) from None


def parse_gpu_map(specs: str | Iterable[str]) -> GpuPairs:
    """``["0=1,GPU-a=GPU-b"]`` -> ``[("0", "1"), ("GPU-a…", "GPU-b…")]`` (tokens normalised)."""
    if isinstance(specs, str):
        specs = [specs]
    out: GpuPairs = []
    for spec in specs:
        for item in spec.split(","):
            if not item.strip():
                continue
            src, sep, dst = item.partition("=")
            if not sep or not src.strip() or not dst.strip() or "=" in dst:
                raise UsageError(
                    f"bad --gpu-map item {item.strip()!r}",
                    hint="write SRC=DST, e.g. --gpu-map 0=1 or --gpu-map GPU-…=GPU-…",
                )
            out.append((_token(src, item.strip()), _token(dst, item.strip())))
    return out


def _sources(records: Sequence[GpuRecord]) -> tuple[list[_Source], int | None, str | None]:
    by_uuid: dict[str, _Source] = {}
    majors: list[int] = []
    version: str | None = None
    for rec in records:
        uuid = normalize_uuid(rec.gpu_uuid)
        mem = int(getattr(rec, "device_memory_bytes", 0) or 0)
        prev = by_uuid.get(uuid)
        index = getattr(rec, "gpu_index", None)
        if prev is None:
            by_uuid[uuid] = _Source(uuid, rec.gpu_model, index, mem)
        else:
            by_uuid[uuid] = _Source(
                uuid, prev.model, prev.index if prev.index is not None else index,
                prev.memory_bytes + mem,
            )
        major = driver_major(rec.driver_version)
        if major is not None:
            majors.append(major)
            version = rec.driver_version if major == max(majors) else version
    return list(by_uuid.values()), (max(majors) if majors else None), version


def _describe_host(inventory: GpuInventory) -> str:
    if not inventory.devices:
        return "this host has no GPU"
    items = ", ".join(f"{d.index}: {d.uuid} ({d.name})" for d in inventory.devices)
    return f"this host has {items}"


def _describe_sources(sources: Sequence[_Source]) -> str:
    return ", ".join(
        (f"{s.index}: " if s.index is not None else "") + f"{s.uuid} ({s.model})"
        for s in sources
    )


def _find_source(token: str, sources: Sequence[_Source]) -> _Source:
    if token.isdigit():
        found = [s for s in sources if s.index == int(token)]
    else:
        found = [s for s in sources if s.uuid == token]
    if not found:
        raise UsageError(
            f"--gpu-map names source GPU {token}, which the snapshot does not use",
            hint=f"the snapshot used {_describe_sources(sources) or 'no GPU'}",
        )
    return found[0]


def _find_target(token: str, inventory: GpuInventory) -> GpuDevice:
    dev = inventory.by_index(int(token)) if token.isdigit() else inventory.by_uuid(token)
    if dev is None:
        raise UsageError(
            f"--gpu-map names target GPU {token}, which this host does not have",
            hint=_describe_host(inventory),
        )
    return dev


def resolve_gpu_map(
    records: Sequence[GpuRecord],
    inventory: GpuInventory,
    specs: str | Iterable[str] = (),
) -> GpuPairs:
    """(old UUID, new UUID) for every GPU the snapshot used, checked against this host.

    Identity pairs are included; see :func:`needs_remap` before handing the
    list to the driver.
    """
    sources, src_major, src_version = _sources(records)
    explicit: dict[str, GpuDevice] = {}
    for src_tok, dst_tok in parse_gpu_map(specs):
        src = _find_source(src_tok, sources)
        if src.uuid in explicit:
            raise UsageError(f"--gpu-map maps source GPU {src.uuid} twice")
        explicit[src.uuid] = _find_target(dst_tok, inventory)

    chosen: dict[str, GpuDevice] = {}
    for src in sources:
        dev = explicit.get(src.uuid) or inventory.by_uuid(src.uuid)
        if dev is None:
            raise Incompatible(
                f"snapshot GPU {src.uuid} ({src.model}) is not on this host",
                hint=f"choose a target with --gpu-map {src.uuid}=<index or UUID>; "
                f"{_describe_host(inventory)}",
            )
        chosen[src.uuid] = dev

    used: dict[str, str] = {}
    for src in sources:
        dev = chosen[src.uuid]
        if dev.uuid in used:
            raise UsageError(
                f"GPU {dev.uuid} is the target of both {used[dev.uuid]} and {src.uuid}",
                hint="map each snapshot GPU to a different GPU with --gpu-map",
            )
        used[dev.uuid] = src.uuid
        if dev.name.strip() != src.model.strip():
            raise Incompatible(
                f"snapshot GPU {src.uuid} is a {src.model}, target {dev.uuid} is a {dev.name}",
                hint="a snapshot restores only onto the same GPU model",
            )
        if src.memory_bytes and dev.total_memory_bytes and (
            src.memory_bytes > dev.total_memory_bytes
        ):
            raise Incompatible(
                f"snapshot GPU {src.uuid} held {src.memory_bytes} bytes, "
                f"more than target {dev.uuid} has ({dev.total_memory_bytes})"
            )

    host_major = inventory.driver_major
    if src_major is not None and host_major is not None and host_major < src_major:
        raise Incompatible(
            f"this host's NVIDIA driver {inventory.driver_version} is older than the "
            f"snapshot's {src_version}",
            hint=f"install driver {src_major} or newer here",
        )

    pairs = [(src.uuid, chosen[src.uuid].uuid) for src in sources]
    if needs_remap(pairs) and not inventory.features.gpu_remap:
        raise Incompatible(
            "restoring onto a different GPU needs NVIDIA driver ≥ 580 (CUDA 13.0); "
            f"this host has {inventory.driver_version or 'an unknown driver'}",
            hint="restore onto the snapshot's own GPUs or upgrade the driver",
        )
    return pairs


def needs_remap(pairs: Iterable[tuple[str, str]]) -> bool:
    """Whether any pair moves a GPU (i.e. the driver must be told)."""
    return any(normalize_uuid(a) != normalize_uuid(b) for a, b in pairs)


def visible_gpus(spec: str | None, inventory: GpuInventory) -> tuple[str, ...]:
    """UUIDs of the GPUs a process's CUDA sees, from its ``CUDA_VISIBLE_DEVICES``.

    Unset means every GPU; entries are indices or (prefixes of) UUIDs, and CUDA
    stops at the first entry it cannot match, as this does.
    """
    devices = list(inventory.devices)
    if spec is None:
        return tuple(normalize_uuid(d.uuid) for d in devices)
    seen: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if token.isdigit():
            match = next((d for d in devices if d.index == int(token)), None)
        else:
            want = token.lower() if token.upper().startswith("GPU-") else ""
            match = next((d for d in devices if want and d.uuid.lower().startswith(want)), None)
        if match is None:
            break
        seen.append(normalize_uuid(match.uuid))
    return tuple(dict.fromkeys(seen))


def complete_pairs(
    pairs: Sequence[tuple[str, str]], visible: Sequence[str]
) -> list[tuple[str, str]]:
    """``pairs`` plus a pair for every GPU in ``visible`` they leave out.

    The driver's restore wants every GPU the process could see mapped. The
    ones no snapshot state lives on go to the targets still free, in order
    (a one-GPU worker moved 0 -> 1 on a two-GPU host gets 1 -> 0 as well).
    """
    out = [(normalize_uuid(a), normalize_uuid(b)) for a, b in pairs]
    sources = {a for a, _ in out}
    targets = {b for _, b in out}
    free_targets = [u for u in map(normalize_uuid, visible) if u not in targets]
    for old in map(normalize_uuid, visible):
        if old in sources:
            continue
        new = old if old not in targets else (free_targets.pop(0) if free_targets else None)
        if new is None:
            break
        if new in free_targets:
            free_targets.remove(new)
        out.append((old, new))
        sources.add(old)
        targets.add(new)
    return out
