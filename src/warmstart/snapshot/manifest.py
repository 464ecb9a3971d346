"""The snapshot manifest: what a snapshot holds and where it came from.

A manifest is the last file written into a snapshot and the first one read on
restore. Restore refuses a snapshot whose manifest is missing, of an unknown
format version, or whose files fail their checksums.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from warmstart.errors import SnapshotCorrupt

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGES_DIR = "images"
#: The snapshot's pagemaps decoded at checkpoint (`warmstart.host.pagemap.RunsCache`)
RUNS_FILE = "pagemap-runs.bin"

#: How a snapshot was made durable before it was published: ``fsync`` (on disk
#: first; survives a power loss) or ``none`` (left to the kernel's write-back:
#: atomic, but a power loss soon after can lose or damage it).
Durability = Literal["fsync", "none"]
DURABILITY_MODES: tuple[Durability, ...] = ("fsync", "none")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HostInfo(_Model):
    hostname: str
    kernel: str
    arch: str
    cpu_model: str
    cpu_flags: list[str] = Field(default_factory=list)
    criu_version: str


class ProcessInfo(_Model):
    pid: int
    ppid: int
    name: str
    threads: int
    rss_bytes: int


class ProcessTree(_Model):
    root_pid: int
    processes: list[ProcessInfo]
    cmdline: list[str] = Field(default_factory=list)


class FileEntry(_Model):
    """One file of the snapshot, relative to the snapshot directory."""

    path: str
    size: int
    #: ``<algorithm>:<hex digest>``; xxh3-128 by default.
    digest: str
    #: Digests of consecutive ``piece_size`` pieces (large page images), checked
    #: in parallel on restore. Empty for small files and older snapshots.
    pieces: list[str] = []
    piece_size: int | None = None


class GpuProcess(_Model):
    """The GPU state of one CUDA process of the tree."""

    pid: int
    gpu_uuid: str
    gpu_model: str
    gpu_index: int | None = None
    driver_version: str
    cuda_driver_api: int | None = None
    device_memory_bytes: int = 0
    #: Every GPU the process's CUDA could see (its CUDA_VISIBLE_DEVICES); a restore
    #: onto other GPUs must map each of them. Empty in older snapshots.
    visible_uuids: tuple[str, ...] = ()


class PhaseTiming(_Model):
    name: str
    seconds: float
    bytes: int | None = None


class ContainerInfo(_Model):
    """What a container-level snapshot needs besides its images (``kind == "container"``)."""

    runtime: str
    container_id: str
    #: Identity of the image the container's root filesystem came from; restore
    #: refuses a placeholder of another image.
    image: str
    #: ``overlay`` (upper directory captured) or ``plain`` (diff against a base rootfs).
    rootfs_kind: str
    #: Snapshot-relative path of the filesystem diff archive (tar, OCI whiteouts).
    rootfs_diff: str | None = None
    #: CRIU key of the external network namespace (``--inherit-fd fd[N]:KEY`` on restore).
    net_key: str | None = None
    #: stdio fd of the container init -> CRIU inherit key; re-attached to the placeholder's.
    stdio: dict[str, str] = Field(default_factory=dict)
    #: CRIU external-mount key -> host path bind-mounted there on restore.
    ext_mounts: dict[str, str] = Field(default_factory=dict)
    #: Namespace types the dump saved (fresh on restore) vs. joined from the placeholder.
    namespaces: list[str] = Field(default_factory=list)
    #: Host PID at the dump -> PID inside the container's PID namespace, for the whole tree
    #: (a restored process keeps the inner one; GPU restore needs the new host PID).
    ns_pids: dict[str, int] = Field(default_factory=dict)


class Manifest(_Model):
    format_version: int = FORMAT_VERSION
    kind: Literal["process-tree", "container"] = "process-tree"
    snapshot_id: str
    name: str
    created_at: dt.datetime
    source: HostInfo
    tree: ProcessTree
    files: list[FileEntry]
    gpus: list[GpuProcess] = Field(default_factory=list)
    timings: list[PhaseTiming] = Field(default_factory=list)
    #: CRIU options the dump used that restore must mirror (tcp, shell-job...).
    criu_options: dict[str, bool | int | str] = Field(default_factory=dict)
    #: Free-form facts from the workload or the caller (model, engine, control dir).
    labels: dict[str, str] = Field(default_factory=dict)
    #: Set for container snapshots (``kind == "container"``).
    container: ContainerInfo | None = None
    #: Codec of the page images (``pages-*.img.<codec>``, warmstart.store.compress); None: raw.
    compression: Literal["zstd", "lz4"] | None = None
    #: See :data:`Durability`; None in manifests written before it was recorded.
    durability: Durability | None = None
    #: Bytes of the page images held as holes: runs of zero pages punched out
    #: at checkpoint (warmstart.host.sparse). They read as zeros.
    sparse_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, *, where: str = "manifest") -> Manifest:
        """Parse and validate a manifest; every failure is a one-line SnapshotCorrupt."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SnapshotCorrupt(
                f"{where} is not valid JSON ({exc})",
                hint="the snapshot is damaged; take a new checkpoint",
            ) from None
        if not isinstance(raw, dict):
            raise SnapshotCorrupt(f"{where} is not a JSON object", hint="take a new checkpoint")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise SnapshotCorrupt(
                f"{where} has format version {version!r}; this warmstart reads {FORMAT_VERSION}",
                hint="restore it with the warmstart version that wrote it, or take a new checkpoint",
            )
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise SnapshotCorrupt(
                f"{where} is invalid: {loc}: {first['msg']}", hint="take a new checkpoint"
            ) from None

    @classmethod
    def load(cls, snapshot_dir: Path) -> Manifest:
        path = Path(snapshot_dir) / MANIFEST_NAME
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise SnapshotCorrupt(
                f"snapshot {Path(snapshot_dir).name!r} has no {MANIFEST_NAME}",
                hint="it was not written completely; remove it and take a new checkpoint",
            ) from None
        return cls.from_json(text, where=f"{path}")
