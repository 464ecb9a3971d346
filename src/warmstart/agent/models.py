"""The agent API's request and operation documents (pydantic, JSON on the wire)."""

from __future__ import annotations

import time
from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


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

    #: runc container id (with ``runc_root``) or containerd task id (``containerd://`` allowed).
    container_id: str = Field(min_length=1)
    #: ``runc`` or ``containerd``; the agent's default when absent.
    runtime: str | None = None
    runc_root: str | None = None


class CheckpointRequest(_Request):
    type: Literal["checkpoint"]
    snapshot: str | None = None
    #: Local store directory; the agent's default store when empty.
    store: str | None = None
    wait_ready: bool = False
    wait_ready_timeout_s: float = 600.0
    leave_running: bool = False
    #: For a plain-directory rootfs (no overlay): the image's unpacked rootfs to diff against.
    base_rootfs: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class RestoreRequest(_Request):
    type: Literal["restore"]
    snapshot: str = Field(min_length=1)
    store: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    #: Source GPU -> target GPU (``warmstart restore --gpu-map`` syntax), for GPU snapshots.
    gpu_map: list[str] = Field(default_factory=list)


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
    container_id: str
    snapshot: str | None = None
    state: State = State.PENDING
    #: The phase running now (preflight, dump, criu-restore...), and those done.
    phase: str | None = None
    phases_done: list[str] = Field(default_factory=list)
    cancel_requested: bool = False
    error: str | None = None
    hint: str | None = None
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
