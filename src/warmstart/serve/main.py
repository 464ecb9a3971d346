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
                            log_level=log_level, restored=was_restored)
        return ServeResult(outcome, identity)
    finally:
        engine.close()


def run_http(
    engine: Any,
    *,
    host: str,
    port: int,
    register_dir: str | os.PathLike[str] | None = None,
    registrar: Registrar | None = None,
    log_level: str = "info",
    restored: Callable[[], bool] = was_restored,
) -> Identity | None:
    """Phase 2: read the identity from the environment, listen, register; until stopped."""
    # ---- phase 2: identity, listener, registration ------------------------------------
    import uvicorn

    from warmstart.serve.app import create_app

    bind_host = os.environ.get("WARMSTART_HOST", host)
    identity = Identity.from_env(port=port)
    reg = registrar or (FileRegistrar(register_dir) if register_dir else NullRegistrar())
    app = create_app(engine, restored=restored)
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
