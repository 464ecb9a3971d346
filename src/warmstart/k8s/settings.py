"""Settings of the node agent and the controller, from arguments or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from warmstart.errors import UsageError


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} is not an integer", hint=f"set {name} to a number") \
            from None


@dataclass
class AgentSettings:
    node_name: str
    #: Store used when a Snapshot names none (the snapshot volume mounted into the agent).
    default_store: str = "file:///var/lib/warmstart/snapshots"
    socket_path: str = "/run/warmstart/agent.sock"
    #: Restores running at once on this node.
    max_parallel: int = 4
    metrics_port: int = 9464
    watch_timeout: int = 60

    @classmethod
    def from_env(cls) -> AgentSettings:
        node = os.environ.get("NODE_NAME", "")
        if not node:
            raise UsageError("NODE_NAME is not set",
                             hint="set it from the downward API: fieldRef spec.nodeName")
        return cls(
            node_name=node,
            default_store=os.environ.get("WARMSTART_STORE", cls.default_store),
            socket_path=os.environ.get("WARMSTART_AGENT_SOCKET", cls.socket_path),
            max_parallel=_int_env("WARMSTART_MAX_PARALLEL_RESTORES", cls.max_parallel),
            metrics_port=_int_env("WARMSTART_METRICS_PORT", cls.metrics_port),
        )


@dataclass
class ControllerSettings:
    #: Watch one namespace only; empty: all namespaces.
    namespace: str = ""
    workers: int = 4
    metrics_port: int = 9464
    watch_timeout: int = 60

    @classmethod
    def from_env(cls) -> ControllerSettings:
        return cls(
            namespace=os.environ.get("WARMSTART_WATCH_NAMESPACE", ""),
            workers=_int_env("WARMSTART_CONTROLLER_WORKERS", cls.workers),
            metrics_port=_int_env("WARMSTART_METRICS_PORT", cls.metrics_port),
        )
