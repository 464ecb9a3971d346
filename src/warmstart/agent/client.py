"""A client of the agent's API over its unix socket (httpx)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from warmstart.errors import (
    EnvironmentProblem,
    Incompatible,
    NotFoundError,
    UsageError,
    WarmstartError,
)

DEFAULT_SOCKET = Path("/run/warmstart/agent.sock")
FINAL = ("succeeded", "failed")


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
            raise EnvironmentProblem(f"cannot reach the agent at {self.socket} ({exc})",
                                     hint="is `warmstart agent` running? (--socket)") from None
        try:
            doc = resp.json()
        except ValueError:
            doc = {"error": resp.text[:200]}
        if resp.status_code >= 400:
            message = f"agent: {doc.get('error', resp.reason_phrase)}"
            cls = {404: NotFoundError, 409: Incompatible, 400: UsageError}.get(
                resp.status_code, WarmstartError)
            raise cls(message, hint=doc.get("hint"))
        return doc

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
