from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from warmstart import protocol
from warmstart.worker import (
    BadRestoreContext,
    Coordinator,
    ForeignSnapshot,
    NotCheckpointable,
    Outcome,
    check_checkpointable,
)
from warmstart.worker.preflight import CHECKPOINT_ENV, apply_checkpoint_env, inet_sockets


def fake_checkpointer(cdir: Path, answer, *, seen: dict) -> threading.Thread:
    """Waits for ready-for-snapshot, records it, then calls answer(cdir, info)."""

    def run() -> None:
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        deadline = time.time() + 10
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.01)
        info = protocol.read_model(ready, protocol.ReadyInfo)
        seen["info"] = info
        seen["released_before_ready"] = list(seen.get("calls", []))
        answer(cdir, info)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def restore_answer(env=None, checkpoint_id=None):
    def answer(cdir: Path, info: protocol.ReadyInfo) -> None:
        ctx = protocol.RestoreContext(
            snapshot_id="snap-1",
            snapshot_name="demo",
            env=env or {},
            checkpoint_id=checkpoint_id if checkpoint_id is not None else info.checkpoint_id,
        )
        protocol.signal_file(cdir, protocol.RESTORE_CONTEXT, ctx)
        protocol.signal_file(cdir, protocol.RESTORE_COMPLETE)

    return answer


@pytest.fixture
def env_guard(monkeypatch):
    for key in [*CHECKPOINT_ENV, "POD_NAME", "WARMSTART_PORT", protocol.CONTROL_DIR_ENV]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_no_control_dir_is_a_noop(env_guard):
    calls = []
    coord = Coordinator()
    out = coord.checkpoint_point(release=lambda: calls.append("r"), reacquire=lambda: calls.append("a"))
    assert out is Outcome.NOT_REQUESTED
    assert calls == [] and not coord.was_restored()
    assert "NCCL_SOCKET_IFNAME" not in os.environ


def test_restore_flow_applies_context(tmp_path, env_guard):
    calls: list[str] = []
    seen: dict = {"calls": calls}
    coord = Coordinator()
    got = []
    coord.on_restore(lambda ctx: got.append((ctx.snapshot_id, os.environ.get("POD_NAME"), list(calls))))
    t = fake_checkpointer(tmp_path, restore_answer(env={"POD_NAME": "replica-7", "WARMSTART_PORT": "9123"}), seen=seen)
    out = coord.checkpoint_point(
        release=lambda: calls.append("release"),
        reacquire=lambda: calls.append("reacquire"),
        labels={"model": "m"},
        control_dir=tmp_path,
        poll_interval=0.01,
    )
    t.join(5)
    assert out is Outcome.RESTORED
    assert seen["released_before_ready"] == ["release"]  # released before announcing
    assert seen["info"].pid == os.getpid() and seen["info"].labels == {"model": "m"}
    assert seen["info"].checkpoint_id == coord.checkpoint_id and len(coord.checkpoint_id) == 32
    assert calls == ["release", "reacquire"]
    assert got == [("snap-1", "replica-7", ["release", "reacquire"])]  # env applied, KV back first
    assert coord.was_restored() and coord.restore_context().snapshot_name == "demo"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_CUMEM_ENABLE"] == "0"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and os.environ["NCCL_IB_DISABLE"] == "1"
    assert not (tmp_path / protocol.READY_FOR_SNAPSHOT).exists()


def test_foreign_snapshot_id_is_refused(tmp_path, env_guard):
    coord = Coordinator()
    calls: list[str] = []
    fake_checkpointer(tmp_path, restore_answer(checkpoint_id="someone-else"), seen={})
    with pytest.raises(ForeignSnapshot, match="someone-else"):
        coord.checkpoint_point(release=lambda: calls.append("r"), reacquire=lambda: calls.append("a"),
                               control_dir=tmp_path, poll_interval=0.01)
    assert calls == ["r"] and not coord.was_restored()


def test_restore_complete_without_context(tmp_path, env_guard):
    coord = Coordinator()
    fake_checkpointer(tmp_path, lambda cdir, info: protocol.signal_file(cdir, protocol.RESTORE_COMPLETE), seen={})
    with pytest.raises(BadRestoreContext, match="missing"):
        coord.checkpoint_point(control_dir=tmp_path, poll_interval=0.01)


def test_malformed_context(tmp_path, env_guard):
    def answer(cdir, info):
        (cdir / protocol.RESTORE_CONTEXT).write_text('{"snapshot_id": 3')
        protocol.signal_file(cdir, protocol.RESTORE_COMPLETE)

    fake_checkpointer(tmp_path, answer, seen={})
    with pytest.raises(BadRestoreContext, match="not a valid restore context"):
        Coordinator().checkpoint_point(control_dir=tmp_path, poll_interval=0.01)


