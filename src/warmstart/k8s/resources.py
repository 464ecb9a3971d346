"""The ``Snapshot`` resource (``warmstart.dev/v1alpha1``) and compatibility rules.

Objects travel as plain dicts (what the API server sends); these models parse and build the
``spec`` and ``status`` parts. Field names are camelCase on the wire, snake_case here.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from warmstart.k8s import contract


class _Wire(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class Phase(StrEnum):
    PENDING = "Pending"  # waiting for a source pod / for the node agent to claim it
    CHECKPOINTING = "Checkpointing"  # claimed by the agent on status.node
    READY = "Ready"
    FAILED = "Failed"


class LabelSelector(_Wire):
    match_labels: dict[str, str] = Field(default_factory=dict)


class Source(_Wire):
    pod_name: str | None = None
    selector: LabelSelector | None = None
    container: str | None = None


class Options(_Wire):
    #: Wait for the worker's ``ready-for-snapshot`` before checkpointing.
    wait_ready: bool = True


class SnapshotSpec(_Wire):
    source: Source
    workload: str | None = None
    #: Store URI, e.g. ``file:///var/lib/warmstart/snapshots``; empty: the agent's default.
    store: str | None = None
    options: Options = Field(default_factory=Options)


class PhaseTimingStatus(_Wire):
    name: str
    seconds: float


class Condition(_Wire):
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str = ""
    last_transition_time: str


class SnapshotStatus(_Wire):
    phase: Phase = Phase.PENDING
    node: str | None = None
    source_pod: str | None = None
    container: str | None = None
    claimed_by: str | None = None
    store_key: str | None = None
    snapshot_id: str | None = None
    size_bytes: int | None = None
    gpu_model: str | None = None
    driver_version: str | None = None
    image_digest: str | None = None
    arch: str | None = None
    compat_key: str | None = None
    timings: list[PhaseTimingStatus] = Field(default_factory=list)
    started_at: str | None = None
    completed_at: str | None = None
    failure_reason: str | None = None
    message: str | None = None
    conditions: list[Condition] = Field(default_factory=list)

    def set_condition(self, type_: str, ok: bool, reason: str, message: str = "") -> None:
        status = "True" if ok else "False"
        for cond in self.conditions:
            if cond.type == type_:
                if cond.status != status:
                    cond.last_transition_time = now()
                cond.status, cond.reason, cond.message = status, reason, message
                return
        self.conditions.append(Condition(type=type_, status=status, reason=reason,
                                         message=message, last_transition_time=now()))


class RestoreStatus(_Wire):
    """What the node agent records on a restore-annotated pod."""

    result: str  # "restoring" | "restored" | "cold-start"
    #: Machine-readable: no-compatible-snapshot | snapshot-not-ready | restore-failed | interrupted
    reason: str = ""
    message: str = ""
    snapshot: str | None = None
    node: str | None = None
    seconds: float | None = None


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def spec_of(obj: dict[str, Any]) -> SnapshotSpec:
    return SnapshotSpec.model_validate(obj.get("spec") or {})


def status_of(obj: dict[str, Any]) -> SnapshotStatus:
    return SnapshotStatus.model_validate(obj.get("status") or {})


def new_snapshot(name: str, namespace: str, spec: SnapshotSpec,
                 labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
        "spec": spec.wire(),
    }


# --- compatibility -----------------------------------------------------------------------


class Compat(BaseModel):
    """The facts that must match between a snapshot and the place it is restored."""

    model_config = ConfigDict(frozen=True)

    arch: str
    gpu_model: str
    driver_version: str
    image_digest: str

    def key(self) -> str:
        return f"{self.arch}|{self.gpu_model}|{self.driver_version}|{self.image_digest}"

    def short(self) -> str:
        return hashlib.sha256(self.key().encode()).hexdigest()[:10]

    @classmethod
    def from_key(cls, key: str) -> Compat | None:
        parts = key.split("|")
        if len(parts) != 4:
            return None
        return cls(arch=parts[0], gpu_model=parts[1], driver_version=parts[2],
                   image_digest=parts[3])

    def mismatch(self, other: Compat) -> str | None:
        """The first fact that differs, as a one-line reason; None when compatible."""
        for field in ("image_digest", "gpu_model", "driver_version", "arch"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                return f"{field} {theirs!r} != {mine!r}"
        return None


def snapshot_compat(status: SnapshotStatus) -> Compat | None:
    if status.compat_key:
        return Compat.from_key(status.compat_key)
    return None


def image_digest(image_id: str) -> str:
    """``docker.io/x/y@sha256:abc`` or ``sha256:abc`` -> ``sha256:abc``; else the input."""
    if "@" in image_id:
        return image_id.rsplit("@", 1)[1]
    return image_id


def snapshot_name_for(workload: str, compat: Compat) -> str:
    """The deterministic name of the controller-made snapshot of a workload and class."""
    base = workload.lower()[: 63 - 11].rstrip("-.")
    return f"{base}-{compat.short()}"
