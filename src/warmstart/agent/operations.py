"""Operations of the agent: validate, run in parallel, persist, cancel, recover.

Every operation is a JSON file in ``STATE_DIR/operations/`` rewritten (atomically) at
each state change and phase. An agent that starts and finds operations that were
pending or running under a previous agent marks them failed and undoes what they left:
a checkpoint's staging directory is swept from its store (the snapshot guard already
resumed the container); a restore's half-restored tree is killed and the placeholder's
``restore-started`` removed, so it waits again (or cold-starts at its deadline).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil

from warmstart import protocol
from warmstart.agent.metrics import Metrics
from warmstart.agent.models import (
    CheckpointRequest,
    ColdStartRequest,
    LogLine,
    Operation,
    Request,
    RestoreRequest,
    State,
)
from warmstart.errors import Cancelled, NotFoundError, UsageError, WarmstartError, kind_of
from warmstart.host import process as hostproc
from warmstart.host.criu import DumpOptions
from warmstart.runtime import container as ctr
from warmstart.runtime import placeholder as ph
from warmstart.runtime.discovery import Container, environ, runtime_for
from warmstart.snapshot.checkpoint import CheckpointResult
from warmstart.snapshot.manifest import Manifest, PhaseTiming
from warmstart.snapshot.restore import RestoreResult
from warmstart.store.local import LocalStore, check_name

log = logging.getLogger("warmstart.agent")


_NOT_CANCELLABLE = frozenset({"stop-original"})
#: Fault injection for tests: the agent hangs when an operation reaches this phase.
PAUSE_ENV = "WARMSTART_AGENT_PAUSE_AT"


class Conflict(UsageError):
    """The request is valid but clashes with the agent's state (HTTP 409)."""


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    store: Path
    runtime: str = "runc"
    runc_root: str | None = None
    workers: int = 8


def store_path(store: str) -> Path:
    """A store given as a directory or a ``file://`` URL (other schemes are refused)."""
    if store.startswith("file://"):
        return Path(store.removeprefix("file://"))
    if "://" in store:
        raise UsageError(f"store {store!r} is not a local directory",
                         hint="the agent reads and writes local (or mounted) store paths")
    return Path(store)


def _strip(container_id: str) -> str:
    return container_id.split("://", 1)[-1]