def test_snapshot_failed_continues(tmp_path, env_guard):
    calls: list[str] = []
    fake_checkpointer(tmp_path, lambda c, i: protocol.signal_file(c, protocol.SNAPSHOT_FAILED), seen={})
    coord = Coordinator()
    out = coord.checkpoint_point(release=lambda: calls.append("r"), reacquire=lambda: calls.append("a"),
                                 control_dir=tmp_path, poll_interval=0.01)
    assert out is Outcome.SNAPSHOT_FAILED and calls == ["r", "a"] and not coord.was_restored()


def test_snapshot_complete_exits_original(tmp_path, env_guard):
    exits: list[bool] = []
    calls: list[str] = []
    fake_checkpointer(tmp_path, lambda c, i: protocol.signal_file(c, protocol.SNAPSHOT_COMPLETE), seen={})
    out = Coordinator().checkpoint_point(release=lambda: calls.append("r"), reacquire=lambda: calls.append("a"),
                                         control_dir=tmp_path, poll_interval=0.01,
                                         exit_original=lambda: exits.append(True))
    assert out is Outcome.SNAPSHOTTED and exits == [True] and calls == ["r"]


def test_snapshot_complete_continue(tmp_path, env_guard):
    calls: list[str] = []
    env_guard.setenv("WARMSTART_CONTINUE_AFTER_SNAPSHOT", "1")
    fake_checkpointer(tmp_path, lambda c, i: protocol.signal_file(c, protocol.SNAPSHOT_COMPLETE), seen={})
    out = Coordinator().checkpoint_point(release=lambda: calls.append("r"), reacquire=lambda: calls.append("a"),
                                         control_dir=tmp_path, poll_interval=0.01,
                                         exit_original=lambda: pytest.fail("must not exit"))
    assert out is Outcome.SNAPSHOTTED and calls == ["r", "a"]


def test_timeout_continues_unsnapshotted(tmp_path, env_guard):
    calls: list[str] = []
    t0 = time.time()
    out = Coordinator().checkpoint_point(release=lambda: calls.append("r"), reacquire=lambda: calls.append("a"),
                                         timeout=0.2, control_dir=tmp_path, poll_interval=0.01)
    assert out is Outcome.TIMED_OUT and calls == ["r", "a"]
    assert time.time() - t0 < 5


def test_stale_markers_are_removed(tmp_path, env_guard):
    protocol.signal_file(tmp_path, protocol.SNAPSHOT_COMPLETE)  # left over from an earlier run
    fake_checkpointer(tmp_path, lambda c, i: protocol.signal_file(c, protocol.SNAPSHOT_FAILED), seen={})
    out = Coordinator().checkpoint_point(control_dir=tmp_path, poll_interval=0.01,
                                         exit_original=lambda: pytest.fail("stale marker obeyed"))
    assert out is Outcome.SNAPSHOT_FAILED


def test_control_dir_missing(tmp_path, env_guard):
    from warmstart.errors import UsageError

    with pytest.raises(UsageError, match="not a directory"):
        Coordinator().checkpoint_point(control_dir=tmp_path / "nope")


def test_refuses_tcp_socket(tmp_path, env_guard):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        assert inet_sockets()  # seen through /proc
        calls: list[str] = []
        with pytest.raises(NotCheckpointable, match="TCP/UDP socket"):
            Coordinator().checkpoint_point(release=lambda: calls.append("r"), control_dir=tmp_path)
        assert calls == []  # refused before releasing anything
        assert not (tmp_path / protocol.READY_FOR_SNAPSHOT).exists()
    finally:
        sock.close()
    check_checkpointable()  # clean again


def test_io_uring_detection(monkeypatch):
    from warmstart.worker import preflight

    monkeypatch.setattr(preflight, "_fd_targets", lambda pid="self": [(0, "/dev/null"), (7, "anon_inode:[io_uring]")])
    assert preflight.io_uring_fds() == [7]
    with pytest.raises(NotCheckpointable, match="io_uring"):
        check_checkpointable()


def test_checkpoint_env_keeps_user_values():
    env = {"NCCL_SOCKET_IFNAME": "eth0"}
    applied = apply_checkpoint_env(env)
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and "NCCL_SOCKET_IFNAME" not in applied
    assert env["NCCL_CUMEM_ENABLE"] == "0" and env["NCCL_IB_DISABLE"] == "1" and env["GLOO_SOCKET_IFNAME"] == "lo"
