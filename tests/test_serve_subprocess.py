"""The worker as a real process: two-phase start, the control-dir flow, and real CRIU."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from warmstart import protocol
from warmstart.serve.engine import Engine, EngineConfig, SamplingParams
from warmstart.serve.modelmake import make_model
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store.local import LocalStore
from warmstart.worker.preflight import inet_sockets

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPT = "Hello world, this is a warm start"
MAX_TOKENS = 12
ENGINE_ARGS = ["--device", "cpu", "--kv-cache-gib", "0.01", "--max-seq-len", "128", "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def reference_ids(model_dir):
    """Greedy output of a run that was never checkpointed."""
    eng = Engine(EngineConfig(model_dir, device="cpu", kv_cache_gib=0.01, max_seq_len=128, max_num_seqs=4))
    eng.warmup()
    try:
        return eng.generate(eng.encode(PROMPT), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)).output_ids
    finally:
        eng.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(tmp: Path, model: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "HOSTNAME": "original-host", "POD_NAME": "original", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "warmstart.serve", "--model", str(model), *ENGINE_ARGS, *extra],
        stdin=subprocess.DEVNULL,
        stdout=open(tmp / "worker.out", "wb"),
        stderr=open(tmp / "worker.err", "wb"),
        env=full_env,
        start_new_session=True,
    )


def wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def hand_over(cdir: Path, info: protocol.ReadyInfo, env: dict, checkpoint_id: str | None = None) -> None:
    ctx = protocol.RestoreContext(snapshot_id="snap-42", snapshot_name="tiny-warm", env=env,
                                  checkpoint_id=info.checkpoint_id if checkpoint_id is None else checkpoint_id)
    protocol.signal_file(cdir, protocol.RESTORE_CONTEXT, ctx)
    protocol.signal_file(cdir, protocol.RESTORE_COMPLETE)


def complete(port: int) -> list[int]:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def stop(proc_pid: int) -> None:
    try:
        os.kill(proc_pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        psutil.Process(proc_pid).wait(20)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        os.kill(proc_pid, signal.SIGKILL)


def test_two_phase_start_with_fake_checkpointer(tmp_path, model_dir, reference_ids):
    cdir, reg = tmp_path / "control", tmp_path / "registry"
    cdir.mkdir()
    proc = start_worker(tmp_path, model_dir, "--port", "0", "--register-dir", str(reg),
                        env={protocol.CONTROL_DIR_ENV: str(cdir)})
    try:
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        wait_for(ready.exists, 120, "ready-for-snapshot", tmp_path / "worker.err")
        info = protocol.read_model(ready, protocol.ReadyInfo)
        assert info.pid == proc.pid and info.labels["model"] == "tiny" and info.checkpoint_id
        # the checkpoint point: no listener, no TCP at all, nothing registered
        assert inet_sockets(proc.pid) == []
        assert psutil.Process(proc.pid).net_connections(kind="inet") == []
        assert not reg.exists() or list(reg.iterdir()) == []

        port = free_port()
        hand_over(cdir, info, {"POD_NAME": "replica-2", "HOSTNAME": "new-host", "POD_IP": "10.0.0.9",
                               "WARMSTART_PORT": str(port)})
        entry = reg / "replica-2.json"
        wait_for(entry.exists, 60, "registration", tmp_path / "worker.err")
        assert json.loads(entry.read_text()) == {"name": "replica-2", "host": "new-host", "ip": "10.0.0.9",
                                                 "port": port, "pid": proc.pid}
        # the app was built and warmed before the checkpoint point, and the warm-up left no trace
        assert httpx.get(f"http://127.0.0.1:{port}/ready").json()["startup"]["http_prepare_s"] > 0
        assert 'warmstart_requests_total{route="completions"' not in httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert complete(port) == reference_ids
        assert httpx.get(f"http://127.0.0.1:{port}/ready").json()["restored"] is True
    finally:
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not (reg / "replica-2.json").exists()  # deregistered on shutdown


def test_foreign_snapshot_id_is_a_clear_error(tmp_path, model_dir):
    cdir = tmp_path / "control"
    cdir.mkdir()
    proc = start_worker(tmp_path, model_dir, "--port", "0", env={protocol.CONTROL_DIR_ENV: str(cdir)})
    try:
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        wait_for(ready.exists, 120, "ready-for-snapshot", tmp_path / "worker.err")
        hand_over(cdir, protocol.read_model(ready, protocol.ReadyInfo), {}, checkpoint_id="0" * 32)
        assert proc.wait(60) == 2
    finally:
        if proc.poll() is None:
            stop(proc.pid)
    err = (tmp_path / "worker.err").read_text()
    assert "error: restore context is for checkpoint '000" in err and "Traceback" not in err


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "absent", "does not exist"),
    (lambda d: d, "has no config.json"),
])
def test_bad_model_dir_is_a_clear_error(tmp_path, setup, message):
    proc = start_worker(tmp_path, setup(tmp_path), "--port", "0")
    assert proc.wait(120) == 2
    err = (tmp_path / "worker.err").read_text()
    assert message in err and err.strip().splitlines()[-1].startswith("error:") and "Traceback" not in err


def test_kv_larger_than_memory_is_a_clear_error(tmp_path, model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.serve", "--model", str(model_dir), "--device", "cpu",
         "--kv-cache-gib", "1000000"],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "error: KV cache of 1e+06 GiB exceeds" in proc.stderr and "Traceback" not in proc.stderr



@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_criu_checkpoint_restore_end_to_end(tmp_path, model_dir, reference_ids):
    cdir, reg = tmp_path / "control", tmp_path / "registry"
    cdir.mkdir()
    proc = start_worker(tmp_path, model_dir, "--port", "0", "--register-dir", str(reg),
                        env={protocol.CONTROL_DIR_ENV: str(cdir)})
    pid = proc.pid
    try:
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        wait_for(ready.exists, 120, "ready-for-snapshot", tmp_path / "worker.err")
        info = protocol.read_model(ready, protocol.ReadyInfo)
        # through warmstart itself: checkpoint at the point, restore, hand over
        store = LocalStore(tmp_path / "store")
        labels = {"checkpoint_id": info.checkpoint_id} if info.checkpoint_id else {}
        checkpoint(pid, store=store, name="worker", options=CheckpointOptions(labels=labels))
        proc.wait(30)  # killed after the snapshot was published; reap it
        port = free_port()
        env = {"POD_NAME": "restored-1", "HOSTNAME": "replica-host", "WARMSTART_PORT": str(port)}
        restored = restore("worker", store=store, request=RestoreRequest(control_dir=cdir, env=env))
        assert restored.pid == pid
        entry = reg / "restored-1.json"
        wait_for(entry.exists, 60, "registration of the restored worker", tmp_path / "worker.err")
        assert json.loads(entry.read_text())["port"] == port
        assert complete(port) == reference_ids  # first request after restore: same greedy output
        assert httpx.get(f"http://127.0.0.1:{port}/ready").json()["restored"] is True
    finally:
        if psutil.pid_exists(pid):
            stop(pid)
