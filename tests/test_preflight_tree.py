"""The checkpoint's view of its tree: listed once from the tree's own /proc files,
its TCP connections matched by socket inode in its own network namespace."""

from __future__ import annotations

import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from _support import wait_for

from warmstart.errors import UsageError
from warmstart.host import process as proc
from warmstart.host.criu import DumpOptions
from warmstart.host.sockets import TreeSockets
from warmstart.snapshot.checkpoint import CheckpointOptions, preflight

# A root whose main thread forks one child (with a grandchild) and whose second
# thread forks another: children of any thread belong to the tree.
FAMILY = textwrap.dedent("""
    import subprocess, sys, threading, time
    subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"])
    t = threading.Thread(target=lambda: (subprocess.Popen(["sleep", "300"]), time.sleep(300)))
    t.start()
    open(sys.argv[1], "w").write("ready")
    time.sleep(300)
""")


def _start(code: str, *args: str, ready: Path) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([sys.executable, "-c", code, str(ready), *args], stdin=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    wait_for(lambda: ready.exists() and ready.read_text(), 20, what="the workload")
    return p


@pytest.fixture
def family(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    p = _start(FAMILY, ready=tmp_path / "ready")
    wait_for(lambda: len(psutil.Process(p.pid).children(recursive=True)) == 4, what="4 descendants")
    yield p
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def test_the_tree_is_what_psutil_lists_in_the_same_order(family) -> None:
    expected = [family.pid, *(c.pid for c in psutil.Process(family.pid).children(recursive=True))]
    assert len(expected) == 5
    assert proc.tree_pids(family.pid) == expected
    assert [p.pid for p in proc.tree_processes(family.pid)] == expected
    leaf = expected[-1]
    assert proc.tree_pids(leaf) == [leaf]


def test_a_gone_root_is_no_such_process() -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(psutil.NoSuchProcess):
        proc.tree_pids(p.pid)
    with pytest.raises(psutil.NoSuchProcess):
        proc.tree_processes(p.pid)


def test_an_ancestor_of_warmstart_is_refused(family) -> None:
    with pytest.raises(UsageError, match="ancestor of warmstart"):
        proc.validate_root(os.getppid())
    assert proc.validate_root(family.pid).pid == family.pid


def test_continue_pids_resumes_descendants_not_listed(family) -> None:
    pids = proc.tree_pids(family.pid)
    os.killpg(family.pid, signal.SIGSTOP)
    wait_for(
        lambda: all(psutil.Process(p).status() == psutil.STATUS_STOPPED for p in pids),
        what="stopped",
    )
    proc.continue_pids([family.pid])
    wait_for(
        lambda: all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in pids),
        what="resumed",
    )


# -- TCP ------------------------------------------------------------------
CLIENT = textwrap.dedent("""
    import socket, sys, time
    s = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    open(sys.argv[1], "w").write("%s %d" % s.getsockname()[:2])
    time.sleep(300)
""")


def _listener(family: int, host: str) -> socket.socket:
    srv = socket.socket(family)
    srv.bind((host, 0))
    srv.listen()
    return srv


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["ipv4", "ipv6"])  # fmt: skip
def test_an_established_connection_of_the_tree_is_refused(
    tmp_path: Path, family: int, host: str
) -> None:
    srv = _listener(family, host)
    port = srv.getsockname()[1]
    client = _start(CLIENT, host, str(port), ready=tmp_path / "ready")
    conn, _ = srv.accept()
    try:
        cport = int((tmp_path / "ready").read_text().split()[1])
        line = f"{host}:{cport} -> {host}:{port}"
        assert proc.established_tcp([client.pid]) == [line]
        # what psutil.net_connections said before: the same line
        old = [f"{c.laddr.ip}:{c.laddr.port} -> {c.raddr.ip}:{c.raddr.port}"
               for c in psutil.net_connections("tcp") if c.pid == client.pid and c.status == "ESTABLISHED"]  # fmt: skip
        assert old == [line]
        with pytest.raises(UsageError) as exc:
            preflight(client.pid, CheckpointOptions())
        assert exc.value.message == f"established TCP connection {line}"
        assert "--tcp-established" in (exc.value.hint or "")
        assert preflight(client.pid, CheckpointOptions(dump=DumpOptions(tcp_established=True))) == [
            client.pid
        ]
        assert preflight(client.pid, CheckpointOptions(dump=DumpOptions(tcp_close=True))) == [
            client.pid
        ]
        # the other end is this process's, not the tree's; the listener is not established
        assert f"{host}:{port} -> {host}:{cport}" in proc.established_tcp([os.getpid()])
        assert proc.established_tcp([client.pid]) == [line]
    finally:
        conn.close()
        srv.close()
        client.kill()
        client.wait()


