"""Bad input: one clear line on stderr, exit code != 0, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from _support import warmstart_cmd


def run(*args: str, env: dict[str, str] | None = None, user: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [*warmstart_cmd(), *args]
    if user:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def assert_clean_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.criu
def test_dead_pid(store_dir: Path) -> None:
    assert_clean_error(run("checkpoint", "--pid", "4999999", "--store", str(store_dir)), "no process with PID 4999999")


@pytest.mark.criu
def test_pid_one(store_dir: Path) -> None:
    assert_clean_error(run("checkpoint", "--pid", "1", "--store", str(store_dir)), "PID 1")


def test_snapshot_not_found(store_dir: Path) -> None:
    for args in (("inspect", "nope"), ("rm", "nope")):
        assert_clean_error(run(*args, "--store", str(store_dir)), "'nope' not found")


@pytest.mark.criu
def test_restore_not_found(store_dir: Path) -> None:
    assert_clean_error(run("restore", "nope", "--store", str(store_dir)), "'nope' not found")


@pytest.mark.criu
def test_bad_name(tree_factory, store_dir: Path) -> None:
    tree = tree_factory()
    assert_clean_error(
        run("checkpoint", "--pid", str(tree.pid), "--name", "../x", "--store", str(store_dir)),
        "invalid snapshot name",
    )
    assert tree.alive()


@pytest.mark.criu
def test_name_taken_leaves_worker_running(tree_factory, store_dir: Path) -> None:
    tree = tree_factory()
    (store_dir / "taken").mkdir(parents=True)
    assert_clean_error(
        run("checkpoint", "--pid", str(tree.pid), "--name", "taken", "--store", str(store_dir)),
        "already exists",
    )
    tree.wait_progress()


@pytest.mark.criu
def test_store_not_writable(tree_factory, tmp_path: Path) -> None:
    tree = tree_factory()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert_clean_error(
        run("checkpoint", "--pid", str(tree.pid), "--store", str(blocker / "store")),
        "cannot create snapshot store",
    )
    tree.wait_progress()


@pytest.mark.criu
def test_disk_full_leaves_worker_running_and_no_snapshot(tree_factory, tmp_path: Path) -> None:
    tree = tree_factory(mem_mib=96)
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mnt)], check=True)
    try:
        proc = run("checkpoint", "--pid", str(tree.pid), "--name", "full", "--store", str(mnt))
        assert_clean_error(proc)
        assert "space" in proc.stderr or "full" in proc.stderr
        tree.wait_progress()
        assert json.loads(run("ls", "--json", "--store", str(mnt)).stdout) == []
        assert not list((mnt / ".staging").iterdir())
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_criu_missing(store_dir: Path) -> None:
    proc = run("checkpoint", "--pid", str(os.getpid()), "--store", str(store_dir), env={"WARMSTART_CRIU": "/nonexistent/criu"})
    assert_clean_error(proc, "CRIU not found")


def test_criu_too_old(tmp_path: Path, store_dir: Path) -> None:
    fake = tmp_path / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17'\n")
    fake.chmod(0o755)
    proc = run("checkpoint", "--pid", str(os.getpid()), "--store", str(store_dir), env={"WARMSTART_CRIU": str(fake)})
    assert_clean_error(proc, "too old", "3.17")


@pytest.mark.criu
def test_not_root(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    proc = run("checkpoint", "--pid", str(os.getpid()), "--store", str(tmp_path / "s"), user="65534")
    assert_clean_error(proc, "need root")


def test_corrupt_manifest_and_unknown_version(store_dir: Path) -> None:
    (store_dir / "broken").mkdir(parents=True)
    (store_dir / "broken" / "manifest.json").write_text("{not json")
    assert_clean_error(run("inspect", "broken", "--store", str(store_dir)), "not valid JSON")
    (store_dir / "future").mkdir()
    (store_dir / "future" / "manifest.json").write_text(json.dumps({"format_version": 99}))
    assert_clean_error(run("inspect", "future", "--store", str(store_dir)), "format version 99")
    (store_dir / "empty").mkdir()
    assert_clean_error(run("inspect", "empty", "--store", str(store_dir)), "no manifest.json")
    listing = json.loads(run("ls", "--json", "--store", str(store_dir)).stdout)
    assert {e["name"]: bool(e["error"]) for e in listing} == {"broken": True, "empty": True, "future": True}


def test_bad_env_pair(store_dir: Path) -> None:
    assert_clean_error(run("restore", "x", "--env", "NOEQUALS", "--store", str(store_dir)))


def test_restore_trace_pages_refuses_a_missing_directory_and_the_agent(store_dir: Path, tmp_path: Path) -> None:
    assert_clean_error(run("restore", "x", "--trace-pages", str(tmp_path / "no" / "t.json"), "--store", str(store_dir)),
                       "--trace-pages: no directory")  # fmt: skip
    assert_clean_error(run("restore", "x", "--trace-pages", str(tmp_path / "t.json"), "--agent", str(tmp_path / "a.sock"),
                           "--store", str(store_dir)), "not by the node agent")  # fmt: skip

