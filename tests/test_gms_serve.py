"""The reference worker with ``--weights-from-gms`` on CPU (memfd service): same output
as in-process weights, parameters that alias the service's memory, and a real CRIU
checkpoint/restore whose snapshot holds no weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from warmstart import protocol  # noqa: E402
from warmstart.errors import GmsUnavailable  # noqa: E402
from warmstart.gms.backend import MemfdServer  # noqa: E402
from warmstart.gms.client import status  # noqa: E402
from warmstart.gms.server import GmsServer  # noqa: E402
from warmstart.serve.engine import Engine, EngineConfig, SamplingParams  # noqa: E402
from warmstart.serve.main import _gms_labels  # noqa: E402
from warmstart.serve.modelmake import make_model  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPT = "Hello world, this is a warm start"
KW = dict(device="cpu", kv_cache_gib=0.01, max_seq_len=128, max_num_seqs=2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def reference_ids(model_dir):
    eng = Engine(EngineConfig(model_dir, **KW))
    eng.warmup()
    try:
        return greedy(eng)
    finally:
        eng.close()


def greedy(eng: Engine) -> list[int]:
    return eng.generate(eng.encode(PROMPT), SamplingParams(max_tokens=12, ignore_eos=True)).output_ids


def test_engine_with_weights_from_the_service(tmp_path, model_dir, reference_ids):
    srv = GmsServer(tmp_path / "gms.sock", MemfdServer(), lanes=2)
    srv.start()
    try:
        eng = Engine(EngineConfig(model_dir, weights_from_gms=srv.socket_path, **KW))
        eng.warmup()
        try:
            assert greedy(eng) == reference_ids
            mapped = {t.data_ptr() for t in eng.weights.tensors.values()}
            params = {p.data_ptr() for p in eng.model.parameters()}
            assert params <= mapped  # every parameter aliases the service's memory
            assert eng.model.lm_head.weight.data_ptr() == eng.model.model.embed_tokens.weight.data_ptr()

            labels = _gms_labels(eng)
            assert labels["gms.layout_hash"] == eng.weights.layout_hash
            files = json.loads(labels["gms.files"])
            assert files[0]["name"] == "model.safetensors" and files[0]["digest"].startswith("xxh3-128-c64m:")

            eng.release_kv()
            assert not eng.weights.attached
            assert status(srv.socket_path).entries[0].state == "ready"
            eng.reacquire_kv()
            assert greedy(eng) == reference_ids
        finally:
            eng.close()
    finally:
        srv.close()


def test_engine_without_a_service_is_a_clear_error(tmp_path, model_dir):
    with pytest.raises(GmsUnavailable, match="no GPU memory service socket"):
        Engine(EngineConfig(model_dir, weights_from_gms=str(tmp_path / "none.sock"), **KW))



@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_snapshot_without_weights_restores_and_reattaches(tmp_path, model_dir, reference_ids):
    import httpx
    import psutil
    from test_serve_subprocess import complete, free_port, stop, wait_for

    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.snapshot.restore import RestoreRequest, restore
    from warmstart.store.local import LocalStore

    sock = tmp_path / "gms.sock"
    env = {**os.environ, "PYTHONPATH": SRC}
    svc = subprocess.Popen([sys.executable, "-m", "warmstart", "gms", "serve", "--memfd", "--socket", str(sock)],
                           env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "gms.err", "wb"),
                           start_new_session=True)  # fmt: skip
    cdir = tmp_path / "control"
    cdir.mkdir()
    worker = None
    try:
        wait_for(sock.exists, 60, "the service's socket")
        worker = subprocess.Popen(
            [sys.executable, "-m", "warmstart.serve", "--model", str(model_dir), "--device", "cpu",
             "--kv-cache-gib", "0.01", "--max-seq-len", "128", "--max-num-seqs", "4", "--port", "0",
             "--weights-from-gms", str(sock)],
            env={**env, protocol.CONTROL_DIR_ENV: str(cdir)}, stdin=subprocess.DEVNULL,
            stdout=open(tmp_path / "worker.out", "wb"), stderr=open(tmp_path / "worker.err", "wb"),
            start_new_session=True,
        )  # fmt: skip
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        wait_for(ready.exists, 120, "ready-for-snapshot", tmp_path / "worker.err")
        info = protocol.read_model(ready, protocol.ReadyInfo)
        assert info.labels["gms.layout_hash"].startswith("sha256:")
        store = LocalStore(tmp_path / "store")
        taken = checkpoint(worker.pid, store=store, name="w",
                           options=CheckpointOptions(labels={"checkpoint_id": info.checkpoint_id or "", **info.labels}))
        worker.wait(30)
        assert taken.manifest.labels["gms.layout_hash"] == info.labels["gms.layout_hash"]

        # the weights are not in the snapshot: no image holds a slice of them
        weights = (model_dir / "model.safetensors").read_bytes()
        needle = weights[len(weights) // 2 : len(weights) // 2 + 512]
        images = [p for p in (store.root / "w").rglob("*") if p.is_file()]
        assert images and not any(needle in p.read_bytes() for p in images)

        port = free_port()
        restored = restore("w", store=store, request=RestoreRequest(
            control_dir=cdir, env={"WARMSTART_PORT": str(port)}))  # fmt: skip
        wait_for(lambda: _listening(port), 60, "the restored worker", tmp_path / "worker.err")
        assert complete(port) == reference_ids
        assert httpx.get(f"http://127.0.0.1:{port}/ready").json()["restored"] is True
        (entry,) = status(str(sock)).entries
        assert entry.readers == 1 and entry.layout_hash == info.labels["gms.layout_hash"]
        stop(restored.pid)
    finally:
        if worker is not None and psutil.pid_exists(worker.pid):
            stop(worker.pid)
        svc.terminate()
        svc.wait(30)


def _listening(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_restore_bench_runs_on_cpu(tmp_path):
    """bench/gms_restore.py end to end with the memfd service and the tiny model (the GPU
    run differs only in device and size)."""
    bench = Path(__file__).resolve().parents[1] / "bench" / "gms_restore.py"
    out = tmp_path / "res.json"
    proc = subprocess.run(
        [sys.executable, str(bench), "--device", "cpu", "--config", "tiny", "--kv-gib", "0.01",
         "--work", str(tmp_path / "w"), "--out", str(out)],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(out.read_text())["summary"]
    for key in ("gms_resident_first_token_s", "gms_streamed_first_token_s", "naive_first_token_s",
                "cold_first_token_s", "snapshot_gb_gms", "snapshot_gb_inprocess", "stream_gb_s"):
        assert s[key] > 0, key


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--copy-streams", "-1"), ("--copy-streams", "65"), ("--lanes", "0"), ("--host-cache-gib", "-1"),
     ("--host-cache-gib", "nan")],
)  # fmt: skip
def test_serve_refuses_out_of_range_tuning_in_one_line(tmp_path: Path, flag: str, value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart", "gms", "serve", "--gpu", "0", "--socket", str(tmp_path / "s"),
         flag, value],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(lines) == 1 and f"{flag} {value} is out of range" in lines[0], proc.stderr
    assert not (tmp_path / "s").exists()
