"""Tensor-parallel workers on CPU (gloo): sharding, the launcher, and real CRIU checkpoint/restore.

The worker is ``python -m warmstart.serve --tensor-parallel 2``: a launcher with
two rank processes as children. At the checkpoint point the ranks destroy their
process group and store; the tree is dumped by warmstart (CRIU) and restored,
and the ranks rebuild the group with a fresh rendezvous before serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from warmstart import protocol
from warmstart.errors import UsageError
from warmstart.serve.engine import Engine, EngineConfig, SamplingParams
from warmstart.serve.modelmake import make_model
from warmstart.worker.distributed import RankFailed, RankLauncher
from warmstart.worker.preflight import inet_sockets

SRC = str(Path(__file__).resolve().parents[1] / "src")
PROMPTS = ["Hello world, this is a warm start", "The quick brown fox", "def main():"]
MAX_TOKENS = 12
ENGINE_ARGS = ["--device", "cpu", "--kv-cache-gib", "0.01", "--max-seq-len", "128", "--max-num-seqs", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def reference(model_dir) -> dict[str, list[int]]:
    """Greedy outputs of the unsharded engine (TP=1), never checkpointed."""
    eng = Engine(EngineConfig(model_dir, device="cpu", kv_cache_gib=0.01, max_seq_len=128, max_num_seqs=4))
    eng.warmup()
    try:
        return {p: eng.generate(eng.encode(p), SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)).output_ids
                for p in PROMPTS}
    finally:
        eng.close()


def start_tp(tmp: Path, model: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "warmstart.serve", "--model", str(model), *ENGINE_ARGS, "--tensor-parallel", "2",
         *extra],
        stdin=subprocess.DEVNULL, stdout=open(tmp / "worker.out", "ab"), stderr=open(tmp / "worker.err", "ab"),
        env=full_env, start_new_session=True,
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


def get_ready(port: int) -> dict | None:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def complete(port: int, prompt: str) -> list[int]:
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                   json={"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                         "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_pids(pid: int) -> list[int]:
    """The launcher, then its ranks in rank order."""
    ranks = {int(c.environ()["WARMSTART_TP_RANK"]): c.pid for c in psutil.Process(pid).children()}
    return [pid, *(ranks[r] for r in sorted(ranks))]


def all_gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def socket_kinds(pid: int) -> dict[str, int]:
    """Sockets of ``pid`` by kind, from /proc: unix / inet / other."""
    unix = {line.split()[6] for line in Path("/proc/net/unix").read_text().splitlines()[1:] if len(line.split()) > 6}
    kinds = {"unix": 0, "inet": len(inet_sockets(pid)), "other": 0}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            if target[8:-1] in unix:
                kinds["unix"] += 1
    return kinds


# ---- sharding and the launcher, no CRIU -----------------------------------------------------------


def test_shard_refuses_sizes_that_do_not_divide(model_dir):
    from transformers import AutoModelForCausalLM

    from warmstart.serve.tp_shard import shard_model

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with pytest.raises(UsageError, match=r"key/value heads \(2\) does not divide by --tensor-parallel 4"):
        shard_model(model, 0, 4)


def test_shard_keeps_this_ranks_slices(model_dir):
    from transformers import AutoModelForCausalLM

    from warmstart.serve.tp_shard import RowParallelLinear, shard_model

    full = AutoModelForCausalLM.from_pretrained(str(model_dir))
    part = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert shard_model(part, 1, 2) == {"heads": 2, "kv_heads": 1}
    fa, pa = full.model.layers[0].self_attn, part.model.layers[0].self_attn
    assert pa.q_proj.weight.shape == (32, 64) and pa.k_proj.weight.shape == (16, 64)
    assert (pa.q_proj.weight == fa.q_proj.weight[32:]).all() and (pa.v_proj.weight == fa.v_proj.weight[16:]).all()
    assert isinstance(pa.o_proj, RowParallelLinear) and (pa.o_proj.weight == fa.o_proj.weight[:, 32:]).all()
    fm, pm = full.model.layers[1].mlp, part.model.layers[1].mlp
    assert (pm.up_proj.weight == fm.up_proj.weight[64:]).all()
    assert (pm.down_proj.weight == fm.down_proj.weight[:, 64:]).all()


def test_launcher_fails_the_worker_when_a_rank_dies(tmp_path):
    """A rank that exits brings the group down: the other rank is killed, one clear message."""
    failures: list[str] = []
    script = "import os, sys, time; sys.exit(3) if os.environ['WARMSTART_TP_RANK'] == '1' else time.sleep(600)"
    launcher = RankLauncher(2, lambda rank: [sys.executable, "-c", script], on_fail=failures.append)
    launcher.start()
    pids = launcher.pids
    try:
        with pytest.raises(RankFailed):
            launcher.wait_ready(timeout=60)
        wait_for(lambda: failures, 10, "the failure")
        assert failures[0].startswith(f"rank 1 (pid {pids[1]}) exited with status 3 during start-up")
        assert all_gone(pids)
    finally:
        kill_all(pids)


def test_launcher_times_out_a_silent_rank(tmp_path):
    failures: list[str] = []
    launcher = RankLauncher(2, lambda rank: [sys.executable, "-c", "import time; time.sleep(600)"],
                            on_fail=failures.append)
    launcher.start()
    pids = launcher.pids
    try:
        with pytest.raises(RankFailed):
            launcher.wait_ready(timeout=1.0)
        assert failures == ["rank(s) 0, 1 did not report 'ready' within 1 s during start-up; "
                            "stopped the tensor-parallel worker"]
        assert all_gone(pids)
    finally:
        kill_all(pids)


def test_bad_tensor_parallel_arguments(tmp_path, model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.serve", "--model", str(model_dir), "--tensor-parallel", "2",
         "--gpus", "3,3"],
        env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "error: --gpus 3,3 names a GPU twice" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_tp2_serves_the_same_greedy_tokens_as_tp1(tmp_path, model_dir, reference):
    port = free_port()
    proc = start_tp(tmp_path, model_dir, "--port", str(port))
    try:
        ready = wait_for(lambda: get_ready(port), 180, "TP=2 worker", tmp_path / "worker.err")
        assert ready["tensor_parallel"]["size"] == 2 and ready["tensor_parallel"]["heads"] == 2
        assert len(tree_pids(proc.pid)) == 3  # launcher + two ranks
        for prompt in PROMPTS:
            assert complete(port, prompt) == reference[prompt], prompt
        pids = tree_pids(proc.pid)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(60) == 0
    wait_for(lambda: all_gone(pids), 20, "ranks to exit")
    assert "error" not in (tmp_path / "worker.err").read_text().lower()


# ---- real CRIU ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tp_snapshot(tmp_path_factory, model_dir):
    """One TP=2 worker at its checkpoint point, checked for sockets, then snapshotted with warmstart."""
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.store.local import LocalStore

    # only reached by tests marked criu: conftest skips those where CRIU is unusable
    tmp = tmp_path_factory.mktemp("tp-criu")
    cdir = tmp / "control"
    cdir.mkdir()
    proc = start_tp(tmp, model_dir, "--port", "0", env={protocol.CONTROL_DIR_ENV: str(cdir)})
    try:
        ready = cdir / protocol.READY_FOR_SNAPSHOT
        wait_for(ready.exists, 180, "ready-for-snapshot", tmp / "worker.err")
        info = protocol.read_model(ready, protocol.ReadyInfo)
        pids = tree_pids(proc.pid)
        sockets = {pid: socket_kinds(pid) for pid in pids}
        store = LocalStore(tmp / "store")
        checkpoint(proc.pid, store=store, name="tp2",
                   options=CheckpointOptions(labels={"checkpoint_id": info.checkpoint_id or ""}))
        proc.wait(30)
    finally:
        if proc.poll() is None:
            kill_all(tree_pids(proc.pid))
    return {"tmp": tmp, "cdir": cdir, "info": info, "pids": pids, "sockets": sockets, "store": store,
            "launcher": proc.pid}


def _restore(snap: dict, env: dict, *, hand_over: bool = True):
    from warmstart.snapshot.restore import RestoreRequest, restore

    # an earlier restore's processes must be reaped (not even zombies) before their PIDs are free
    wait_for(lambda: not any(psutil.pid_exists(p) for p in snap["pids"]), 60, "PIDs of the snapshot to be free")
    for stale in (protocol.RESTORE_COMPLETE, protocol.RESTORE_CONTEXT):  # left by an earlier restore
        (snap["cdir"] / stale).unlink(missing_ok=True)
    request = RestoreRequest(control_dir=snap["cdir"] if hand_over else None, env=env)
    return restore("tp2", store=snap["store"], request=request)


def _hand_over(snap: dict, env: dict) -> None:
    ctx = protocol.RestoreContext(snapshot_id="manual", snapshot_name="tp2", env=env,
                                  checkpoint_id=snap["info"].checkpoint_id)
    for stale in (protocol.SNAPSHOT_COMPLETE, protocol.READY_FOR_SNAPSHOT):
        (snap["cdir"] / stale).unlink(missing_ok=True)
    protocol.signal_file(snap["cdir"], protocol.RESTORE_CONTEXT, ctx)
    protocol.signal_file(snap["cdir"], protocol.RESTORE_COMPLETE)


@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_checkpoint_point_holds_no_inet_sockets(tp_snapshot):
    snap = tp_snapshot
    assert snap["info"].pid == snap["launcher"]  # the launcher is the tree's root
    assert snap["info"].labels["tensor_parallel"] == "2" and snap["info"].labels["model"] == "tiny"
    assert len(snap["pids"]) == 3
    for pid, kinds in snap["sockets"].items():
        assert kinds["inet"] == 0, (pid, kinds)
    # the launcher <-> rank channels are unix socketpairs (CRIU restores those): one per rank
    assert snap["sockets"][snap["launcher"]]["unix"] == 2


@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_restored_tp_worker_rebuilds_with_a_fresh_rendezvous(tp_snapshot, reference):
    snap = tp_snapshot
    port = free_port()
    restored = _restore(snap, {"WARMSTART_PORT": str(port), "POD_NAME": "tp-replica"})
    pids = snap["pids"]
    try:
        assert restored.pid == snap["launcher"]
        ready = wait_for(lambda: get_ready(port), 120, "restored TP worker", snap["tmp"] / "worker.err")
        assert ready["restored"] is True
        gens = ready["tensor_parallel"]["rendezvous"]
        assert [g["generation"] for g in gens] == [1, 2]
        assert gens[1]["port"] != gens[0]["port"]  # a new store, never the checkpointed group's
        for prompt in PROMPTS:
            assert complete(port, prompt) == reference[prompt], prompt
    finally:
        os.kill(snap["launcher"], signal.SIGTERM)
    wait_for(lambda: all_gone(pids), 60, "restored worker to stop")


@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_rank_killed_after_restore_stops_the_worker(tp_snapshot):
    snap = tp_snapshot
    err = snap["tmp"] / "worker.err"
    before = len(err.read_text())
    restored = _restore(snap, {}, hand_over=False)
    pids = snap["pids"]
    try:
        assert restored.pid == snap["launcher"]
        os.kill(pids[2], signal.SIGKILL)  # rank 1
        _hand_over(snap, {"WARMSTART_PORT": str(free_port())})
        wait_for(lambda: all_gone(pids), 60, "the whole worker to exit", err)
    finally:
        kill_all(pids)
    tail = err.read_text()[before:]
    assert f"error: rank 1 (pid {pids[2]}) was killed by signal 9" in tail
    assert "stopped the other ranks of the tensor-parallel worker" in tail


@pytest.mark.criu
@pytest.mark.root
@pytest.mark.slow
def test_rank_hanging_in_rebuild_stops_the_worker(tp_snapshot):
    """Rank 1 never joins the new rendezvous: the rebuild times out and nothing is left running."""
    snap = tp_snapshot
    err = snap["tmp"] / "worker.err"
    before = len(err.read_text())
    restored = _restore(snap, {}, hand_over=False)
    pids = snap["pids"]
    try:
        assert restored.pid == snap["launcher"]
        os.kill(pids[2], signal.SIGSTOP)
        t0 = time.monotonic()
        _hand_over(snap, {"WARMSTART_PORT": str(free_port()), "WARMSTART_TP_TIMEOUT": "5"})
        wait_for(lambda: all_gone(pids), 60, "the whole worker to exit", err)
        assert time.monotonic() - t0 < 40
    finally:
        kill_all(pids)
    tail = err.read_text()[before:]
    assert "during the rebuild after restore" in tail and "error: " in tail, tail[-2000:]
    assert "stopped the" in tail
