"""``warmstart agent`` (the node daemon), ``warmstart agent-ctl`` (its client), ``warmstart placeholder``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from warmstart.cli.app import app
from warmstart.cli.commands import JsonOpt, parse_pairs
from warmstart.cli.output import console, emit_json

ctl = typer.Typer(help="Drive a running `warmstart agent` over its unix socket.",
                  no_args_is_help=True)
app.add_typer(ctl, name="agent-ctl")

SocketOpt = Annotated[Path, typer.Option("--socket", envvar="WARMSTART_AGENT_SOCKET",
                                         help="The agent's unix socket.")]
_SOCKET = Path("/run/warmstart/agent.sock")
RuntimeOpt = Annotated[Optional[str], typer.Option("--runtime", help="runc, containerd, crio or auto.")]
RuncRootOpt = Annotated[Optional[str], typer.Option("--runc-root", help="runc --root of the container.")]
WaitOpt = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the operation to end.")]


@app.command()
def agent(
    socket: SocketOpt = _SOCKET,
    state_dir: Annotated[Path, typer.Option(help="Where operations are persisted.")] = Path(
        "/var/lib/warmstart/agent"),
    store: Annotated[str, typer.Option(envvar="WARMSTART_STORE",
                                       help="Default snapshot store (directory or file:// URL).")
                     ] = "/var/lib/warmstart/snapshots",
    runtime: Annotated[str, typer.Option(help="Default runtime: runc, containerd, crio or auto "
                                         "(the runtime whose socket is present).")] = "containerd",
    runc_root: Annotated[Optional[str], typer.Option(help="Default runc --root.")] = None,
    metrics_port: Annotated[int, typer.Option(envvar="WARMSTART_DAEMON_METRICS_PORT",
                                              help="Prometheus port (0: off).")] = 9465,
    metrics_addr: Annotated[str, typer.Option(help="Prometheus address.")] = "0.0.0.0",
    workers: Annotated[int, typer.Option(envvar="WARMSTART_MAX_PARALLEL_RESTORES",
                                         help="Operations run at once.")] = 8,
) -> None:
    """Run the node agent: checkpoint and restore containers on request (see docs/agent.md)."""
    from warmstart.agent.operations import Settings, store_path
    from warmstart.agent.server import serve

    settings = Settings(state_dir=state_dir, store=store_path(store), runtime=runtime,
                        runc_root=runc_root, workers=workers)
    serve(settings, socket=socket, metrics_port=metrics_port or None,
          metrics_addr=metrics_addr)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def placeholder(ctx: typer.Context) -> None:
    """Wait as a container's init for the agent: restore into me, or `-- CMD` on cold start."""
    from warmstart.runtime.placeholder import main as placeholder_main

    raise typer.Exit(placeholder_main(list(ctx.args)))


def _client(socket: Path):
    from warmstart.agent.client import AgentClient

    return AgentClient(socket)


