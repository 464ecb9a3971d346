"""`warmstart checkpoint/restore/ls/inspect --agent`: the main CLI driving a real agent process.

Root, CRIU; the container tests need runc too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _agent import SRC, Agent
from _containers import COUNTER, PLACEHOLDER_ARGS, PLACEHOLDER_ENV, build_base, run_container
from _support import Tree, wait_for

pytestmark = [pytest.mark.root, pytest.mark.criu, pytest.mark.slow]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "warmstart", *args], capture_output=True, text=True,
                          timeout=180, check=False,
                          env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "200", **(env or {})})


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture
def agent(tmp_path: Path):
    runc_root = tmp_path / "runc"
    runc_root.mkdir()
    a = Agent(tmp_path, runc_root)
    a.start()
    yield a
    a.stop()


def test_a_process_tree_through_the_agent(agent: Agent, tree_factory) -> None:
    tree = tree_factory()
    sock = str(agent.socket)
    proc = cli("checkpoint", "--pid", str(tree.pid), "--name", "t1", "--agent", sock)
    assert proc.returncode == 0, proc.stderr
    # the same report as in-process: the per-phase table, then the summary line
    assert "checkpoint t1" in proc.stdout and "dump" in proc.stdout and "total" in proc.stdout
    assert "snapshot t1" in proc.stdout and "by the agent" in proc.stdout
    tree.popen.wait(timeout=10)  # the agent killed the original; free its PID
    at_checkpoint = tree.status()["counter"]
    assert (agent.store / "t1" / "manifest.json").is_file()  # in the agent's store

    ls = cli("ls", "--agent", sock, "--json")
    assert ls.returncode == 0, ls.stderr
    assert [e["name"] for e in json.loads(ls.stdout)] == ["t1"]
    shown = cli("inspect", "t1", f"--agent={sock}", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["tree"]["root_pid"] == tree.pid

    proc = cli("restore", "t1", "--agent", sock, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pid"] == tree.pid and report["name"] == "t1"
    assert {p["name"] for p in report["timings"]} >= {"checks", "criu-restore", "resume"}
    assert psutil.Process(report["pid"]).ppid() != agent.proc.pid  # detached from the agent
    back = Tree(tree.state, None, report["pid"])
    try:
        assert back.wait_progress()["counter"] > at_checkpoint  # state continues
    finally:
        back.kill()


def test_agent_errors_are_the_same_one_line_errors(agent: Agent, tmp_path: Path) -> None:
    sock = str(agent.socket)
    line = one_line_error(proc := cli("restore", "missing", "--agent", sock))
    assert "snapshot 'missing' not found" in line and proc.returncode == 2
    line = one_line_error(proc := cli("checkpoint", "--pid", "4999999", "--agent", sock))
    assert "no process with PID 4999999" in line and proc.returncode == 2
    # a process that listens on a specific non-loopback address: refused by the agent's
    # preflight, reported as the in-process command would (UsageError, exit 2)
    listener = _bound_listener(tmp_path)
    try:
        line = one_line_error(proc := cli("checkpoint", "--pid", str(listener.pid), "--agent", sock))
        assert "10.77.0.5:" in line and "--allow-bound-ip" in line and proc.returncode == 2
        assert listener.poll() is None
    finally:
        listener.kill()
        listener.wait()


def test_agent_down_is_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-agent.sock"
    line = one_line_error(proc := cli("checkpoint", "--pid", "1234", "--agent", str(missing)))
    assert proc.returncode == 69
    assert f"not reachable at {missing} (no such socket)" in line
    assert f"warmstart agent --socket {missing}" in line
    # a socket file nobody listens on (an agent that died), found through the env var
    import socket

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    line = one_line_error(cli("restore", "x", "--agent", env={"WARMSTART_AGENT_SOCKET": str(stale)}))
    assert f"not reachable at {stale} (nothing listens on it)" in line


def _bound_listener(tmp_path: Path) -> subprocess.Popen:
    """A process with a TCP listener bound to 10.77.0.5 (IP_FREEBIND: no such address here)."""
    ready = tmp_path / "bound-ready"
    code = ("import socket, sys, time, pathlib\n"
            "s = socket.socket(); s.setsockopt(socket.IPPROTO_IP, 15, 1)\n"
            "s.bind(('10.77.0.5', 0)); s.listen()\n"
            f"pathlib.Path({str(ready)!r}).write_text(str(s.getsockname()[1]))\n"
            "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(ready.exists, 20, what="the listener")
    return p


# -- containers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return build_base(tmp_path_factory.mktemp("image") / "rootfs")


@pytest.fixture
def containers(tmp_path: Path, base: Path, agent: Agent):
    made = []

    def container(cid: str, args: list[str], **kw):
        c = run_container(cid, base, tmp_path / "bundles", agent.runc_root, args, **kw)
        made.append(c)
        return c

    yield container
    for c in made:
        c.destroy()


def _counter(c) -> int:
    return int((c.rootfs / "data" / "counter").read_text().strip() or 0)


@pytest.mark.runc
def test_a_runc_container_through_the_agent(agent: Agent, containers) -> None:
    sock, root = str(agent.socket), str(agent.runc_root)
    orig = containers("orig", ["sh", "-c", COUNTER])
    wait_for(lambda: (orig.rootfs / "data/counter").exists() and _counter(orig) > 3, 20)
    proc = cli("checkpoint", "--container", "orig", "--name", "c1", "--agent", sock,
               "--runtime", "runc", "--runc-root", root, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["name"] == "c1" and report["bytes"] > 0
    assert "dump" in {p["name"] for p in report["timings"]}
    assert orig.status() == "stopped"

    ph = containers("ph", PLACEHOLDER_ARGS + ["sh", "-c", "sleep 1000"], env=PLACEHOLDER_ENV)
    wait_for(lambda: (ph.rootfs / "run/warmstart/placeholder-waiting").exists(), 20)
    proc = cli("restore", "c1", "--into", "ph", "--agent", sock, "--runtime", "runc",
               "--runc-root", root)
    assert proc.returncode == 0, proc.stderr
    assert "restore c1" in proc.stdout and "criu-restore" in proc.stdout
    assert "restored c1 into ph as PID" in proc.stdout
    first = _counter(ph)
    wait_for(lambda: _counter(ph) > first + 3, 20, what="the restored counter to advance")
    assert (ph.rootfs / "data/new.txt").read_text() == "changed\n"

    # a container snapshot is not restored as a bare process tree
    line = one_line_error(cli("restore", "c1", "--agent", sock))
    assert "is a container snapshot" in line and "--into" in line


@pytest.mark.runc
def test_ctrl_c_cancels_the_agents_operation(agent: Agent, containers) -> None:
    from warmstart.agent.client import AgentClient

    w = containers("c", ["sh", "-c", COUNTER], env={"SNAPSHOT_CONTROL_DIR": "/run/ctl"})
    wait_for(lambda: (w.rootfs / "data/counter").exists(), 20)
    cmd = [sys.executable, "-m", "warmstart", "checkpoint", "--container", "c", "--wait-ready",
           "--agent", str(agent.socket), "--runtime", "runc", "--runc-root", str(agent.runc_root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    with AgentClient(agent.socket) as c:
        op = wait_for(lambda: next((o for o in c.operations() if o["phase"] == "wait-ready"), None),
                      30, 0.1, "the checkpoint to wait for the worker")
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _out, err = proc.communicate(timeout=60)
        done = c.operation(op["id"])
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"operation {op['id']} cancelled" in lines[0], err
    assert done["state"] == "failed" and done["cancel_requested"] and "cancelled" in done["error"]
    assert w.status() == "running"
    n = _counter(w)
    wait_for(lambda: _counter(w) > n + 2, 20, what="the container to keep running")


@pytest.mark.runc
def test_a_container_listening_on_its_pod_ip_is_refused(agent: Agent, containers) -> None:
    """The check reads the container's own network namespace (/proc/PID/net/tcp there)."""
    code = ("import socket, time; s = socket.socket(); s.setsockopt(socket.IPPROTO_IP, 15, 1); "
            "s.bind(('10.244.1.7', 8080)); s.listen(); open('/data/up', 'w').close(); time.sleep(600)")
    w = containers("pod", ["/usr/bin/python3", "-c", code])
    wait_for(lambda: (w.rootfs / "data/up").exists(), 30, what="the listener")
    args = ("checkpoint", "--container", "pod", "--agent", str(agent.socket), "--runtime", "runc",
            "--runc-root", str(agent.runc_root))
    line = one_line_error(proc := cli(*args))
    assert proc.returncode == 2
    assert "TCP listener on 10.244.1.7:8080" in line and "--allow-bound-ip" in line
    assert w.status() == "running"
    assert not (agent.store / "pod").exists()


