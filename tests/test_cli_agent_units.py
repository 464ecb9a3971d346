"""The CLI's --agent plumbing without an agent: flag parsing, stores, error kinds, requests."""

from __future__ import annotations

import os

import pytest

from warmstart.agent.client import error_of
from warmstart.agent.models import CheckpointRequest, RestoreRequest
from warmstart.cli.via_agent import agent_socket, agent_store, expand_agent_flag
from warmstart.errors import (
    Cancelled,
    NotFoundError,
    UsageError,
    WarmstartError,
    from_kind,
    kind_of,
)


@pytest.mark.parametrize(("argv", "want"), [
    (["restore", "snap", "--agent"], ["restore", "snap", "--agent="]),
    (["restore", "--agent", "snap"], ["restore", "--agent=", "snap"]),  # a name, not a socket
    (["ls", "--agent", "--json"], ["ls", "--agent=", "--json"]),
    (["ls", "--agent", "/run/a.sock"], ["ls", "--agent", "/run/a.sock"]),
    (["ls", "--agent", "a.sock"], ["ls", "--agent", "a.sock"]),
    (["ls", "--agent=x"], ["ls", "--agent=x"]),
    (["agent-ctl", "list", "--agent"], ["agent-ctl", "list", "--agent"]),  # not these commands
    (["restore", "s", "--", "--agent"], ["restore", "s", "--", "--agent"]),
])
def test_a_bare_agent_flag_gets_the_default(argv: list[str], want: list[str]) -> None:
    assert expand_agent_flag(argv) == want


def test_default_socket_follows_the_env(monkeypatch) -> None:
    monkeypatch.delenv("WARMSTART_AGENT_SOCKET", raising=False)
    assert str(agent_socket("")) == "/run/warmstart/agent.sock"
    monkeypatch.setenv("WARMSTART_AGENT_SOCKET", "/tmp/x.sock")
    assert str(agent_socket("")) == "/tmp/x.sock"
    assert str(agent_socket("/other.sock")) == "/other.sock" and agent_socket(None) is None


def test_agent_store_paths() -> None:
    assert agent_store(None) is None
    assert agent_store("rel/store") == os.path.join(os.getcwd(), "rel/store")
    assert agent_store("file:///srv/s") == "file:///srv/s"
    with pytest.raises(UsageError, match="local store"):
        agent_store("s3://bucket/p")


def test_errors_keep_their_kind_across_the_wire() -> None:
    class Conflict(UsageError):
        pass

    assert kind_of(Conflict("x")) == "UsageError" and kind_of(NotFoundError("x")) == "NotFoundError"
    err = error_of({"error": "operation 1 cancelled", "hint": "h", "error_type": "Cancelled"})
    assert isinstance(err, Cancelled) and err.exit_code == 130 and str(err) == "operation 1 cancelled — h"
    assert type(from_kind("os.system", "m")) is WarmstartError  # only this module's classes
    assert type(from_kind(None, "m")) is WarmstartError


def test_requests_name_one_target() -> None:
    assert CheckpointRequest(type="checkpoint", pid=42).container_id is None
    assert CheckpointRequest(type="checkpoint", container_id="c").pid is None
    for bad in ({}, {"pid": 1, "container_id": "c"}):
        with pytest.raises(ValueError, match="exactly one of container_id and pid"):
            CheckpointRequest(type="checkpoint", **bad)
    assert RestoreRequest(type="restore", snapshot="s").container_id is None
