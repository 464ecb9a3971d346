"""Snapshot commands: checkpoint, restore, ls, inspect, rm, doctor."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from warmstart.cli import via_agent
from warmstart.cli.app import app
from warmstart.cli.output import console, emit_json, human_bytes, progress, timing_table
from warmstart.cli.via_agent import AgentOpt, RuncRootOpt, RuntimeOpt
from warmstart.errors import UsageError
from warmstart.host.bandwidth import Bandwidth
from warmstart.host.criu import DumpOptions
from warmstart.store.local import STORE_ENV, LocalStore, default_root

StoreOpt = Annotated[
    Optional[Path],
    typer.Option("--store", envvar=STORE_ENV, help="Snapshot store directory.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
# checkpoint --store also takes a remote store URL (checkpoint locally, then push; cli/remote.py)
StoreOrUrlOpt = Annotated[
    Optional[str],
    typer.Option(
        "--store", envvar=STORE_ENV, show_default=False,
        help="Snapshot store directory, or a store URL (file:///PATH, s3://BUCKET/PREFIX) to push to.",
    ),
]


def open_store(path: Path | None) -> LocalStore:
    return LocalStore(path or default_root())


def parse_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {item!r} is not KEY=VALUE", hint="write it as --env KEY=VALUE")
        env[key] = value
    return env


def check_durability(durability: str | None, no_fsync: bool) -> str:
    from warmstart.snapshot.manifest import DURABILITY_MODES

    if durability is not None and durability not in DURABILITY_MODES:
        raise UsageError(
            f"unknown durability {durability!r}", hint="use --durability fsync or --durability none"
        )
    if no_fsync and durability == "fsync":
        raise UsageError("--no-fsync contradicts --durability fsync", hint="pass only one of them")
    return "none" if no_fsync else durability or "fsync"


@app.command()
def checkpoint(
    pid: Annotated[
        int | None, typer.Option("--pid", help="Root of the process tree to snapshot.")
    ] = None,
    container: Annotated[
        str | None, typer.Option("--container", help="With --agent: a container id to snapshot.")
    ] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Snapshot name.")] = None,
    leave_running: Annotated[
        bool, typer.Option("--leave-running", help="Keep the original tree running.")
    ] = False,
    tcp_established: Annotated[
        bool, typer.Option("--tcp-established", help="Checkpoint established TCP connections.")
    ] = False,
    tcp_close: Annotated[
        bool, typer.Option("--tcp-close", help="Close established TCP connections on restore.")
    ] = False,
    shell_job: Annotated[
        bool, typer.Option("--shell-job", help="The tree is attached to a terminal.")
    ] = False,
    ext_unix_sk: Annotated[
        bool, typer.Option("--ext-unix-sk", help="Allow unix sockets to peers outside the tree.")
    ] = False,
    ghost_limit_mib: Annotated[
        int, typer.Option("--ghost-limit", help="Largest deleted-but-open file to copy, in MiB.")
    ] = 256,
    gpu_lock_timeout: Annotated[
        float, typer.Option("--gpu-lock-timeout", help="Seconds to wait for GPU work to drain.")
    ] = 30.0,
    durability: Annotated[
        str | None,
        typer.Option(
            "--durability",
            help="fsync (default): the snapshot is on disk before it is published. "
            "none: published atomically without fsync (faster; a power loss can lose it).",
            show_default=False,
        ),
    ] = None,
    no_fsync: Annotated[
        bool, typer.Option("--no-fsync", help="Same as --durability none.", hidden=True)
    ] = False,
    label: Annotated[
        list[str], typer.Option("--label", help="KEY=VALUE recorded in the manifest.")
    ] = [],  # noqa: B006
    sign: Annotated[
        Optional[Path], typer.Option("--sign", help="With --store URL: sign the pushed index with this key.")
    ] = None,
    compress: Annotated[
        str,
        typer.Option(
            "--compress",
            help="Page images: none (default: fastest for a local store), zstd or lz4 "
            "(smaller: pays off for remote stores; docs/restore-speed.md).",
        ),
    ] = "none",
    wait_ready: Annotated[
        bool, typer.Option("--wait-ready", help="First wait for the worker's ready-for-snapshot.")
    ] = False,
    allow_bound_ip: Annotated[
        bool,
        typer.Option("--allow-bound-ip", help="Checkpoint sockets bound to a specific non-loopback "
                     "address (the pod IP) anyway; see docs/agent.md."),
    ] = False,
    store: StoreOrUrlOpt = None,
    agent: AgentOpt = None,
    runtime: RuntimeOpt = None,
    runc_root: RuncRootOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Snapshot the process tree rooted at PID (or, with --agent, a container) into the store."""
    from warmstart.cli.remote import check_push_target, do_push, is_url, push_report, working_store
    from warmstart.snapshot.checkpoint import CheckpointOptions
    from warmstart.snapshot.checkpoint import checkpoint as do_checkpoint
    from warmstart.store.compress import check_codec

    if (pid is None) == (container is None):
        raise UsageError("give one of --pid and --container",
                         hint="--pid PID for a process tree, --container ID (with --agent) for a container")
    mode = check_durability(durability, no_fsync)
    socket = via_agent.agent_socket(agent)
    if socket is not None:
        if sign is not None:
            raise UsageError("--sign does not go with --agent",
                             hint="checkpoint through the agent, then `warmstart push --sign`")
        body = {
            "type": "checkpoint", "container_id": container, "pid": pid, "snapshot": name,
            "store": via_agent.agent_store(store), "wait_ready": wait_ready,
            "leave_running": leave_running, "labels": parse_pairs(label),
            "allow_bound_ip": allow_bound_ip, "runtime": runtime, "runc_root": runc_root,
        }
        if pid is not None:
            body.update(tcp_established=tcp_established, tcp_close=tcp_close, shell_job=shell_job,
                        ext_unix_sk=ext_unix_sk, ghost_limit_mib=ghost_limit_mib,
                        gpu_lock_timeout_s=gpu_lock_timeout, durable=mode == "fsync",
                        compress=check_codec(compress) or "none")
        via_agent.checkpoint(socket, body, json_out=json_out)
        return
    if container is not None:
        raise UsageError("--container needs the node agent", hint="add --agent [SOCKET]")
    assert pid is not None
    check_push_target(store, sign)  # --store URL: checkpoint locally, then push (below)
    if wait_ready:
        from warmstart.agent.operations import process_control_dir
        from warmstart.runtime.container import wait_for_ready

        wait_for_ready(process_control_dir(pid), f"PID {pid}", 600.0)

    options = CheckpointOptions(
        leave_running=leave_running,
        dump=DumpOptions(
            tcp_established=tcp_established,
            tcp_close=tcp_close,
            shell_job=shell_job,
            ext_unix_sk=ext_unix_sk,
            ghost_limit=ghost_limit_mib << 20,
        ),
        gpu_lock_timeout_s=gpu_lock_timeout,
        durable=mode == "fsync",
        labels=parse_pairs(label),
        compress=check_codec(compress),
        allow_bound_ip=allow_bound_ip,
    )
    with progress(not json_out, f"checkpointing PID {pid}") as on_phase:
        local = working_store(store)
        result = do_checkpoint(pid, store=local, name=name, options=options, listener=on_phase)
    m = result.manifest
    pushed = do_push(local, m.name, store, sign=sign, show=not json_out) if is_url(store) else None
    if json_out:
        emit_json(
            {
                "name": m.name,
                "snapshot_id": m.snapshot_id,
                "path": str(result.path),
                "bytes": m.total_bytes,
                "durability": m.durability,
                "sparse_bytes": m.sparse_bytes,
                "gpus": m.gpus,
                "timings": result.timer.phases,
                "total_seconds": result.timer.total,
                **({"pushed": push_report(pushed)} if pushed else {}),
            }
        )
        return
    console.print(timing_table(f"checkpoint {m.name}", result.timer.phases, result.timer.total))
    console.print(
        f"snapshot [bold]{m.name}[/] ({human_bytes(m.total_bytes)}, "
        f"{len(m.tree.processes)} processes, {len(m.gpus)} GPU) at {result.path}"
    )
    if pushed:
        console.print(f"pushed to {pushed.url} ({human_bytes(pushed.uploaded_bytes)} sent)")


