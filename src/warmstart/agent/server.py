"""The agent's HTTP/JSON API (FastAPI), served by uvicorn on a unix socket.

Routes (all JSON; errors are ``{"error": "<one line>", "hint": "..."}``):

* ``GET  /v1/node`` — node facts (arch, kernel, gpu_model, driver_version, gpu_count)
* ``GET  /v1/containers/{id}`` — what the agent finds about a container (``?runtime=&runc_root=``)
* ``POST /v1/operations`` — start a checkpoint / restore / cold-start -> 202 + the operation
* ``GET  /v1/operations`` — all operations; ``GET /v1/operations/{id}`` — one
* ``POST /v1/operations/{id}/cancel`` — request cancellation
* ``GET  /v1/snapshots`` — the store's snapshots (``?store=``); ``GET /v1/snapshots/{name}`` — a manifest
* ``GET  /healthz``
"""

from __future__ import annotations

import os
import platform
import socket as socket_
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import Field, TypeAdapter

from warmstart.agent.models import Request as OpRequest
from warmstart.agent.operations import Conflict, OperationManager, Settings
from warmstart.errors import Incompatible, NotFoundError, UsageError, WarmstartError, kind_of
from warmstart.runtime.discovery import runtime_for

_REQUEST = TypeAdapter(Annotated[OpRequest, Field(discriminator="type")])


def _status(exc: WarmstartError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, (Conflict, Incompatible)):
        return 409
    if isinstance(exc, UsageError):
        return 400
    return 500


def node_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"arch": platform.machine(), "kernel": platform.release(),
                             "gpu_model": "none", "driver_version": "none", "gpu_count": 0}
    try:
        from warmstart.gpu.devices import get_inventory

        inv = get_inventory()
        facts.update(gpu_count=len(inv.devices), driver_version=inv.driver_version or "none",
                     gpu_model=inv.devices[0].name if inv.devices else "none")
    except Exception:  # noqa: BLE001 - no GPU / no driver: the facts say so
        pass
    return facts


def create_app(manager: OperationManager) -> FastAPI:
    app = FastAPI(title="warmstart agent", version="1")

    @app.exception_handler(WarmstartError)
    async def _warmstart_error(_req: Request, exc: WarmstartError) -> JSONResponse:
        return JSONResponse({"error": exc.message, "hint": exc.hint, "error_type": kind_of(exc)},
                            status_code=_status(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse({"error": f"invalid request: {loc}: {first.get('msg')}",
                             "hint": "see docs/agent.md for the request fields"}, status_code=400)

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"ok": True, "pid": os.getpid()}

    @app.get("/v1/node")
    def node() -> dict[str, Any]:
        return node_facts()

    @app.get("/v1/containers/{container_id}")
    def container(container_id: str, runtime: str | None = None,
                  runc_root: str | None = None) -> dict[str, Any]:
        rt = runtime_for(runtime or manager.settings.runtime,
                         runc_root=runc_root or manager.settings.runc_root)
        return rt.get(container_id.split("://", 1)[-1]).describe()

    @app.get("/v1/snapshots")
    def snapshots(store: str | None = None) -> dict[str, Any]:
        s = manager.store(store)
        return {"store": str(s.root), "snapshots": [
            {"name": e.name, "error": e.error,
             "manifest": e.manifest.model_dump(mode="json") if e.manifest else None}
            for e in s.entries()]}

    @app.get("/v1/snapshots/{name}")
    def snapshot(name: str, store: str | None = None) -> dict[str, Any]:
        return manager.store(store).manifest(name).model_dump(mode="json")

    @app.post("/v1/operations", status_code=202)
    def submit(body: Annotated[dict[str, Any], Body()]) -> JSONResponse:
        try:
            request = _REQUEST.validate_python(body)
        except ValueError as exc:
            errors = getattr(exc, "errors", lambda: [])()
            first = errors[0] if errors else {"loc": (), "msg": str(exc)}
            loc = ".".join(str(p) for p in first.get("loc", ()))
            raise UsageError(f"invalid request: {loc}: {first.get('msg')}",
                             hint="type is checkpoint, restore or cold-start; see docs/agent.md")
        op = manager.submit(request)
        return JSONResponse(op.model_dump(mode="json"), status_code=202)

    @app.get("/v1/operations")
    def list_ops() -> list[dict[str, Any]]:
        return [o.model_dump(mode="json", exclude={"logs"}) for o in manager.list()]

    @app.get("/v1/operations/{op_id}")
    def get_op(op_id: str) -> dict[str, Any]:
        return manager.get(op_id).model_dump(mode="json")

    @app.post("/v1/operations/{op_id}/cancel", status_code=202)
    def cancel(op_id: str) -> dict[str, Any]:
        return manager.cancel(op_id).model_dump(mode="json")

    return app


def serve(settings: Settings, *, socket: Path, metrics_port: int | None = 9464,
          metrics_addr: str = "0.0.0.0") -> None:
    """Run the agent until SIGTERM/SIGINT."""
    import logging

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    manager = OperationManager(settings)
    for op in manager.recover():
        logging.getLogger("warmstart.agent").warning(
            "operation %s (%s) was interrupted by an agent restart: %s", op.id, op.type, op.state.value)
    if metrics_port is not None:
        port = manager.metrics.serve(metrics_port, metrics_addr)
        logging.getLogger("warmstart.agent").info("metrics on %s:%d", metrics_addr, port)
    listener = _listen(Path(socket))
    config = uvicorn.Config(create_app(manager), fd=listener.fileno(), log_level="warning",
                            timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run()
    finally:
        manager.shutdown()
        Path(socket).unlink(missing_ok=True)
        listener.close()


def _listen(path: Path) -> socket_.socket:
    """The API socket, owner-only (0600; uvicorn's own would be 0666), listening."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    sock = socket_.socket(socket_.AF_UNIX, socket_.SOCK_STREAM)
    sock.bind(str(path))  # the umask (022) already keeps others from connecting
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock
