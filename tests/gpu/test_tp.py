"""A tensor-parallel (TP=2, NCCL) worker checkpointed and restored on two GPUs.

Needs two GPUs of one model, root and CRIU. Unattended:

    bash scripts/gpu-test.sh tests/gpu/test_tp.py

What it checks, end to end through warmstart.snapshot:

* cold TP=2 start on GPUs 0,1 (one rank process each, NCCL), greedy reference tokens;
* a second TP=2 worker with a control dir reaches its checkpoint point with no inet
  socket in any process (NCCL/gloo and the TCPStore torn down), CUDA graphs dropped;
* checkpoint: both rank processes' CUDA state is locked and checkpointed together
  (the manifest records two CUDA processes on two GPUs);
* restore onto the same GPUs and (with ``--gpu-map 0=1,1=0``) onto swapped GPUs:
  the group rebuilds with a new rendezvous port, the decode graph is re-captured,
  greedy tokens are identical to the cold worker's. (Every rank gets the whole GPU map:
  with only its own pair the driver refuses the swapped restore; docs/multi-gpu.md.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
psutil = pytest.importorskip("psutil")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA GPUs"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CRIU)"),
]

import warmstart  # noqa: E402
from warmstart import protocol  # noqa: E402

SRC = str(Path(warmstart.__file__).resolve().parents[1])
PROMPTS = ["The capital of France is", "Hello world, this is a warm start", "def main():"]
MAX_TOKENS = 16
ARGS = ["--device", "cuda", "--gpus", "0,1", "--kv-cache-gib", "1", "--max-seq-len", "512",
        "--max-num-seqs", "4", "--tensor-parallel", "2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from warmstart.serve.modelmake import make_model

    return make_model("qwen3-0.6b", tmp_path_factory.mktemp("m") / "q")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp: Path, model: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    full.pop("CUDA_VISIBLE_DEVICES", None)
    return subprocess.Popen([sys.executable, "-m", "warmstart.serve", "--model", str(model), *ARGS, *extra],
                            stdin=subprocess.DEVNULL, stdout=open(tmp / "out", "ab"),
                            stderr=open(tmp / "err", "ab"), env=full, start_new_session=True)


def wait_for(pred, timeout: float, what: str, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if value := pred():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-4000:] if log else ''}")


def ready(port: int) -> dict | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def greedy(port: int) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                       json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                             "return_token_ids": True})
        assert r.status_code == 200, r.text
        out.append(r.json()["choices"][0]["token_ids"])
    return out


def tree(pid: int) -> list[int]:
    """The launcher, then its ranks in rank order."""
    ranks = {int(c.environ()["WARMSTART_TP_RANK"]): c.pid for c in psutil.Process(pid).children()}
    return [pid, *(ranks[r] for r in sorted(ranks))]


def stop_tree(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 60, "worker processes to be reaped")


@pytest.fixture(scope="module")
def cold_tokens(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("cold")
    port = free_port()
    proc = start(tmp, model_dir, "--port", str(port))
    try:
        def up() -> dict | None:
            if proc.poll() is not None:
                raise AssertionError(f"cold worker exited\n{(tmp / 'err').read_text()[-4000:]}")
            return ready(port)

        info = wait_for(up, 600, "cold TP=2 worker", tmp / "err")
        assert info["cuda_graphs"].startswith("captured"), info
        return greedy(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, model_dir):
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.store.local import LocalStore
    from warmstart.worker.preflight import inet_sockets

    tmp = tmp_path_factory.mktemp("tp")
    cdir = tmp / "control"
    cdir.mkdir()
    proc = start(tmp, model_dir, "--port", "0", env={protocol.CONTROL_DIR_ENV: str(cdir)})
    def at_point() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}\n{(tmp / 'err').read_text()[-4000:]}")
        return (cdir / protocol.READY_FOR_SNAPSHOT).exists()

    wait_for(at_point, 600, "ready-for-snapshot", tmp / "err")
    info = protocol.read_model(cdir / protocol.READY_FOR_SNAPSHOT, protocol.ReadyInfo)
    pids = tree(proc.pid)
    assert info.pid == proc.pid and len(pids) == 3
    assert all(inet_sockets(p) == [] for p in pids), {p: inet_sockets(p) for p in pids}
    assert info.labels["cuda_graphs"] == "dropped for the checkpoint"
    store = LocalStore(tmp / "store")
    result = checkpoint(proc.pid, store=store, name="tp2",
                        options=CheckpointOptions(labels={"checkpoint_id": info.checkpoint_id or ""}))
    proc.wait(60)
    return {"tmp": tmp, "cdir": cdir, "store": store, "pids": pids, "manifest": result.manifest}


def test_checkpoint_holds_both_ranks_gpu_state(snapshot):
    gpus = snapshot["manifest"].gpus
    assert len({g.pid for g in gpus}) == 2 and len({g.gpu_uuid for g in gpus}) == 2, gpus


@pytest.mark.parametrize("gpu_map", [(), ("0=1", "1=0")],
                         ids=["same-gpus", "swapped-gpus"])
def test_restore_rebuilds_and_serves_identical_tokens(snapshot, cold_tokens, gpu_map):
    from warmstart.snapshot.restore import RestoreRequest, restore

    wait_for(lambda: not any(psutil.pid_exists(p) for p in snapshot["pids"]), 60, "PIDs free")
    for stale in (protocol.RESTORE_COMPLETE, protocol.RESTORE_CONTEXT):
        (snapshot["cdir"] / stale).unlink(missing_ok=True)
    port = free_port()
    from warmstart.errors import CriuError

    try:
        restored = restore("tp2", store=snapshot["store"], request=RestoreRequest(
            gpu_map=gpu_map, control_dir=snapshot["cdir"], env={"WARMSTART_PORT": str(port)}))
    except CriuError as exc:
        log = Path(exc.log).read_text() if exc.log and Path(exc.log).exists() else ""
        raise AssertionError(f"{exc}\n{log[-6000:]}") from None
    try:
        def up() -> dict | None:
            if not psutil.pid_exists(restored.pid):
                raise AssertionError(f"restored worker exited\n{(snapshot['tmp'] / 'err').read_text()[-4000:]}")
            return ready(port)

        info = wait_for(up, 300, "restored TP=2 worker", snapshot["tmp"] / "err")
        assert info["restored"] is True
        assert info["cuda_graphs"].startswith("captured"), info  # re-captured on the new communicator
        gens = info["tensor_parallel"]["rendezvous"]
        assert len(gens) == 2 and gens[1]["port"] != gens[0]["port"]
        if gpu_map:
            src = {g.pid: g.gpu_uuid for g in snapshot["manifest"].gpus}
            assert info["tensor_parallel"]["gpu_map"], info
            rank0_before = src[snapshot["pids"][1]]
            assert info["tensor_parallel"]["gpu_map"][rank0_before] == info["tensor_parallel"]["gpu_uuid"]
            assert info["tensor_parallel"]["gpu_uuid"] != rank0_before  # rank 0 now runs on the other GPU
        assert greedy(port) == cold_tokens
    finally:
        stop_tree([restored.pid, *snapshot["pids"][1:]])
