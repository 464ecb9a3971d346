"""Helpers for the remote-store tests: fake local snapshots and a real S3 server (moto) on loopback."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support import wait_for

from warmstart.snapshot.manifest import FileEntry, HostInfo, Manifest, ProcessTree
from warmstart.store.integrity import digest_file
from warmstart.store.local import LocalStore

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def make_snapshot(store: LocalStore, name: str, files: dict[str, bytes]) -> Manifest:
    """Publish a snapshot directory holding ``files`` (paths relative to it) with a valid manifest."""
    staging = store.begin(name)
    for rel, data in files.items():
        path = staging.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o600)
    entries = []
    for rel in sorted(files):
        size, digest = digest_file(staging.path / rel)
        entries.append(FileEntry(path=rel, size=size, digest=digest))
    manifest = Manifest(
        snapshot_id=uuid.uuid4().hex,
        name=name,
        created_at=dt.datetime.now(dt.timezone.utc),
        source=HostInfo(hostname="test", kernel="6", arch="x86_64", cpu_model="cpu", criu_version="4.1"),
        tree=ProcessTree(root_pid=1234, processes=[]),
        files=entries,
    )
    store.publish(staging, manifest, durable=False)
    return manifest


def pages(seed: int, mib: int) -> bytes:
    """Deterministic pseudo-random 'memory' of ``mib`` MiB."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 2**63, size=(mib << 20) // 8, dtype=np.int64).tobytes()


def snapshot_files(seed: int, mib: int = 8) -> dict[str, bytes]:
    return {
        "images/pages-1.img": pages(seed, mib),
        "images/pagemap-1.img": os.urandom(3000),
        "images/core-1.img": b"core" * 100,
        "logs/dump.log": b"dump ok\n",
        "images/empty.img": b"",
    }


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server process on loopback (real HTTP, real boto3 client)."""
    pytest.importorskip("moto.server", reason="needs moto[server] (pip install 'warmstart[test]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    try:
        wait_for(up, 60, 0.1, what="moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import boto3

    for k, v in {**S3_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"ws-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/team/snapshots"


@pytest.fixture
def file_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'remote'}"


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue(f"{request.param}_url")
