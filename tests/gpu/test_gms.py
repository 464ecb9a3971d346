"""The GPU memory service on a real GPU: CUDA VMM export/import, two workers sharing one
copy, checkpoint -> restore with the service, and a service restart under a running worker.

Run as root on the GPU machine:  bash scripts/gpu-test.sh tests/gpu/test_gms.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

from warmstart import protocol  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
PROMPT = "The capital of France is"
WORKER_ARGS = ["--device", "cuda", "--kv-cache-gib", "1", "--max-seq-len", "512", "--max-num-seqs", "4"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


def wait_for(pred, timeout: float, what: str, log: Path | None = None):  # type: ignore[no-untyped-def]
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):  # type: ignore[no-untyped-def]
    from warmstart.serve.modelmake import make_model

    return make_model("qwen3-0.6b", tmp_path_factory.mktemp("m") / "qwen3")


class Service:
    def __init__(self, tmp: Path, name: str = "gms") -> None:
        self.sock = tmp / f"{name}.sock"
        self.log = tmp / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmstart", "gms", "serve", "--gpu", "0", "--socket", str(self.sock)],
            env=_env(), stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"), start_new_session=True,
        )  # fmt: skip
        # A killed predecessor leaves its socket file behind: wait until this one answers.
        wait_for(lambda: self.answers() or self.proc.poll() is not None, 120, "service socket", self.log)
        assert self.proc.poll() is None, self.log.read_text()

    def answers(self) -> bool:
        from warmstart.errors import GmsUnavailable

        try:
            self.status()
        except GmsUnavailable:
            return False
        return True

    def status(self):  # type: ignore[no-untyped-def]
        from warmstart.gms.client import status

        return status(str(self.sock))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def services(tmp_path: Path):  # type: ignore[no-untyped-def]
    made: list[Service] = []

    def start(name: str = "gms") -> Service:
        made.append(Service(tmp_path, name))
        return made[-1]

    yield start
    for s in made:
        s.kill()


class Worker:
    def __init__(self, tmp: Path, model: Path, sock: Path | None, name: str, control: Path | None = None) -> None:
        self.port = _free_port()
        self.log = tmp / f"{name}.log"
        extra = ["--weights-from-gms", str(sock)] if sock else []
        env = _env(**({protocol.CONTROL_DIR_ENV: str(control)} if control else {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "warmstart.serve", "--model", str(model), *WORKER_ARGS,
             "--port", str(self.port), *extra],
            env=env, stdin=subprocess.DEVNULL, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.pid = self.proc.pid

    def wait_ready(self, port: int | None = None, pid: int | None = None) -> None:
        """Until the worker answers on ``port``; ``pid`` is the restored process to watch
        (the original, killed at the checkpoint, is no sign of failure then)."""

        def gone() -> bool:
            if pid is None:
                return self.proc.poll() is not None
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(lambda: _ready(port or self.port) or gone(), 300, "worker ready", self.log)
        assert _ready(port or self.port), self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if psutil.pid_exists(self.pid):
            os.kill(self.pid, signal.SIGTERM)
            try:
                psutil.Process(self.pid).wait(30)
            except psutil.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def complete(port: int) -> list[int]:
    import httpx

    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                   json={"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


# ------------------------------------------------------------------------------ tests


def test_cuda_vmm_export_import_map_roundtrip(tmp_path: Path) -> None:
    """The ctypes layer on the real driver: create exportable memory, fill it from a file
    through pinned buffers and streams, import the fd, map it read-only at our address."""
    from warmstart.gms.cuda import CudaClient, CudaServer
    from warmstart.gms.layout import TensorSpec, digest_file
    from warmstart.gms.loader import FillFile, fill

    data = torch.randint(0, 256, (150 << 20,), dtype=torch.uint8)  # spans three 64 MiB chunks
    f = tmp_path / "blob"
    f.write_bytes(b"HDR!" + data.numpy().tobytes())
    srv = CudaServer(0)
    size = -(-data.numel() // srv.granularity) * srv.granularity
    handle = srv.create(size)
    target = srv.open_fill(handle, size)
    result = fill(srv, [FillFile("blob", str(f), 4, data.numel(), target)], lanes=3)
    srv.close_fill(target, size)
    assert result.digests["blob"] == digest_file(f, 4)
    fd = srv.export(handle)
    assert fd >= 0

    cli = CudaClient(torch.cuda.current_device())
    addr = cli.reserve(size)
    local = cli.import_fd(fd)
    os.close(fd)
    cli.map(addr, size, local, writable=False)
    t = cli.tensor(addr, TensorSpec(name="blob", dtype="U8", shape=(data.numel(),), start=0, end=data.numel()))
    assert t.data_ptr() == addr and torch.equal(t.cpu(), data)
    srv.release(handle)  # the service's reference goes; the worker's import keeps the memory
    torch.cuda.synchronize()
    assert torch.equal(t.cpu(), data)
    cli.synchronize()
    cli.unmap(addr, size)
    cli.release(local)
    cli.free(addr, size)
    cli.close()
    srv.close()


def test_cuda_park_and_unpark_move_the_bytes_through_pinned_host_memory(tmp_path: Path) -> None:
    """The host tier on the real driver: device -> pinned host -> a new allocation."""
    from warmstart.gms.cuda import CudaServer
    from warmstart.gms.loader import FillFile, fill

    data = torch.randint(0, 256, (300 << 20,), dtype=torch.uint8)  # more than one 256 MiB copy piece
    f = tmp_path / "blob"
    f.write_bytes(data.numpy().tobytes())
    srv = CudaServer(0)
    size = -(-data.numel() // srv.granularity) * srv.granularity
    handle = srv.create(size)
    target = srv.open_fill(handle, size)
    fill(srv, [FillFile("blob", str(f), 0, data.numel(), target)], lanes=2)
    srv.close_fill(target, size)
    host = srv.park(handle, size, data.numel())
    srv.release(handle)
    assert host.nbytes == data.numel()
    again = srv.create(size)
    srv.unpark(host, again, size)
    srv.free_host(host)
    n = data.numel()
    for off in (0, 1 << 20, (256 << 20) - 7, n - 4096):  # across the copy pieces
        assert srv.read_back(again, size, off, 4096) == data[off : off + 4096].numpy().tobytes()
    srv.release(again)
    srv.close()


def test_a_parked_model_comes_back_for_the_next_worker(tmp_path: Path, qwen: Path, services) -> None:  # type: ignore[no-untyped-def]
    from warmstart.gms.client import evict

    svc = services()
    first = Worker(tmp_path, qwen, svc.sock, "first")
    try:
        first.wait_ready()
        expected = complete(first.port)
    finally:
        first.stop()
    wait_for(lambda: all(e.readers == 0 for e in svc.status().entries), 60, "the worker's detach")
    (before,) = svc.status().entries
    assert evict(str(svc.sock), timeout=300, keep_host=True) == [before.entry_id]
    (parked,) = svc.status().entries
    assert parked.state == "parked" and parked.host_bytes == parked.bytes
    second = Worker(tmp_path, qwen, svc.sock, "second")
    try:
        second.wait_ready()
        assert complete(second.port) == expected
        (back,) = svc.status().entries
        assert back.state == "ready" and back.layout_hash == before.layout_hash
        print(f"copied back {back.bytes / 1e9:.2f} GB at {back.fill_gb_per_s:.1f} GB/s")
    finally:
        second.stop()


def test_two_workers_share_one_copy(tmp_path: Path, qwen: Path, services) -> None:  # type: ignore[no-untyped-def]
    svc = services()
    inproc = Worker(tmp_path, qwen, None, "inproc")
    try:
        inproc.wait_ready()
        expected = complete(inproc.port)
    finally:
        inproc.stop()
    a = Worker(tmp_path, qwen, svc.sock, "a")
    b = Worker(tmp_path, qwen, svc.sock, "b")
    try:
        a.wait_ready()
        b.wait_ready()
        (entry,) = svc.status().entries  # one copy of the weights on the GPU
        assert entry.readers == 2 and entry.state == "ready"
        assert complete(a.port) == complete(b.port) == expected
    finally:
        a.stop()
        b.stop()


@pytest.mark.criu
def test_checkpoint_restore_with_the_service(tmp_path: Path, qwen: Path, services) -> None:  # type: ignore[no-untyped-def]
    from warmstart.gms.preflight import prepare_restore
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.snapshot.restore import RestoreRequest, restore
    from warmstart.store.local import LocalStore

    svc = services()
    cdir = tmp_path / "control"
    cdir.mkdir()
    w = Worker(tmp_path, qwen, svc.sock, "ckpt", control=cdir)
    restored_pid = None
    try:
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        wait_for(ready.exists, 300, "ready-for-snapshot", w.log)
        info = protocol.read_model(ready, protocol.ReadyInfo)
        assert info.labels["gms.layout_hash"].startswith("sha256:")
        store = LocalStore(tmp_path / "store")
        taken = checkpoint(w.pid, store=store, name="q",
                           options=CheckpointOptions(labels={"checkpoint_id": info.checkpoint_id or "", **info.labels}))
        w.proc.wait(60)
        weights_bytes = int(info.labels["gms.weights_bytes"])
        print(f"snapshot {taken.manifest.total_bytes / 1e9:.2f} GB, weights {weights_bytes / 1e9:.2f} GB")
        print(f"GPU state {sum(g.device_memory_bytes for g in taken.manifest.gpus) / 1e9:.2f} GB")
        weights = sorted(qwen.glob("*.safetensors"))[0].read_bytes()
        needle = weights[len(weights) // 2 : len(weights) // 2 + 512]
        for p in (store.root / "q").rglob("*"):
            if p.is_file():
                assert needle not in p.read_bytes(), f"weights found in {p}"

        pre = prepare_restore(taken.manifest.labels)
        assert pre is not None and pre.state == "resident"
        port = _free_port()
        result = restore("q", store=store, request=RestoreRequest(control_dir=cdir, env={"WARMSTART_PORT": str(port)}))
        restored_pid = result.pid
        w.wait_ready(port, pid=restored_pid)
        after = complete(port)
        (entry,) = svc.status().entries
        assert entry.readers == 1

        fresh = Worker(tmp_path, qwen, svc.sock, "fresh")  # never checkpointed, same weights
        try:
            fresh.wait_ready()
            assert after == complete(fresh.port)
        finally:
            fresh.stop()
    finally:
        w.stop()
        if restored_pid and psutil.pid_exists(restored_pid):
            os.kill(restored_pid, signal.SIGKILL)


def test_service_restart_while_a_worker_runs(tmp_path: Path, qwen: Path, services) -> None:  # type: ignore[no-untyped-def]
    from warmstart.errors import GmsUnavailable
    from warmstart.gms.client import GmsWeights

    svc = services("svc1")
    w = Worker(tmp_path, qwen, svc.sock, "runner")
    try:
        w.wait_ready()
        before = complete(w.port)
        svc.kill()
        assert complete(w.port) == before  # its imported handles keep the weights alive
        with pytest.raises(GmsUnavailable):
            GmsWeights(svc.sock, qwen, connect_timeout=5).attach()
        svc2 = services("svc1")  # same socket path: the stale socket is replaced
        assert svc2.status().entries == []  # adopts nothing it did not allocate
        second = Worker(tmp_path, qwen, svc2.sock, "second")
        try:
            second.wait_ready()
            assert complete(second.port) == before
            assert complete(w.port) == before
        finally:
            second.stop()
    finally:
        w.stop()