def test_other_processes_connections_are_ignored(family, tmp_path: Path) -> None:
    srv = _listener(socket.AF_INET, "127.0.0.1")
    client = socket.create_connection(srv.getsockname())  # this process's: not the tree's
    conn, _ = srv.accept()
    try:
        assert proc.established_tcp([os.getpid()])
        assert proc.established_tcp(proc.tree_pids(family.pid)) == []
        assert preflight(family.pid, CheckpointOptions()) == proc.tree_pids(family.pid)
    finally:
        for s in (conn, client, srv):
            s.close()


def test_several_connections_are_counted(tmp_path: Path) -> None:
    srv = _listener(socket.AF_INET, "127.0.0.1")
    code = textwrap.dedent("""
        import socket, sys, time
        conns = [socket.create_connection(("127.0.0.1", int(sys.argv[2]))) for _ in range(3)]
        open(sys.argv[1], "w").write("ok")
        time.sleep(300)
    """)
    client = _start(code, str(srv.getsockname()[1]), ready=tmp_path / "ready")
    accepted = [srv.accept()[0] for _ in range(3)]
    try:
        assert len(proc.established_tcp([client.pid])) == 3
        with pytest.raises(
            UsageError, match=r"established TCP connection 127\.0\.0\.1:\d+ -> .* \(and 2 more\)"
        ):
            preflight(client.pid, CheckpointOptions())
    finally:
        for s in [*accepted, srv]:
            s.close()
        client.kill()
        client.wait()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"),
                    reason="needs root, unshare and ip")  # fmt: skip
def test_a_connection_in_the_trees_own_network_namespace_is_found(tmp_path: Path) -> None:
    """psutil.net_connections read warmstart's namespace only: this one was missed."""
    code = textwrap.dedent("""
        import socket, sys, time
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
        c = socket.create_connection(srv.getsockname()); a, _ = srv.accept()
        open(sys.argv[1], "w").write("%d %d" % (c.getsockname()[1], srv.getsockname()[1]))
        time.sleep(300)
    """)
    ready = tmp_path / "ready"
    outer = subprocess.Popen(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" -c "$1" "$2"',
                              sys.executable, code, str(ready)], start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: ready.exists() and ready.read_text(), 20, what="the workload")
        cport, sport = map(int, ready.read_text().split())
        pid = outer.pid  # unshare and sh exec'ed into python
        assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
        assert sorted(proc.established_tcp([pid])) == sorted(
            [f"127.0.0.1:{cport} -> 127.0.0.1:{sport}", f"127.0.0.1:{sport} -> 127.0.0.1:{cport}"]
        )
    finally:
        outer.kill()
        outer.wait()


def test_tables_are_read_once_per_namespace(family, monkeypatch: pytest.MonkeyPatch) -> None:
    srv = _listener(socket.AF_INET, "127.0.0.1")
    client = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    reads: list[str] = []
    real = Path.read_text

    def counting(self: Path, *a, **kw) -> str:
        reads.append(str(self))
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", counting)
    try:
        inet = TreeSockets([os.getpid(), *proc.tree_pids(family.pid)])
        assert inet.established_tcp() and inet.bound_to_specific_ip() == []
        assert inet.established_tcp()
        assert sorted(r.rsplit("/", 1)[1] for r in reads) == ["tcp", "tcp6", "udp", "udp6"]
    finally:
        for s in (conn, client, srv):
            s.close()


# -- terminal --------------------------------------------------------------
def test_has_terminal_sees_a_controlling_tty_only() -> None:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session of its own with the pty as its terminal
        os.execv("/bin/sleep", ["sleep", "300"])
    detached = subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        # the child takes the pty as its terminal after the fork returned here
        wait_for(lambda: proc.has_terminal([pid]), 10, what="the child's controlling terminal")
        assert not proc.has_terminal([detached.pid])
        assert proc.has_terminal([detached.pid, pid])
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(fd)
        detached.kill()
        detached.wait()
