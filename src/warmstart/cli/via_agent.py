"""``--agent [SOCKET]`` of checkpoint, restore, ls and inspect: the node agent does the work.

The command sends its request to ``warmstart agent`` over the agent's unix socket
(:class:`warmstart.agent.client.AgentClient`), follows the operation phase by phase (the
same spinner as in-process), and prints the same report: timing table or ``--json``.
A failed operation raises the error the agent met (same message, hint and exit code);
Ctrl-C cancels the agent's operation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from warmstart.cli.output import console, emit_json, human_bytes, progress, timing_table
from warmstart.errors import UsageError
from warmstart.snapshot.manifest import Manifest, PhaseTiming

AgentOpt = Annotated[
    str | None,
    typer.Option(
        "--agent", show_default=False, metavar="[SOCKET]",
        help="Let the node agent do it, over its socket (bare --agent: $WARMSTART_AGENT_SOCKET, "
        "else /run/warmstart/agent.sock).",
    ),
]
RuntimeOpt = Annotated[
    str | None, typer.Option("--runtime", help="With --agent: runc, containerd, crio or auto.")
]
RuncRootOpt = Annotated[str | None, typer.Option("--runc-root", help="With --agent: runc --root.")]
_COMMANDS = frozenset({"checkpoint", "restore", "ls", "inspect"})


def expand_agent_flag(argv: Sequence[str]) -> list[str]:
    """Give a bare ``--agent`` its default value: ``--agent`` -> ``--agent=``.

    ``--agent SOCKET`` keeps its value when SOCKET looks like a socket path (has a ``/``
    or ends in ``.sock``); ``--agent=SOCKET`` always works."""
    out = list(argv)
    if not _COMMANDS & set(out):
        return out
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg != "--agent":
            continue
        nxt = out[i + 1] if i + 1 < len(out) else None
        if nxt is None or nxt.startswith("-") or not ("/" in nxt or nxt.endswith(".sock")):
            out[i] = "--agent="
    return out


def agent_socket(value: str | None) -> Path | None:
    """The socket of ``--agent`` (``""``: the default one); None without ``--agent``."""
    if value is None:
        return None
    from warmstart.agent.client import default_socket

    return Path(value) if value else default_socket()


def agent_store(store: str | Path | None) -> str | None:
    """A store path the agent can open (absolute; ``file://`` kept); None: its own default."""
    if store is None or str(store) == "":
        return None
    text = str(store)
    if text.startswith("file://"):
        return text
    if "://" in text:
        raise UsageError(f"--agent works on a local store, not {text}",
                         hint="checkpoint into the agent's store, then `warmstart push`")
    return os.path.abspath(text)


def run(socket: Path, body: dict[str, Any], *, show: bool, what: str) -> dict[str, Any]:
    """Submit, follow with a spinner, return the succeeded operation (else raise its error)."""
    from warmstart.agent.client import AgentClient, error_of

    with AgentClient(socket) as client:
        op = client.submit(body)
        seen: list[str | None] = [None]
        with progress(show, f"{what} (agent {op['id']})") as on_phase:

            def update(o: dict[str, Any]) -> None:
                if o.get("phase") and o["phase"] != seen[0]:
                    seen[0] = o["phase"]
                    on_phase(o["phase"])

            op = client.follow(op["id"], on_update=update)
    if op["state"] == "failed":
        raise error_of(op)
    return op


def _phases(result: dict[str, Any]) -> list[PhaseTiming]:
    return [PhaseTiming.model_validate(p) for p in result.get("phases") or []]


def checkpoint(socket: Path, body: dict[str, Any], *, json_out: bool) -> None:
    what = f"checkpointing {'container ' + body['container_id'] if body.get('container_id') else 'PID ' + str(body['pid'])}"
    op = run(socket, body, show=not json_out, what=what)
    r = op["result"]
    if json_out:
        emit_json({"name": r["snapshot"], "snapshot_id": r["snapshot_id"], "path": r["path"],
                   "bytes": r["size_bytes"], "gpus": r.get("gpus", []),
                   "timings": r.get("phases", []), "total_seconds": r.get("total_seconds"),
                   "operation": op["id"], "agent": str(socket)})
        return
    console.print(timing_table(f"checkpoint {r['snapshot']}", _phases(r), r.get("total_seconds") or 0.0))
    console.print(
        f"snapshot [bold]{r['snapshot']}[/] ({human_bytes(r['size_bytes'])}, "
        f"{r.get('processes', '?')} processes, {len(r.get('gpus') or [])} GPU) at {r['path']} "
        f"(by the agent, operation {op['id']})"
    )


def restore(socket: Path, body: dict[str, Any], *, json_out: bool) -> int:
    target = f" into {body['container_id']}" if body.get("container_id") else ""
    op = run(socket, body, show=not json_out, what=f"restoring {body['snapshot']}{target}")
    r = op["result"]
    if json_out:
        emit_json({"name": r["snapshot"], "pid": r["pid"], "timings": r.get("phases", []),
                   "total_seconds": r.get("total_seconds"), "log": r.get("log"),
                   "gms_weights": r.get("gms_weights"), "container": body.get("container_id"),
                   "operation": op["id"], "agent": str(socket)})
    else:
        from warmstart.host.bandwidth import Bandwidth

        bw = Bandwidth.load()
        console.print(timing_table(f"restore {r['snapshot']}", _phases(r), r.get("total_seconds") or 0.0,
                                   bw.ceilings() if bw else None))
        console.print(f"restored [bold]{r['snapshot']}[/]{target} as PID {r['pid']} "
                      f"(by the agent, operation {op['id']})")
        if r.get("gms_weights"):
            console.print(f"weights from the memory service: {r['gms_weights']}")
    return int(r["pid"])


class _Entry:
    """What ``ls`` renders, from the agent's answer (as LocalStore.entries() gives it)."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.name: str = doc["name"]
        self.error: str | None = doc.get("error")
        self.manifest = Manifest.model_validate(doc["manifest"]) if doc.get("manifest") else None


def list_snapshots(socket: Path, store: str | None) -> tuple[str, list[_Entry]]:
    from warmstart.agent.client import AgentClient

    with AgentClient(socket) as client:
        doc = client.snapshots(agent_store(store))
    return doc["store"], [_Entry(e) for e in doc["snapshots"]]


def manifest(socket: Path, name: str, store: str | None) -> Manifest:
    from warmstart.agent.client import AgentClient

    with AgentClient(socket) as client:
        return Manifest.model_validate(client.snapshot(name, agent_store(store)))
