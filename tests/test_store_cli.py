"""The remote-store commands end to end, as subprocesses: push, pull, store, key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _store_support import make_snapshot, snapshot_files, tree_bytes
from _support import wait_for

from warmstart.store.local import LocalStore
from warmstart.store.remote import RemoteStore

SRC = Path(__file__).resolve().parents[1] / "src"


def cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("WARMSTART_TRUSTED_KEYS", "WARMSTART_REQUIRE_SIGNED")}
    full_env = {**base, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart", *args], capture_output=True, text=True, timeout=120, env=full_env
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def one_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def test_push_sign_pull_trust_stats_gc(store_url: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_snapshot(LocalStore(src), "w", snapshot_files(21, mib=4))
    keys = tmp_path / "keys"
    gen = json.loads(cli("key", "generate", "prod", "--dir", str(keys), "--json").stdout)
    assert Path(gen["private_key"]).stat().st_mode & 0o777 == 0o600
    rogue = json.loads(cli("key", "generate", "rogue", "--dir", str(keys), "--json").stdout)
    assert rogue["key_id"] != gen["key_id"]

    pushed = json.loads(cli("push", "w", store_url, "--sign", gen["private_key"], "--store", str(src), "--json").stdout)
    assert pushed["signed_by"] == gen["key_id"] and pushed["uploaded_chunks"] == pushed["chunks"]
    cli("push", "w", store_url, "--as", "w-rogue", "--sign", str(keys / "rogue.key"), "--store", str(src))
    cli("push", "w", store_url, "--as", "w-plain", "--store", str(src))

    trust = {"WARMSTART_TRUSTED_KEYS": gen["public_key"]}
    one_error(cli("pull", store_url, "w-rogue", "--store", str(dst), env=trust, check=False), "unknown key")
    one_error(cli("pull", store_url, "w-plain", "--store", str(dst), env=trust, check=False), "unsigned")
    assert not (dst / "w-rogue").exists() and not (dst / "w-plain").exists()
    pulled = json.loads(cli("pull", store_url, "w", "--store", str(dst), "--json", env=trust).stdout)
    assert pulled["trust"]["trusted"] and pulled["trust"]["key_name"] == "prod"
    assert tree_bytes(dst / "w") == tree_bytes(src / "w")
    assert json.loads(cli("ls", "--store", str(dst), "--json").stdout)[0]["name"] == "w"

    listed = json.loads(cli("store", "ls", store_url, "--json").stdout)
    assert {s["name"]: s["signed_by"] for s in listed} == {
        "w": gen["key_id"], "w-plain": None, "w-rogue": rogue["key_id"],
    }  # fmt: skip
    stats = json.loads(cli("store", "stats", store_url, "--json").stdout)
    assert stats["snapshots"] == 3 and stats["dedup_ratio"] == pytest.approx(3.0, rel=0.01)
    assert "dedup" in cli("store", "stats", store_url).stdout
    checked = json.loads(cli("store", "verify", store_url, "--json").stdout)
    assert checked["chunks"] == stats["chunks"] and checked["bad"] == []

    cli("store", "rm", store_url, "w-rogue", "w-plain", "w")
    gc = json.loads(cli("store", "gc", store_url, "--grace", "0", "--json").stdout)
    assert gc["deleted_chunks"] == stats["chunks"]
    assert json.loads(cli("store", "stats", store_url, "--json").stdout)["stored_bytes"] == 0


def test_clean_errors(file_url: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_snapshot(LocalStore(src), "w", snapshot_files(22, mib=1))
    one_error(cli("pull", file_url, "nope", "--store", str(tmp_path / "d"), check=False), "not found")
    one_error(cli("push", "w", "ftp://host/x", "--store", str(src), check=False), "scheme")
    one_error(cli("push", "w", file_url, "--store", str(src), "--sign", "/nonexistent.key", check=False), "no signing key")
    one_error(cli("push", "w", file_url, "--store", str(src), "--chunk-size", "3", check=False), "power of two")
    one_error(cli("checkpoint", "--pid", "1", "--store", str(src), "--sign", "/x.key", check=False), "--sign needs")
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-rsa AAAA x\n")
    cli("push", "w", file_url, "--store", str(src))
    one_error(
        cli("pull", file_url, "w", "--store", str(tmp_path / "d"), "--trusted-keys", str(bad), check=False),
        "not a warmstart public key",
    )
    one_error(cli("pull", file_url, "w", "--store", str(tmp_path / "d"), "--require-signed", check=False), "no trusted keys")
    # a damaged index is one clear line too
    index = Path(file_url.removeprefix("file://")) / "snapshots" / "w.json"
    index.write_text('{"format": "warmstart-index/1", "index": "{}", "signature": null}')
    one_error(cli("pull", file_url, "w", "--store", str(tmp_path / "d"), check=False), "format version")


def test_kill_mid_upload_then_resume(store_url: str, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_snapshot(LocalStore(src), "big", snapshot_files(23, mib=24))
    remote = RemoteStore.open(store_url)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "warmstart", "push", "big", store_url, "--store", str(src), "--jobs", "2",
         "--chunk-size", "1", "--limit-rate", "8", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        wait_for(lambda: len(list(remote.backend.list("chunks/"))) >= 4, 60, 0.05, what="some chunks uploaded")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    sent_before = len(list(remote.backend.list("chunks/")))
    # the half-uploaded snapshot is invisible
    assert remote.snapshots() == []
    one_error(cli("pull", store_url, "big", "--store", str(dst), check=False), "not found")
    again = json.loads(cli("push", "big", store_url, "--store", str(src), "--chunk-size", "1", "--json").stdout)
    assert again["present_chunks"] >= sent_before > 0
    assert again["uploaded_chunks"] == again["chunks"] - again["present_chunks"]
    cli("pull", store_url, "big", "--store", str(dst))
    assert tree_bytes(dst / "big") == tree_bytes(src / "big")


@pytest.mark.criu
def test_checkpoint_to_url_and_restore_from_url(tree_factory, s3_url: str, tmp_path: Path) -> None:
    """A real CRIU snapshot crosses an S3 store, signed, to a 'second node' that trusts the key."""
    from _support import Tree

    tree = tree_factory(mem_mib=64)
    before = tree.digests()
    keys = tmp_path / "keys"
    cli("key", "generate", "node", "--dir", str(keys))
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    taken = json.loads(
        cli(
            "checkpoint", "--pid", str(tree.pid), "--name", "crossed", "--store", s3_url,
            "--sign", str(keys / "node.key"), "--json", env={"WARMSTART_STORE": str(node_a)},
        ).stdout
    )  # fmt: skip
    assert taken["pushed"]["uploaded_bytes"] > 64 << 20 and (node_a / "crossed").is_dir()
    tree.popen.wait(timeout=10)
    at_checkpoint = tree.status()

    # an untrusting node refuses before it pulls a byte
    refused = cli(
        "restore", f"{s3_url}/crossed", "--store", str(node_b), check=False,
        env={"WARMSTART_TRUSTED_KEYS": str(tmp_path / "nobody.pub")},
    )  # fmt: skip
    one_error(refused, "does not exist")
    other = tmp_path / "other-keys"
    cli("key", "generate", "other", "--dir", str(other))
    one_error(
        cli("restore", f"{s3_url}/crossed", "--store", str(node_b), check=False,
            env={"WARMSTART_TRUSTED_KEYS": str(other)}),
        "unknown key",
    )  # fmt: skip
    assert not (node_b / "crossed").exists()

    restored = json.loads(
        cli("restore", f"{s3_url}/crossed", "--store", str(node_b), "--json",
            env={"WARMSTART_TRUSTED_KEYS": str(keys)}).stdout
    )  # fmt: skip
    back = Tree(tree.state, None, restored["pid"])
    try:
        now = back.wait_progress()
        assert now["counter"] > at_checkpoint["counter"]
        assert back.digests() == before
    finally:
        back.kill()
    assert (node_b / "crossed" / "manifest.json").is_file()
