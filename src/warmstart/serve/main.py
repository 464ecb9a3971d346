"""Two-phase start of the reference worker.

Phase 1 builds the engine (load, preallocate KV, warm up, capture graphs) with
no socket open; then `warmstart.worker.checkpoint_point` (a no-op without
``SNAPSHOT_CONTROL_DIR``); phase 2 re-reads its identity from the environment
(a restore context may have changed it), opens the HTTP listener and registers.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from warmstart import protocol
from warmstart.errors import UsageError
from warmstart.worker import (
    FileRegistrar,
    Identity,
    NullRegistrar,
    Outcome,
    Registrar,
    apply_checkpoint_env,
    checkpoint_point,
    was_restored,
)

log = logging.getLogger("warmstart.serve")


@dataclass
class ServeResult:
    outcome: Outcome
    identity: Identity | None


def _seconds_since_process_start() -> float:
    """From /proc, to the clock tick: both figures count from boot."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    stat = Path("/proc/self/stat").read_text()
    start_ticks = int(stat.rsplit(")", 1)[1].split()[19])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def _gms_labels(engine: object) -> dict[str, str]:
    """What a snapshot of a worker with weights in the memory service expects from it."""
    weights = getattr(engine, "weights", None)
    if weights is None:
        return {}
    import json

    return {
        "gms.socket": weights.socket_path,
        "gms.layout_hash": weights.layout_hash or "",
        "gms.weights_bytes": str(weights.nbytes),
        "gms.files": json.dumps(weights.expected_files(), separators=(",", ":")),
    }


def serve(
    model_dir: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    kv_cache_gib: float | None = None,
    device: str = "auto",
    control_dir: str | os.PathLike[str] | None = None,
    *,
    kv_cache_fraction: float = 0.5,
    max_seq_len: int | None = None,
    max_num_seqs: int = 8,
    cuda_graphs: bool = True,
    served_name: str | None = None,
    register_dir: str | os.PathLike[str] | None = None,
    registrar: Registrar | None = None,
    checkpoint_timeout: float | None = None,
    continue_after_snapshot: bool | None = None,
    log_level: str = "info",
    weights_from_gms: str | None = None,
) -> ServeResult:
    """Run the worker until the server stops (SIGINT/SIGTERM). Raises WarmstartError on bad input."""
    if not 0 <= port <= 65535:
        raise UsageError(f"port {port} is out of range", hint="use 1-65535 (0 = any free port)")
    control = control_dir or os.environ.get(protocol.CONTROL_DIR_ENV)
    if control:
        apply_checkpoint_env()  # before anything initialises NCCL/Gloo
        if not Path(control).is_dir():
            raise UsageError(f"control dir {control} is not a directory", hint="create it first")

    # ---- phase 1: engine init, no sockets --------------------------------------------------
    from warmstart.serve.engine import Engine, EngineConfig

    imports_s = _seconds_since_process_start()  # interpreter start, imports, arguments

    engine = Engine(
        EngineConfig(
            model_dir=model_dir,
            device=device,
            kv_cache_gib=kv_cache_gib,
            kv_cache_fraction=kv_cache_fraction,
            max_seq_len=max_seq_len,
            max_num_seqs=max_num_seqs,
            cuda_graphs=cuda_graphs,
            served_name=served_name,
            weights_from_gms=weights_from_gms,
        )
    )
    try:
        t0 = time.perf_counter()
        engine.warmup()
        engine.startup["warmup_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        app = prepare_http(engine, restored=was_restored)
        engine.startup["http_prepare_s"] = time.perf_counter() - t0
        outcome = checkpoint_point(
            release=engine.release_kv,
            reacquire=engine.reacquire_kv,
            timeout=checkpoint_timeout,
            control_dir=control,
            continue_after_snapshot=continue_after_snapshot,
            labels={
                "engine": "warmstart.serve",
                "model": engine.model_name,
                "model_dir": str(engine.model_dir),
                "device": str(engine.device),
                "kv_cache_bytes": str(engine.store.nbytes),
                "kv_cache_address": hex(engine.store.address),
                "cuda_graphs": engine.graph_status,
                **_gms_labels(engine),
            },
        )

        engine.startup["imports_s"] = imports_s
        identity = run_http(engine, host=host, port=port, register_dir=register_dir, registrar=registrar,
                            log_level=log_level, restored=was_restored, app=app)
        return ServeResult(outcome, identity)
    finally:
        engine.close()


def prepare_http(engine: Any, *, restored: Callable[[], bool] = was_restored, warm: bool = True) -> Any:
    """End of phase 1: import the HTTP stack, build the app, and (``warm``) serve it one request in-process.

    Done before the checkpoint point, so that a restored worker listens at
    once instead of importing FastAPI, uvicorn's loop/protocol/lifespan
    modules and anyio's backend after the restore (1.3 s for the imports
    alone on a 2-core host). No socket is opened: the warm-up request goes
    through httpx's in-process ASGI transport, on an app that is then
    thrown away with its metrics; the engine forgets it too.
    """
    import uvicorn

    from warmstart.serve.app import create_app

    uvicorn.Config(create_app(engine), log_config=None).load()  # imports what server.run() will use
    if warm:
        _serve_one_request(create_app(engine))
        engine.forget_warmup()
    return create_app(engine, restored=restored)


def _serve_one_request(app: Any) -> None:
    import asyncio

    import httpx

    async def one() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://warm-up") as client:
            for call in (client.get("/ready"), client.post("/v1/completions", json={"prompt": "warm", "max_tokens": 1})):
                response = await call
                if response.status_code != 200:
                    log.warning("HTTP warm-up got %d: %s", response.status_code, response.text[:200])

    asyncio.run(one())


def run_http(
    engine: Any,
    *,
    host: str,
    port: int,
    register_dir: str | os.PathLike[str] | None = None,
    registrar: Registrar | None = None,
    log_level: str = "info",
    restored: Callable[[], bool] = was_restored,
    app: Any = None,
) -> Identity | None:
    """Phase 2: read the identity from the environment, listen, register; until stopped.

    ``app`` is the one :func:`prepare_http` built before the checkpoint point; without it, it is built here.
    """
    # ---- phase 2: identity, listener, registration ------------------------------------
    import uvicorn

    bind_host = os.environ.get("WARMSTART_HOST", host)
    identity = Identity.from_env(port=port)
    reg = registrar or (FileRegistrar(register_dir) if register_dir else NullRegistrar())
    if app is None:
        app = prepare_http(engine, restored=restored, warm=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host=bind_host, port=identity.port, log_level=log_level, access_log=False)
    )
    registered: list[Identity] = []

    def register_when_listening() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.02)
        if not server.started:
            return
        bound = identity.port
        for srv in getattr(server, "servers", []):
            for sock in srv.sockets:
                bound = sock.getsockname()[1]
        final = Identity(identity.name, identity.host, identity.ip, bound, identity.pid)
        reg.register(final)
        registered.append(final)
        log.info("serving %s on http://%s:%d (restored=%s)", engine.model_name, bind_host, bound, restored())

    watcher = threading.Thread(target=register_when_listening, name="warmstart-register", daemon=True)
    watcher.start()
    if threading.current_thread() is threading.main_thread():
        # uvicorn re-raises the signal that stopped it; handle SIGTERM so that the
        # re-raise returns here (deregister, exit 0) instead of killing the process.
        signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        server.should_exit = True
        watcher.join(timeout=5)
        for ident in registered:
            reg.deregister(ident)
    return registered[0] if registered else None