class OperationManager:
    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.dir = Path(settings.state_dir) / "operations"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._ops: dict[str, Operation] = {}
        self._busy: dict[str, str] = {}  # container id -> operation id
        self._lock = threading.RLock()
        self._pool = ThreadPoolExecutor(max_workers=settings.workers,
                                        thread_name_prefix="operation")

    # -- persistence ------------------------------------------------------------------
    def _save(self, op: Operation) -> None:
        with self._lock:
            data = op.model_dump_json(indent=1).encode()
        protocol.write_atomic(self.dir / f"{op.id}.json", data)

    def _log(self, op: Operation, message: str) -> None:
        with self._lock:
            op.logs.append(LogLine(t=time.time(), message=message))
        log.info("%s %s: %s", op.type, op.id, message)

    def recover(self) -> list[Operation]:
        """Load the operations of earlier agents; fail and clean up the unfinished ones."""
        recovered = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                op = Operation.model_validate_json(path.read_bytes())
            except ValueError:
                continue
            if not op.state.final:
                self._recover_one(op)
                recovered.append(op)
                self._save(op)
            self._ops[op.id] = op
        return recovered

    def _recover_one(self, op: Operation) -> None:
        was = op.phase or op.state.value
        outcome = State.FAILED
        try:
            if op.type == "checkpoint":
                removed = self._store(op.request.get("store")).sweep()  # type: ignore[arg-type]
                self._log(op, f"agent restart: swept {len(removed)} staging dir(s)")
            elif op.type == "restore" and op.container_id:
                outcome = self._recover_restore(op)
            elif op.type == "restore":
                self._recover_process_restore(op)
        except WarmstartError as exc:
            self._log(op, f"agent restart: cleanup: {exc}")
        op.state = outcome
        op.finished_at = time.time()
        if outcome is State.FAILED:
            op.error = f"the agent stopped during this operation (in {was})"
            op.hint = "nothing it started is left running; retry the operation"
        self.metrics.operations.labels(op.type, op.state.value).inc()

    def _recover_restore(self, op: Operation) -> State:
        try:
            target = self._runtime(op.request).get(_strip(op.container_id))
        except WarmstartError:
            self._log(op, "agent restart: the placeholder is gone")
            return State.FAILED
        control = ctr.placeholder_control(target)
        if (control / ph.RESTORE_COMPLETE).exists():
            self._log(op, "agent restart: the restore had completed")
            return State.SUCCEEDED
        if not (control / ph.RESTORE_STARTED).exists() or (control / ph.COLD_START).exists():
            return State.FAILED  # it never got as far as restoring, or the container moved on
        for child in psutil.Process(target.pid).children():
            hostproc.kill_tree(child.pid)
            self._log(op, f"agent restart: killed half-restored PID {child.pid}")
        for stale in (ph.RESTORED_PID, ph.RESTORE_STARTED):
            (control / stale).unlink(missing_ok=True)
        return State.FAILED

    def _recover_process_restore(self, op: Operation) -> None:
        """A process tree keeps its PIDs: kill the snapshot's root if CRIU left it stopped
        (restored, never resumed) and it is the snapshot's process (same name)."""
        if op.phase not in ("criu-restore", "page-fill", "verify-wait", "resume"):
            return
        manifest = Manifest.load(self._store(op.request.get("store")).path_of(op.snapshot or ""))  # type: ignore[arg-type]
        root = next((p for p in manifest.tree.processes if p.pid == manifest.tree.root_pid), None)
        try:
            proc = psutil.Process(manifest.tree.root_pid)
            stopped = proc.status() == psutil.STATUS_STOPPED
            same = root is not None and proc.name() == root.name
        except psutil.NoSuchProcess:
            return
        if stopped and same:
            hostproc.kill_tree(proc.pid)
            self._log(op, f"agent restart: killed half-restored PID {proc.pid}")

    # -- requests ---------------------------------------------------------------------
    def _runtime(self, request: dict[str, object] | Request):
        if isinstance(request, dict):
            name = request.get("runtime") or self.settings.runtime
            root = request.get("runc_root") or self.settings.runc_root
        else:
            name = request.runtime or self.settings.runtime
            root = request.runc_root or self.settings.runc_root
        return runtime_for(str(name), runc_root=str(root) if root else None)

    def _store(self, store: str | None) -> LocalStore:
        return LocalStore(store_path(store) if store else self.settings.store)

    def store(self, store: str | None = None) -> LocalStore:
        """A store the agent reads: the one named (directory or file:// URL), else its default."""
        return self._store(store)

    def _find(self, request: Request) -> Container | None:
        if request.container_id is None:  # a host process tree
            return None
        return self._runtime(request).get(_strip(request.container_id))

    def submit(self, request: Request) -> Operation:
        """Validate now (errors raise: 4xx for the caller); run it in the background."""
        container = self._find(request)
        if isinstance(request, CheckpointRequest) and request.pid is not None:
            hostproc.validate_root(request.pid)
        if isinstance(request, CheckpointRequest):
            store = self._store(request.store)
            if request.snapshot:
                check_name(request.snapshot)
                if (store.root / request.snapshot).exists():
                    raise Conflict(f"snapshot {request.snapshot!r} already exists in {store.root}",
                                   hint="choose another name or remove it first")
        elif isinstance(request, RestoreRequest):
            store = self._store(request.store)
            manifest = Manifest.load(store.path_of(request.snapshot))
            if container is not None:
                ctr.check_placeholder(container)
                ctr.check_image(manifest, container)
            elif manifest.kind == "container":
                raise UsageError(f"snapshot {request.snapshot!r} is a container snapshot",
                                 hint="restore it into a placeholder container (--into ID)")
        pid = getattr(request, "pid", None)
        op = Operation(id=uuid.uuid4().hex[:16], type=request.type,
                       container_id=container.id if container else None, pid=pid,
                       snapshot=getattr(request, "snapshot", None),
                       request=request.model_dump(mode="json"), agent_pid=os.getpid())
        key = _busy_key(request, container)
        with self._lock:
            if (other := self._busy.get(key)) is not None:
                raise Conflict(f"operation {other} is already running on {_what(key)}",
                               hint="wait for it or cancel it")
            if isinstance(request, ColdStartRequest):
                assert container is not None
                ctr.cold_start(container, request.reason)
                op.state = State.SUCCEEDED
                op.started_at = op.finished_at = time.time()
                self._log(op, f"cold-start written: {request.reason}")
                self._ops[op.id] = op
                self._save(op)
                self.metrics.operations.labels(op.type, op.state.value).inc()
                return op
            self._busy[key] = op.id
            self._ops[op.id] = op
        self._save(op)
        self.metrics.in_progress.labels(op.type).inc()
        self._pool.submit(self._run, op, request, container, key)
        return op

    def get(self, op_id: str) -> Operation:
        with self._lock:
            op = self._ops.get(op_id)
            if op is None:
                raise NotFoundError(f"no operation {op_id!r}", hint="list them: GET /v1/operations")
            return op.model_copy(deep=True)

    def list(self) -> list[Operation]:
        with self._lock:
            return [o.model_copy(deep=True) for o in
                    sorted(self._ops.values(), key=lambda o: o.created_at)]

    def cancel(self, op_id: str) -> Operation:
        with self._lock:
            op = self._ops.get(op_id)
            if op is None:
                raise NotFoundError(f"no operation {op_id!r}", hint="list them: GET /v1/operations")
            if op.state.final:
                raise Conflict(f"operation {op_id} has already {op.state.value}")
            op.cancel_requested = True
        self._log(op, "cancel requested")
        self._save(op)
        return self.get(op_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- running ----------------------------------------------------------------------
    def _phase(self, op: Operation, name: str) -> None:
        # Persisted before it is shown: a client that sees the phase and then the
        # agent die finds the same phase in what the next agent recovers.
        with self._lock:
            nxt = op.model_copy(deep=True)
            if nxt.phase:
                nxt.phases_done.append(nxt.phase)
            nxt.phase = name.strip()
            nxt.logs.append(LogLine(t=time.time(), message=f"phase {name.strip()}"))
        protocol.write_atomic(self.dir / f"{op.id}.json", nxt.model_dump_json(indent=1).encode())
        with self._lock:
            op.phases_done, op.phase, op.logs = nxt.phases_done, nxt.phase, nxt.logs
        log.info("%s %s: phase %s", op.type, op.id, name.strip())
        if os.environ.get(PAUSE_ENV) == name.strip():
            self._log(op, f"paused at {name.strip()} (${PAUSE_ENV})")
            self._save(op)
            while True:
                time.sleep(3600)
        # Past its publish a snapshot is done; only what can still be undone is cancelled.
        if op.cancel_requested and name.strip() not in _NOT_CANCELLABLE:
            raise Cancelled(f"operation {op.id} cancelled", hint="nothing it started is left")

    def _run(self, op: Operation, request: Request, container: Container | None,
             key: str) -> None:
        started = time.monotonic()
        op.state = State.RUNNING
        op.started_at = time.time()
        self._save(op)
        try:
            if op.cancel_requested:
                raise Cancelled(f"operation {op.id} cancelled before it started")
            if isinstance(request, CheckpointRequest) and container is None:
                op.result = self._checkpoint_process(op, request)
            elif isinstance(request, CheckpointRequest):
                op.result = self._checkpoint(op, request, container)
            elif container is None:
                op.result = self._restore_process(op, request)  # type: ignore[arg-type]
            else:
                op.result = self._restore(op, request, container)  # type: ignore[arg-type]
            op.state = State.SUCCEEDED
            self._log(op, "succeeded")
        except WarmstartError as exc:
            op.state, op.error, op.hint = State.FAILED, exc.message, exc.hint
            op.error_type = kind_of(exc)
            self.metrics.failures.labels(op.type, type(exc).__name__).inc()
            self._log(op, f"failed: {exc}")
        except Exception as exc:
            op.state, op.error = State.FAILED, f"internal error: {exc!r}"
            op.error_type = "WarmstartError"
            op.hint = "see the operation's logs and the agent's log"
            self.metrics.failures.labels(op.type, type(exc).__name__).inc()
            self._log(op, traceback.format_exc())
        finally:
            with self._lock:
                if op.phase:
                    op.phases_done.append(op.phase)
                    op.phase = None
                op.finished_at = time.time()
                self._busy.pop(key, None)
            self._save(op)
            self.metrics.in_progress.labels(op.type).dec()
            self.metrics.operations.labels(op.type, op.state.value).inc()
            self.metrics.duration.labels(op.type).observe(time.monotonic() - started)

    def _checkpoint(self, op: Operation, req: CheckpointRequest, container: Container) -> dict:
        store = self._store(req.store)
        if req.wait_ready:
            self._phase(op, "wait-ready")
            ctr.wait_ready(container, req.wait_ready_timeout_s,
                           cancelled=lambda: op.cancel_requested)
        res = ctr.checkpoint_container(
            container, store=store, name=req.snapshot,
            base_rootfs=Path(req.base_rootfs) if req.base_rootfs else None,
            leave_running=req.leave_running, labels=req.labels,
            allow_bound_ip=req.allow_bound_ip,
            listener=lambda name: self._phase(op, name),
        )
        return self._checkpoint_report(op, res)

    def _checkpoint_process(self, op: Operation, req: CheckpointRequest) -> dict:
        """A host process tree, as ``warmstart checkpoint --pid`` does it in-process."""
        from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
        from warmstart.store.compress import check_codec

        assert req.pid is not None
        store = self._store(req.store)
        if req.wait_ready:
            self._phase(op, "wait-ready")
            ctr.wait_for_ready(process_control_dir(req.pid), f"PID {req.pid}",
                               req.wait_ready_timeout_s, cancelled=lambda: op.cancel_requested)
        options = CheckpointOptions(
            leave_running=req.leave_running,
            dump=DumpOptions(tcp_established=req.tcp_established, tcp_close=req.tcp_close,
                             shell_job=req.shell_job, ext_unix_sk=req.ext_unix_sk,
                             ghost_limit=req.ghost_limit_mib << 20),
            gpu_lock_timeout_s=req.gpu_lock_timeout_s, durable=req.durable, labels=req.labels,
            compress=check_codec(req.compress), allow_bound_ip=req.allow_bound_ip,
        )
        res = checkpoint(req.pid, store=store, name=req.snapshot, options=options,
                         listener=lambda name: self._phase(op, name))
        return self._checkpoint_report(op, res)

    def _checkpoint_report(self, op: Operation, res: CheckpointResult) -> dict:
        m = res.manifest
        self.metrics.bytes.labels(op.type).inc(m.total_bytes)
        op.snapshot = m.name
        return {
            "snapshot": m.name, "snapshot_id": m.snapshot_id, "path": str(res.path),
            "size_bytes": m.total_bytes, "timings": {p.name.strip(): p.seconds for p in m.timings},
            "gpu_model": m.gpus[0].gpu_model if m.gpus else None,
            "driver_version": m.gpus[0].driver_version if m.gpus else None,
            "image": m.container.image if m.container else None,
            "processes": len(m.tree.processes),
            "gpus": [g.model_dump(mode="json") for g in m.gpus],
            **_phases(res.timer.phases, res.timer.total),
        }

    def _restore(self, op: Operation, req: RestoreRequest, container: Container) -> dict:
        store = self._store(req.store)
        res = ctr.restore_into_placeholder(req.snapshot, container, store=store, env=req.env,
                                           gpu_map=tuple(req.gpu_map),
                                           listener=lambda name: self._phase(op, name))
        return self._restore_report(op, res)

    def _restore_process(self, op: Operation, req: RestoreRequest) -> dict:
        """A host process tree, as ``warmstart restore`` does it in-process."""
        from warmstart.gms.preflight import prepare_restore
        from warmstart.snapshot.restore import RestoreRequest as Restore
        from warmstart.snapshot.restore import restore

        store = self._store(req.store)
        manifest = Manifest.load(store.path_of(req.snapshot))
        control = req.control_dir or manifest.labels.get("control_dir")
        prefetch = prepare_restore(manifest.labels)
        request = Restore(gpu_map=tuple(req.gpu_map), verify=req.verify,
                          control_dir=Path(control) if control else None, env=req.env,
                          parallel_pages=req.parallel_pages, page_threads=req.page_threads,
                          lazy=req.lazy, prefetch=req.prefetch)
        res = restore(req.snapshot, store=store, request=request,
                      listener=lambda name: self._phase(op, name))
        report = self._restore_report(op, res)
        report["gms_weights"] = prefetch.state if prefetch else None
        return report

    def _restore_report(self, op: Operation, res: RestoreResult) -> dict:
        m = res.manifest
        self.metrics.bytes.labels(op.type).inc(m.total_bytes)
        return {
            "snapshot": m.name, "snapshot_id": m.snapshot_id, "pid": res.pid,
            "size_bytes": m.total_bytes,
            "timings": {p.name.strip(): p.seconds for p in res.timer.phases},
            "gpu_model": m.gpus[0].gpu_model if m.gpus else None,
            "driver_version": m.gpus[0].driver_version if m.gpus else None,
            "log": str(res.log),
            **_phases(res.timer.phases, res.timer.total),
        }


def _phases(phases: list[PhaseTiming], total: float) -> dict:
    """The per-phase table (names as the timer has them, bytes included) and the total."""
    return {"phases": [p.model_dump(mode="json") for p in phases], "total_seconds": total}


def _busy_key(request: Request, container: Container | None) -> str:
    """What one operation at a time may touch: a container, a PID, a process snapshot."""
    if container is not None:
        return container.id
    if isinstance(request, CheckpointRequest):
        return f"pid:{request.pid}"
    return f"snapshot:{getattr(request, 'snapshot', '')}"


def _what(key: str) -> str:
    kind, sep, rest = key.partition(":")
    if sep and kind == "pid":
        return f"PID {rest}"
    if sep and kind == "snapshot":
        return f"process snapshot {rest!r}"
    return f"container {key!r}"


def process_control_dir(pid: int) -> Path | None:
    """``$SNAPSHOT_CONTROL_DIR`` of a host process, seen through its root."""
    inside = environ(pid).get(protocol.CONTROL_DIR_ENV)
    return Path(f"/proc/{pid}/root") / inside.lstrip("/") if inside else None
