"""``warmstart gms``: the per-GPU memory service that keeps weights out of snapshots."""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
from typing import Annotated, Optional

import typer
from rich.table import Table

from warmstart.cli.app import app
from warmstart.cli.commands import JsonOpt
from warmstart.cli.output import console, emit_json, human_bytes
from warmstart.errors import UsageError

gms_app = typer.Typer(help="GPU memory service: model weights outside the worker.", no_args_is_help=True)
app.add_typer(gms_app, name="gms")

SocketOpt = Annotated[
    Optional[str],
    typer.Option("--socket", help="Unix socket (default /run/warmstart/gms-<gpu>.sock).", show_default=False),
]
GpuOpt = Annotated[Optional[int], typer.Option("--gpu", help="CUDA device ordinal to serve.")]


def _socket(socket: str | None, gpu: int | None, memfd: bool = False) -> str:
    from warmstart.gms.server import default_socket

    if socket:
        return socket
    return default_socket("cpu" if memfd else (gpu if gpu is not None else 0))


@gms_app.command("serve")
def serve(
    gpu: GpuOpt = None,
    socket: SocketOpt = None,
    memfd: Annotated[
        bool, typer.Option("--memfd", help="Serve host memory (memfd) for CPU workers instead of a GPU.")
    ] = False,
    lanes: Annotated[
        Optional[int], typer.Option("--lanes", help="Parallel read/copy lanes (default: CPUs, 2-8).")
    ] = None,
    copy_streams: Annotated[
        int,
        typer.Option("--copy-streams", help="Copy streams shared by the lanes (0: one per lane)."),
    ] = 0,
    host_cache_gib: Annotated[
        Optional[float],
        typer.Option(
            "--host-cache-gib",
            help="Most host memory (GiB) that entries parked by `gms evict --keep-host` may hold; "
            "the least recently used are dropped to make room (default: no limit).",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the memory service for one GPU until SIGINT/SIGTERM."""
    from warmstart.gms.backend import MemfdServer, ServerBackend
    from warmstart.gms.server import GmsServer

    if memfd == (gpu is not None):
        raise UsageError("give exactly one of --gpu N and --memfd", hint="e.g. warmstart gms serve --gpu 0")
    if gpu is not None and gpu < 0:
        raise UsageError(f"--gpu {gpu} is not a device ordinal")
    if lanes is not None and not 1 <= lanes <= 64:
        raise UsageError(f"--lanes {lanes} is out of range", hint="use 1-64")
    if not 0 <= copy_streams <= 64:
        raise UsageError(f"--copy-streams {copy_streams} is out of range", hint="use 0 (one per lane) to 64")
    if host_cache_gib is not None and not (math.isfinite(host_cache_gib) and host_cache_gib >= 0):
        raise UsageError(f"--host-cache-gib {host_cache_gib:g} is out of range",
                         hint="use a size in GiB >= 0 (0: park nothing)")  # fmt: skip
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    backend: ServerBackend
    if memfd:
        backend = MemfdServer()
    else:
        from warmstart.gms.cuda import CudaServer

        backend = CudaServer(gpu or 0, copy_streams=copy_streams)
    host_cache = None if host_cache_gib is None else int(host_cache_gib * (1 << 30))
    server = GmsServer(_socket(socket, gpu, memfd), backend, lanes=lanes, host_cache_bytes=host_cache)
    server.bind()
    stop = threading.Event()

    def on_signal(*_: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=server.serve_forever, name="gms-accept", daemon=True).start()
    console.print(f"GPU memory service ({backend.kind}) on {server.socket_path}", highlight=False)
    stop.wait()
    server.close()


@gms_app.command("status")
def status(gpu: GpuOpt = None, socket: SocketOpt = None, json_out: JsonOpt = False) -> None:
    """What the service holds: entries, sizes, fill rate, attached workers, parked bytes."""
    from warmstart.gms.client import status as get_status

    reply = get_status(_socket(socket, gpu))
    if json_out:
        emit_json(reply)
        return
    console.print(f"service pid {reply.pid}, {reply.backend} device {reply.device}, {reply.socket}")
    table = Table(title_justify="left")
    for col in ("entry", "model", "files", "size", "state", "host", "readers", "fill GB/s", "layout hash"):
        table.add_column(col)
    for e in reply.entries:
        table.add_row(
            e.entry_id, e.model_dir or "(client-filled)", str(e.files), human_bytes(e.bytes), e.state,
            human_bytes(e.host_bytes) if e.host_bytes else "", str(e.readers) + (" +writer" if e.writer else ""),
            f"{e.fill_gb_per_s:.2f}" if e.fill_gb_per_s else "", (e.layout_hash or "")[:19],
        )  # fmt: skip
    console.print(table)


@gms_app.command("evict")
def evict(
    entry: Annotated[Optional[str], typer.Argument(help="Entry id (default: every idle entry).")] = None,
    gpu: GpuOpt = None,
    socket: SocketOpt = None,
    keep_host: Annotated[
        bool,
        typer.Option(
            "--keep-host",
            help="Keep the bytes in the service's pinned host memory, to be copied back at "
            "host-to-device speed when a worker (or a restore) attaches again.",
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Release weights no worker has mapped (or, with --keep-host, park them in host memory)."""
    from warmstart.gms.client import evict as do_evict
    from warmstart.gms.client import status as get_status

    path = _socket(socket, gpu)
    # parking copies the bytes out of device memory (and pins that much host memory) before the answer
    gone = do_evict(path, entry, timeout=600.0 if keep_host else 10.0, keep_host=keep_host)
    parked = []
    if keep_host and gone:
        parked = [e.entry_id for e in get_status(path).entries if e.entry_id in gone and e.state == "parked"]
    if json_out:
        emit_json({"evicted": gone, "parked": parked} if keep_host else {"evicted": gone})
    elif not gone:
        console.print("nothing to evict (entries in use stay)")
    elif keep_host:
        released = [g for g in gone if g not in parked]
        console.print("; ".join(([f"parked {', '.join(parked)} in host memory"] if parked else [])
                                + ([f"released {', '.join(released)}"] if released else [])))  # fmt: skip
    else:
        console.print(f"evicted {', '.join(gone)}")
