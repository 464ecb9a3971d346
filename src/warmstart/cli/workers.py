"""Worker commands: serve, model make, and run (the local main job)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from warmstart import protocol
from warmstart.cli.app import app
from warmstart.cli.commands import JsonOpt, StoreOpt, open_store, parse_pairs
from warmstart.cli.output import console, emit_json, human_bytes, progress, timing_table
from warmstart.errors import UsageError, WarmstartError
from warmstart.host.bandwidth import Bandwidth

model_app = typer.Typer(help="Make local model directories.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve(ctx: typer.Context) -> None:
    """Run the reference OpenAI-compatible worker (see `warmstart serve --help`)."""
    from warmstart.serve.__main__ import main as serve_main

    raise typer.Exit(serve_main(list(ctx.args)))


@model_app.command("make")
def model_make(
    out_dir: Annotated[Path, typer.Argument(help="Directory to create.")],
    config: Annotated[str, typer.Option("--config", help="qwen3-0.6b or tiny.")] = "tiny",
) -> None:
    """Write a model directory with random weights of a known shape (no hub needed)."""
    from warmstart.serve.modelmake import make_model

    path = make_model(config, out_dir)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    console.print(f"wrote {config} model to {path} ({human_bytes(size)})")


def _wait_ready(control: Path, worker: subprocess.Popen[bytes], timeout: float) -> protocol.ReadyInfo:
    marker = control / protocol.READY_FOR_SNAPSHOT
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists():
            try:
                return protocol.read_model(marker, protocol.ReadyInfo)
            except ValueError:
                pass
        if worker.poll() is not None:
            raise UsageError(
                f"the worker exited with status {worker.returncode} before its checkpoint point",
                hint="run the command alone to see why",
            )
        time.sleep(0.05)
    raise UsageError(
        f"the worker did not reach its checkpoint point within {timeout:.0f} s",
        hint="raise --ready-timeout, or check that it calls warmstart.worker.checkpoint_point",
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    checkpoint_as: Annotated[str, typer.Option("--checkpoint-as", help="Snapshot name to take.")],
    restore_after: Annotated[
        bool, typer.Option("--restore/--no-restore", help="Restore the snapshot right away.")
    ] = True,
    ready_timeout: Annotated[
        float, typer.Option("--ready-timeout", help="Seconds to wait for checkpoint-ready.")
    ] = 900.0,
    env: Annotated[
        list[str], typer.Option("--env", help="KEY=VALUE for the restored worker (e.g. WARMSTART_PORT).")
    ] = [],  # noqa: B006
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Start a worker (the command after --), snapshot it at its checkpoint point, restore it.

    Example: warmstart run --checkpoint-as qwen -- warmstart serve --model ./qwen --port 8000
    """
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.snapshot.restore import RestoreRequest, restore

    command = list(ctx.args)
    if not command:
        raise UsageError("no worker command given", hint="put it after --, e.g. -- warmstart serve --model DIR")
    if command[0] == "warmstart":
        command = [sys.executable, "-m", "warmstart", *command[1:]]
    s = open_store(store)
    s.root.mkdir(parents=True, exist_ok=True)
    control = Path(tempfile.mkdtemp(prefix=f"control-{checkpoint_as}-", dir=s.root.parent))
    logs = control / "worker.log"
    t0 = time.perf_counter()
    worker = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=open(logs, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, protocol.CONTROL_DIR_ENV: str(control)},
    )
    try:
        with progress(not json_out, "waiting for the worker's checkpoint point"):
            ready = _wait_ready(control, worker, ready_timeout)
        cold = time.perf_counter() - t0
        labels = {"control_dir": str(control), **ready.labels}
        if ready.checkpoint_id:
            labels["checkpoint_id"] = ready.checkpoint_id
        with progress(not json_out, f"checkpointing {checkpoint_as}") as on_phase:
            taken = checkpoint(
                ready.pid, store=s, name=checkpoint_as,
                options=CheckpointOptions(labels=labels), listener=on_phase,
            )  # fmt: skip
        worker.wait()
    except (WarmstartError, KeyboardInterrupt):
        if worker.poll() is None:
            protocol.signal_file(control, protocol.SNAPSHOT_FAILED)
        raise
    out: dict[str, object] = {
        "name": checkpoint_as,
        "worker_log": str(logs),
        "cold_to_checkpoint_point_s": cold,
        "checkpoint": taken.timer.phases,
        "snapshot_bytes": taken.manifest.total_bytes,
    }
    restored = None
    if restore_after:
        from warmstart.gms.preflight import prepare_restore

        request = RestoreRequest(control_dir=control, env=parse_pairs(env))
        prepare_restore(taken.manifest.labels)  # weights in the memory service: refuse or start streaming
        with progress(not json_out, f"restoring {checkpoint_as}") as on_phase:
            restored = restore(checkpoint_as, store=s, request=request, listener=on_phase)
        out |= {"pid": restored.pid, "restore": restored.timer.phases, "restore_s": restored.timer.total}
    if json_out:
        emit_json(out)
        return
    console.print(f"worker reached its checkpoint point in {cold:.2f} s (log: {logs})")
    console.print(timing_table(f"checkpoint {checkpoint_as}", taken.timer.phases, taken.timer.total))
    if restored:
        bw = Bandwidth.load()
        console.print(timing_table(f"restore {checkpoint_as}", restored.timer.phases, restored.timer.total,
                                   bw.ceilings() if bw else None))  # fmt: skip
        console.print(f"restored worker running as PID {restored.pid}")


@app.command()
def controller(
    kubeconfig: Annotated[
        Optional[Path], typer.Option("--kubeconfig", help="Outside a cluster: kubeconfig file.")
    ] = None,
) -> None:
    """Run the Kubernetes controller (Snapshot resources; see docs/kubernetes.md)."""
    from warmstart.k8s.controller import run as run_controller

    run_controller(kubeconfig=str(kubeconfig) if kubeconfig else None)


@app.command("node-watch")
def node_watch(
    kubeconfig: Annotated[
        Optional[Path], typer.Option("--kubeconfig", help="Outside a cluster: kubeconfig file.")
    ] = None,
) -> None:
    """Kubernetes side of the snapshot-agent DaemonSet: watch this node's pods and
    Snapshots, and drive the node's `warmstart agent` over its socket (NODE_NAME,
    WARMSTART_AGENT_SOCKET; see docs/kubernetes.md)."""
    from warmstart.k8s.nodeagent import run as run_node_watch

    run_node_watch(kubeconfig=str(kubeconfig) if kubeconfig else None)
