"""The file contract between a checkpointing worker and whoever snapshots it.

It is the reference system's contract (``SNAPSHOT_CONTROL_DIR``), so engines
already instrumented for it work unchanged:

* the worker writes ``ready-for-snapshot`` at its checkpoint point and polls;
* the checkpointer writes ``snapshot-complete`` (the original may exit) or,
  in the restored copy, ``restore-context.json`` then ``restore-complete``
  (the restored worker applies the context and resumes).

Because CRIU brings back the old process environment, the restorer hands the
new one (hostname, pod name/IP, ports, GPU map) over as the restore context.
Both sides import this module; it depends on nothing but pydantic.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

CONTROL_DIR_ENV = "SNAPSHOT_CONTROL_DIR"
READY_FOR_SNAPSHOT = "ready-for-snapshot"
SNAPSHOT_COMPLETE = "snapshot-complete"
RESTORE_COMPLETE = "restore-complete"
RESTORE_CONTEXT = "restore-context.json"
#: Written by the checkpointer when it gives up: the worker continues un-snapshotted.
SNAPSHOT_FAILED = "snapshot-failed"


class RestoreContext(BaseModel):
    """What a restored worker needs to know about its new life."""

    snapshot_id: str
    snapshot_name: str
    restored_at: float = Field(default_factory=time.time)
    #: Environment variables to apply before phase 2 (new hostname, pod IP, ports...).
    env: dict[str, str] = Field(default_factory=dict)
    #: Source GPU UUID -> target GPU UUID, when the restore remapped GPUs.
    gpu_map: dict[str, str] = Field(default_factory=dict)
    #: The ``checkpoint_id`` the worker wrote into ``ready-for-snapshot`` (recorded
    #: in the snapshot's manifest). A restored worker refuses a context whose
    #: ``checkpoint_id`` is not its own: the marker belongs to another snapshot.
    checkpoint_id: str | None = None


class ReadyInfo(BaseModel):
    """Written into ``ready-for-snapshot`` by the worker."""

    pid: int
    created_at: float = Field(default_factory=time.time)
    #: Free-form facts the worker wants recorded in the manifest (model, engine, ...).
    labels: dict[str, str] = Field(default_factory=dict)
    #: A random id the worker draws at its checkpoint point. The checkpointer
    #: records it with the snapshot and hands it back in ``RestoreContext``.
    checkpoint_id: str | None = None


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so that readers see all of it or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def signal_file(control_dir: Path, name: str, payload: BaseModel | None = None) -> Path:
    path = Path(control_dir) / name
    body = payload.model_dump_json().encode() if payload is not None else b""
    write_atomic(path, body)
    return path


M = TypeVar("M", bound=BaseModel)


def read_model(path: Path, model: type[M]) -> M:
    return model.model_validate(json.loads(Path(path).read_text() or "{}"))
