"""The agent API's request and operation documents (pydantic, JSON on the wire)."""

from __future__ import annotations

import time
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class State(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (State.SUCCEEDED, State.FAILED)


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: runc container id (with ``runc_root``), containerd task id or CRI-O container id
    #: (a ``containerd://`` / ``cri-o://`` prefix is allowed).
    container_id: str = Field(min_length=1)
    #: ``runc``, ``containerd``, ``crio`` or ``auto``; the agent's default when absent.
    runtime: str | None = None
    runc_root: str | None = None


class CheckpointRequest(_Request):
    """A container (``container_id``) or a host process tree (``pid``), exactly one."""

    type: Literal["checkpoint"]
    container_id: str | None = Field(default=None, min_length=1)  # type: ignore[assignment]
    #: Root of a host process tree to checkpoint (``warmstart checkpoint --pid --agent``).
    pid: int | None = Field(default=None, gt=0)
    snapshot: str | None = None
    #: Local store directory; the agent's default store when empty.
    store: str | None = None
    wait_ready: bool = False
    wait_ready_timeout_s: float = 600.0
    leave_running: bool = False
    #: For a plain-directory rootfs (no overlay): the image's unpacked rootfs to diff against.
    base_rootfs: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    #: Checkpoint a listening/bound inet socket on a specific non-loopback address anyway.
    allow_bound_ip: bool = False
    #: CRIU dump options of ``warmstart checkpoint`` (process trees; containers use runc's).
    tcp_established: bool = False
    tcp_close: bool = False
    shell_job: bool = False
    ext_unix_sk: bool = False
    ghost_limit_mib: int = Field(default=256, ge=0)
    gpu_lock_timeout_s: float = 30.0
    durable: bool = True
    compress: str = "none"

    @model_validator(mode="after")
    def _one_target(self) -> CheckpointRequest:
        if (self.container_id is None) == (self.pid is None):
            raise ValueError("give exactly one of container_id and pid")
        return self


class RestoreRequest(_Request):
    """Into a placeholder container (``container_id``), or as a host process tree (none)."""

    type: Literal["restore"]
    container_id: str | None = Field(default=None, min_length=1)  # type: ignore[assignment]
    snapshot: str = Field(min_length=1)
    store: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    #: Source GPU -> target GPU (``warmstart restore --gpu-map`` syntax), for GPU snapshots.
    gpu_map: list[str] = Field(default_factory=list)
    #: Process-tree restores only (``warmstart restore`` options).
    control_dir: str | None = None
    verify: bool = True
    parallel_pages: bool | None = None
    page_threads: int | None = Field(default=None, ge=1, le=256)
    lazy: bool = False
    prefetch: bool = False


class ColdStartRequest(_Request):
    type: Literal["cold-start"]
    reason: str = "cold start requested"


Request = CheckpointRequest | RestoreRequest | ColdStartRequest


class LogLine(BaseModel):
    t: float
    message: str


class Operation(BaseModel):
    """One operation as the API reports it and the state dir stores it."""

    id: str
    type: str
    #: The container operated on; None for a host process tree (then ``pid`` for a checkpoint).
    container_id: str | None = None
    pid: int | None = None
    snapshot: str | None = None
    state: State = State.PENDING
    #: The phase running now (preflight, dump, criu-restore...), and those done.
    phase: str | None = None
    phases_done: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    error: str | None = None
    hint: str | None = None
    #: The warmstart.errors class of ``error`` (clients re-raise the same kind).
    error_type: str | None = None
    #: Final report: snapshot_id, size_bytes, timings {phase: s}, pid, gpu_model...
    result: dict[str, object] = Field(default_factory=dict)
    logs: list[LogLine] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    #: The request as received (re-read on agent restart to clean up).
    request: dict[str, object] = Field(default_factory=dict)
    #: PID of the agent that ran it (a different one after a restart).
    agent_pid: int | None = None