def _show(op: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(op)
        return
    target = op.get("container_id") or (f"pid:{op['pid']}" if op.get("pid") else "process")
    line = f"{op['id']}  {op['type']}  {target}  {op['state']}"
    if op.get("phase"):
        line += f"  ({op['phase']})"
    console.print(line)
    if op.get("error"):
        console.print(f"  error: {op['error']}" + (f" — {op['hint']}" if op.get("hint") else ""))
    for k, v in (op.get("result") or {}).items():
        if k != "timings":
            console.print(f"  {k}: {v}")


def _finish(socket: Path, op: dict[str, Any], wait: bool, json_out: bool) -> None:
    if wait:
        with _client(socket) as c:
            op = c.follow(op["id"])  # Ctrl-C cancels the operation
    _show(op, json_out)
    if op["state"] == "failed":
        raise typer.Exit(1)


@ctl.command("node")
def ctl_node(socket: SocketOpt = _SOCKET, json_out: JsonOpt = False) -> None:
    """Facts of this node (arch, kernel, GPU model, driver)."""
    with _client(socket) as c:
        facts = c.node()
    if json_out:
        emit_json(facts)
    else:
        for k, v in facts.items():
            console.print(f"{k}: {v}")


@ctl.command("inspect")
def ctl_inspect(container_id: str, socket: SocketOpt = _SOCKET, runtime: RuntimeOpt = None,
                runc_root: RuncRootOpt = None, json_out: JsonOpt = False) -> None:
    """What the agent finds about a container (PID, rootfs, namespaces, cgroups)."""
    with _client(socket) as c:
        doc = c.container(container_id, runtime=runtime or "", runc_root=runc_root or "")
    if json_out:
        emit_json(doc)
    else:
        for k, v in doc.items():
            console.print(f"{k}: {v}")


@ctl.command("checkpoint")
def ctl_checkpoint(
    container_id: str,
    snapshot: Annotated[Optional[str], typer.Option("--name", help="Snapshot name.")] = None,
    store: Annotated[Optional[str], typer.Option(help="Store directory (agent default).")] = None,
    wait_ready: Annotated[bool, typer.Option(help="Wait for ready-for-snapshot first.")] = False,
    leave_running: Annotated[bool, typer.Option(help="Keep the container running.")] = False,
    base_rootfs: Annotated[Optional[str], typer.Option(help="Image rootfs (plain-dir rootfs).")] = None,
    label: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE label.")] = None,
    allow_bound_ip: Annotated[bool, typer.Option(
        help="Checkpoint sockets bound to a specific non-loopback address anyway.")] = False,
    socket: SocketOpt = _SOCKET, runtime: RuntimeOpt = None, runc_root: RuncRootOpt = None,
    wait: WaitOpt = True, json_out: JsonOpt = False,
) -> None:
    """Checkpoint a container (its processes, GPU state and filesystem changes)."""
    body = {"type": "checkpoint", "container_id": container_id, "snapshot": snapshot,
            "store": store, "wait_ready": wait_ready, "leave_running": leave_running,
            "base_rootfs": base_rootfs, "labels": parse_pairs(label or []),
            "allow_bound_ip": allow_bound_ip, "runtime": runtime, "runc_root": runc_root}
    with _client(socket) as c:
        op = c.submit(body)
    _finish(socket, op, wait, json_out)


@ctl.command("restore")
def ctl_restore(
    container_id: Annotated[str, typer.Argument(help="The placeholder container.")],
    snapshot: Annotated[str, typer.Argument(help="Snapshot name.")],
    store: Annotated[Optional[str], typer.Option(help="Store directory (agent default).")] = None,
    socket: SocketOpt = _SOCKET, runtime: RuntimeOpt = None, runc_root: RuncRootOpt = None,
    wait: WaitOpt = True, json_out: JsonOpt = False,
) -> None:
    """Restore a container snapshot into a waiting placeholder container."""
    body = {"type": "restore", "container_id": container_id, "snapshot": snapshot,
            "store": store, "runtime": runtime, "runc_root": runc_root}
    with _client(socket) as c:
        op = c.submit(body)
    _finish(socket, op, wait, json_out)


@ctl.command("cold-start")
def ctl_cold_start(container_id: str, reason: Annotated[str, typer.Option()] = "cold start requested",
                   socket: SocketOpt = _SOCKET, runtime: RuntimeOpt = None,
                   runc_root: RuncRootOpt = None, json_out: JsonOpt = False) -> None:
    """Tell a placeholder to run its original command."""
    body = {"type": "cold-start", "container_id": container_id, "reason": reason,
            "runtime": runtime, "runc_root": runc_root}
    with _client(socket) as c:
        op = c.submit(body)
    _show(op, json_out)


@ctl.command("get")
def ctl_get(op_id: str, socket: SocketOpt = _SOCKET, logs: Annotated[bool, typer.Option()] = False,
            json_out: JsonOpt = False) -> None:
    """Show one operation."""
    with _client(socket) as c:
        op = c.operation(op_id)
    _show(op, json_out)
    if logs and not json_out:
        for line in op.get("logs", []):
            console.print(f"  {line['t']:.3f} {line['message']}")


@ctl.command("list")
def ctl_list(socket: SocketOpt = _SOCKET, json_out: JsonOpt = False) -> None:
    """List operations."""
    with _client(socket) as c:
        ops = c.operations()
    if json_out:
        emit_json(ops)
    else:
        for op in ops:
            _show(op, False)


@ctl.command("cancel")
def ctl_cancel(op_id: str, socket: SocketOpt = _SOCKET, json_out: JsonOpt = False) -> None:
    """Cancel an operation (at its next cancellable phase)."""
    with _client(socket) as c:
        op = c.cancel(op_id)
    _show(op, json_out)


@ctl.command("wait")
def ctl_wait(op_id: str, socket: SocketOpt = _SOCKET, json_out: JsonOpt = False) -> None:
    """Wait until an operation ends."""
    _finish(socket, {"id": op_id}, True, json_out)