@app.command()
def restore(
    name: Annotated[str, typer.Argument(help="Snapshot name, or STORE_URL/NAME to pull it first.")],
    gpu_map: Annotated[
        list[str], typer.Option("--gpu-map", help="SRC=DST GPU (index or UUID), repeatable.")
    ] = [],  # noqa: B006
    control_dir: Annotated[
        Optional[Path],
        typer.Option("--control-dir", help="Worker control dir for the restore hand-over."),
    ] = None,
    env: Annotated[
        list[str], typer.Option("--env", help="KEY=VALUE handed to the restored worker.")
    ] = [],  # noqa: B006
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip checksum verification.")
    ] = False,
    detach: Annotated[
        bool, typer.Option("--detach/--wait", help="Return once restored (default) or wait for exit.")
    ] = True,
    parallel_pages: Annotated[
        Optional[bool],
        typer.Option(
            "--parallel-pages/--no-parallel-pages",
            help="Fill memory with warmstart's parallel page server (default: on where userfaultfd is allowed).",
        ),
    ] = None,
    lazy: Annotated[
        bool,
        typer.Option(
            "--lazy",
            help="Let the tree run and restore its GPU state while pages are still filled (faults served on demand); the worker is handed over once the fill and checksums are done.",
        ),
    ] = False,
    prefetch: Annotated[
        bool,
        typer.Option(
            "--prefetch/--no-prefetch",
            help="Read the worker's recorded library pages back into the page cache while its GPU state is restored (off: slower cold on the GPU worker, docs/benchmarks.md).",
        ),
    ] = False,
    page_threads: Annotated[
        Optional[int], typer.Option("--page-threads", min=1, max=256, help="Page-server threads.")
    ] = None,
    trace_pages: Annotated[
        Optional[Path],
        typer.Option(
            "--trace-pages",
            help="Write the page server's trace (every filled chunk and served fault, with times) "
            "to this JSON file; `python bench/fill_trace.py FILE` summarizes it.",
        ),
    ] = None,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream/--no-stream",
            help="restore URL: start restoring while the page images download (default, where "
            "the page server applies); --no-stream pulls everything first.",
        ),
    ] = True,
    into: Annotated[
        str | None,
        typer.Option("--into", help="With --agent: the placeholder container to restore into."),
    ] = None,
    store: StoreOpt = None,
    agent: AgentOpt = None,
    runtime: RuntimeOpt = None,
    runc_root: RuncRootOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Restore a snapshot; the tree continues where it stopped."""
    from warmstart.gms.preflight import prepare_restore
    from warmstart.snapshot.restore import RestoreRequest
    from warmstart.snapshot.restore import restore as do_restore

    socket = via_agent.agent_socket(agent)
    if socket is None and into is not None:
        raise UsageError("--into needs the node agent", hint="add --agent [SOCKET]")
    if trace_pages is not None and not trace_pages.absolute().parent.is_dir():
        raise UsageError(f"--trace-pages: no directory {trace_pages.absolute().parent}",
                         hint="pass a file in an existing directory")
    if socket is not None:
        if trace_pages is not None:
            raise UsageError("--trace-pages traces a restore run here, not by the node agent",
                             hint="drop --agent, or set WARMSTART_PAGES_TRACE in the agent's environment")
        if "://" in name:
            raise UsageError("--agent restores from a local store",
                             hint="pull the snapshot first (`warmstart pull`), then restore it by name")
        body = {"type": "restore", "container_id": into, "snapshot": name,
                "store": via_agent.agent_store(store), "env": parse_pairs(env),
                "gpu_map": list(gpu_map), "runtime": runtime, "runc_root": runc_root}
        if into is None:
            body.update(control_dir=str(control_dir.absolute()) if control_dir else None,
                        verify=not no_verify, parallel_pages=parallel_pages, page_threads=page_threads,
                        lazy=lazy, prefetch=prefetch)
        pid = via_agent.restore(socket, body, json_out=json_out)
        if not detach:
            _wait_exit(pid)
        return
    weights = None

    def request_for(manifest: Any) -> RestoreRequest:
        nonlocal weights
        control = control_dir or (
            Path(manifest.labels["control_dir"]) if "control_dir" in manifest.labels else None
        )
        # weights in the memory service: refuse or start streaming
        weights = prepare_restore(manifest.labels)
        return RestoreRequest(
            gpu_map=tuple(gpu_map),
            verify=not no_verify,
            control_dir=control,
            env=parse_pairs(env),
            parallel_pages=parallel_pages,
            page_threads=page_threads,
            lazy=lazy,
            prefetch=prefetch,
            pages_trace=trace_pages.absolute() if trace_pages else None,
        )

    s = open_store(store)
    streamed = None
    if "://" in name and stream:  # restore URL while it downloads (trust check first)
        from warmstart.cli.remote import stream_for_restore

        with progress(not json_out, f"restoring {name}") as on_phase:
            streamed = stream_for_restore(name, s, request_for, listener=on_phase)
    if streamed is not None:
        name, result = streamed.name, streamed.result
    else:
        # restore URL --no-stream: trust check, pull into the local store, then restore that
        if "://" in name:
            from warmstart.cli.remote import pull_for_restore

            name = pull_for_restore(name, s, show=not json_out)
        request = request_for(s.manifest(name))
        with progress(not json_out, f"restoring {name}") as on_phase:
            result = do_restore(name, store=s, request=request, listener=on_phase)
    if json_out:
        emit_json(
            {
                "name": name,
                "pid": result.pid,
                "timings": result.timer.phases,
                "total_seconds": result.timer.total,
                "log": str(result.log),
                "gms_weights": weights.state if weights else None,
                "stream": streamed.report() if streamed else None,
            }
        )
    else:
        bw = Bandwidth.load()
        ceilings = bw.ceilings() if bw else None
        console.print(timing_table(f"restore {name}", result.timer.phases, result.timer.total, ceilings))
        console.print(f"restored [bold]{name}[/] as PID {result.pid}")
        if streamed is not None:
            from warmstart.cli.remote import stream_line

            console.print(stream_line(streamed.report()))
        if weights is not None:
            console.print(f"weights from the memory service: {weights.state}")
    if not detach:
        _wait_exit(result.pid)


def _wait_exit(pid: int) -> None:
    import psutil

    try:
        psutil.Process(pid).wait()
    except psutil.NoSuchProcess:
        pass


@app.command("ls")
def list_snapshots(store: StoreOpt = None, agent: AgentOpt = None, json_out: JsonOpt = False) -> None:
    """List the snapshots in the store."""
    socket = via_agent.agent_socket(agent)
    if socket is not None:
        root, entries = via_agent.list_snapshots(socket, str(store) if store else None)
    else:
        s = open_store(store)
        root, entries = str(s.root), s.entries()
    if json_out:
        emit_json(
            [
                {
                    "name": e.name,
                    "snapshot_id": e.manifest.snapshot_id if e.manifest else None,
                    "created_at": e.manifest.created_at if e.manifest else None,
                    "bytes": e.manifest.total_bytes if e.manifest else None,
                    "gpus": len(e.manifest.gpus) if e.manifest else None,
                    "error": e.error,
                }
                for e in entries
            ]
        )
        return
    table = Table(title=f"snapshots in {root}", title_justify="left")
    for col in ("name", "created", "size", "processes", "GPUs", "root command"):
        table.add_column(col)
    for e in entries:
        m = e.manifest
        if m is None:
            table.add_row(e.name, "", "", "", "", f"[red]{e.error}[/]")
            continue
        table.add_row(
            e.name,
            m.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            human_bytes(m.total_bytes),
            str(len(m.tree.processes)),
            str(len(m.gpus)),
            " ".join(m.tree.cmdline)[:60],
        )
    console.print(table)


@app.command()
def inspect(
    name: Annotated[str, typer.Argument(help="Snapshot name.")],
    store: StoreOpt = None,
    agent: AgentOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show a snapshot's manifest."""
    socket = via_agent.agent_socket(agent)
    if socket is not None:
        m = via_agent.manifest(socket, name, str(store) if store else None)
    else:
        m = open_store(store).manifest(name)
    if json_out:
        emit_json(m)
        return
    console.print(f"[bold]{m.name}[/]  id {m.snapshot_id}  format v{m.format_version}")
    console.print(
        f"taken {m.created_at:%Y-%m-%d %H:%M:%S} UTC on {m.source.hostname} "
        f"({m.source.arch}, kernel {m.source.kernel}, CRIU {m.source.criu_version})"
    )
    console.print(f"CPU {m.source.cpu_model}; {human_bytes(m.total_bytes)} in {len(m.files)} files")
    if m.sparse_bytes:
        console.print(f"{human_bytes(m.sparse_bytes)} of it zero pages, kept as holes (no disk, no reads)")
    if m.durability == "none":
        console.print("durability none: published without fsync (a power loss since could have damaged it)")
    procs = Table(title="processes", title_justify="left")
    for col in ("pid", "ppid", "name", "threads", "rss"):
        procs.add_column(col)
    for p in m.tree.processes:
        procs.add_row(str(p.pid), str(p.ppid), p.name, str(p.threads), human_bytes(p.rss_bytes))
    console.print(procs)
    if m.gpus:
        gpus = Table(title="GPU state", title_justify="left")
        for col in ("pid", "GPU", "UUID", "driver", "device memory"):
            gpus.add_column(col)
        for g in m.gpus:
            gpus.add_row(
                str(g.pid), g.gpu_model, g.gpu_uuid, g.driver_version, human_bytes(g.device_memory_bytes)
            )
        console.print(gpus)
    total = sum(p.seconds for p in m.timings if not p.name.startswith(" "))
    console.print(timing_table("checkpoint timings", m.timings, total))


@app.command("rm")
def remove(
    names: Annotated[list[str], typer.Argument(help="Snapshot names.")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove snapshots from the store."""
    s = open_store(store)
    for name in names:
        s.path_of(name)
    for name in names:
        s.remove(name)
    if json_out:
        emit_json({"removed": names})
    else:
        console.print(f"removed {', '.join(names)}")