def test_agent_restart_mid_process_restore_kills_the_stopped_tree(agent: Agent, tree_factory) -> None:
    tree = tree_factory()
    assert cli("checkpoint", "--pid", str(tree.pid), "--name", "pr", "--agent",
               str(agent.socket)).returncode == 0
    tree.popen.wait(timeout=10)
    agent.stop()
    agent.start(WARMSTART_AGENT_PAUSE_AT="resume")  # CRIU has restored the tree, stopped
    with agent.client() as c:
        op = c.submit({"type": "restore", "snapshot": "pr"})
        wait_for(lambda: "paused at resume" in str(c.operation(op["id"])["logs"]), 60)
    assert psutil.Process(tree.pid).status() == psutil.STATUS_STOPPED  # same PID, never resumed
    agent.kill()
    agent.start()
    with agent.client() as c:
        after = c.operation(op["id"])
    assert after["state"] == "failed" and "(in resume)" in after["error"]
    assert f"killed half-restored PID {tree.pid}" in str(after["logs"])
    wait_for(lambda: not tree.alive(), 10, what="the stopped tree to be gone")
    # the PIDs are free again: a retry restores
    proc = cli("restore", "pr", "--agent", str(agent.socket), "--json")
    assert proc.returncode == 0, proc.stderr
    back = Tree(tree.state, None, json.loads(proc.stdout)["pid"])
    try:
        back.wait_progress()
    finally:
        back.kill()
