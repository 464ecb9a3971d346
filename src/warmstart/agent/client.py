"""A client of the agent's API over its unix socket (httpx).

Used by ``warmstart agent-ctl``, by the main CLI's ``--agent`` (checkpoint, restore, ls,
inspect) and by tests. :meth:`AgentClient.follow` waits for an operation, reporting each
phase, and turns Ctrl-C into a cancellation of the agent's operation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from warmstart import errors
from warmstart.errors import (
    Cancelled,
    EnvironmentProblem,
    Incompatible,
    NotFoundError,
    UsageError,
    WarmstartError,
)

DEFAULT_SOCKET = Path("/run/warmstart/agent.sock")
#: The socket of ``warmstart agent --socket`` and every client's default.
SOCKET_ENV = "WARMSTART_AGENT_SOCKET"
FINAL = ("succeeded", "failed")


def default_socket() -> Path:
    return Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)


def error_of(op: dict[str, Any]) -> WarmstartError:
    """The error of a failed operation, as the class the agent raised (same exit code)."""
    return errors.from_kind(op.get("error_type"), op.get("error") or "the operation failed",
                            op.get("hint"))


class AgentClient:
    def __init__(self, socket: Path | str = DEFAULT_SOCKET, *, timeout: float = 30.0) -> None:
        self.socket = str(socket)
        self._http = httpx.Client(transport=httpx.HTTPTransport(uds=self.socket),
                                  base_url="http://agent", timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, str] | None = None) -> Any:
        try:
            resp = self._http.request(method, path, json=body, params=params)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        try:
            doc = resp.json()
        except ValueError:
            doc = {"error": resp.text[:200]}
        if resp.status_code >= 400:
            message = str(doc.get("error") or resp.reason_phrase)
            if doc.get("error_type"):  # the agent's own error: the same kind here
                raise errors.from_kind(doc["error_type"], message, doc.get("hint"))
            cls = {404: NotFoundError, 409: Incompatible, 400: UsageError}.get(
                resp.status_code, WarmstartError)
            raise cls(message, hint=doc.get("hint"))
        return doc

    def _unreachable(self, exc: Exception) -> EnvironmentProblem:
        if not os.path.exists(self.socket):
            why = "no such socket"
        elif isinstance(exc, httpx.ConnectError):
            why = "nothing listens on it"
        else:
            why = str(exc) or type(exc).__name__
        return EnvironmentProblem(
            f"the warmstart agent is not reachable at {self.socket} ({why})",
            hint=f"start it (as root): `warmstart agent --socket {self.socket}`, or point "
            f"--agent / ${SOCKET_ENV} at its socket",
        )

    def node(self) -> dict[str, Any]:
        return self.call("GET", "/v1/node")

    def container(self, container_id: str, **params: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/containers/{container_id}",
                         params={k: v for k, v in params.items() if v})

    def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/v1/operations", body)

    def operation(self, op_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/operations/{op_id}")

    def operations(self) -> list[dict[str, Any]]:
        return self.call("GET", "/v1/operations")

    def cancel(self, op_id: str) -> dict[str, Any]:
        return self.call("POST", f"/v1/operations/{op_id}/cancel")

    def snapshots(self, store: str | None = None) -> dict[str, Any]:
        return self.call("GET", "/v1/snapshots", params={"store": store} if store else None)

    def snapshot(self, name: str, store: str | None = None) -> dict[str, Any]:
        return self.call("GET", f"/v1/snapshots/{name}",
                         params={"store": store} if store else None)

    def follow(self, op_id: str, *, on_update: Callable[[dict[str, Any]], None] | None = None,
               interval: float = 0.1) -> dict[str, Any]:
        """Wait for the operation to end, calling ``on_update`` with each new state.

        Ctrl-C (KeyboardInterrupt) cancels the operation on the agent and waits for it to
        stop; a cancelled operation raises :class:`Cancelled`. A second Ctrl-C stops
        waiting (the cancellation stays requested)."""
        try:
            while True:
                op = self.operation(op_id)
                if on_update is not None:
                    on_update(op)
                if op["state"] in FINAL:
                    return op
                time.sleep(interval)
        except KeyboardInterrupt:
            try:
                self.cancel(op_id)
            except UsageError:  # it ended meanwhile (409)
                return self.operation(op_id)
            op = self.wait(op_id, timeout=600, interval=interval)
            if op["state"] == "failed":
                raise Cancelled(f"operation {op_id} cancelled (interrupted): {op.get('error')}",
                                hint=op.get("hint") or "nothing it started is left") from None
            return op  # too late to cancel: it finished

    def wait(self, op_id: str, *, timeout: float = 3600.0, interval: float = 0.1) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            op = self.operation(op_id)
            if op["state"] in FINAL:
                return op
            if time.monotonic() > deadline:
                raise WarmstartError(f"operation {op_id} still {op['state']} after {timeout:g}s",
                                     hint="check it later with `warmstart agent-ctl get`")
            time.sleep(interval)
