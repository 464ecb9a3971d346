"""Tensor-parallel (TP=2) worker: cold start vs restore to first token, same and swapped GPUs.

(1) cold -- ``warmstart serve --tensor-parallel 2 --gpus 0,1``, wait for /ready,
time the first greedy completion (per-phase start-up from /ready: weights,
KV, rendezvous, warm-up with graph capture); (2) warm -- the same worker with a
control dir, snapshotted at its checkpoint point (NCCL torn down, KV
released), then restored once per GPU map (``same``: no map; ``swapped``:
``0=1,1=0``), timing restore phases (CRIU, GPU, hand-over), the rebuild
(rendezvous + graph re-capture, from /ready) and the first completion.
Greedy outputs must be identical everywhere. Needs two GPUs and root:

    WARMSTART_TP_VISIBLE=all python bench/tp_coldstart.py --model DIR --kv-gib 40 --max-num-seqs 512

``--kv-gib`` is per rank (and capped by ``--max-num-seqs`` x ``--max-seq-len``): at
40+ GiB on H100 (80+ on H200) the two ranks' KV caches together do not fit on one
GPU. Prints JSON, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

SRC = str(Path(__file__).resolve().parents[1] / "src")
sys.path.insert(0, SRC)

from coldstart import first_token as coldstart_first_token  # noqa: E402
from coldstart import free_port  # noqa: E402

from warmstart import protocol  # noqa: E402
from warmstart.host.process import kill_tree  # noqa: E402

PROMPT = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}


def serve_cmd(args: argparse.Namespace, port: int) -> list[str]:
    return [sys.executable, "-m", "warmstart", "serve", "--model", args.model, "--device", "cuda",
            "--tensor-parallel", "2", "--gpus", args.gpus, "--kv-cache-gib", str(args.kv_gib),
            "--max-seq-len", str(args.max_seq_len), "--max-num-seqs", str(args.max_num_seqs),
            "--port", str(port)]  # fmt: skip


def first_token(port: int, t0: float, timeout: float = 900) -> tuple[float, float, str, dict]:
    """coldstart's measurement, plus the worker's whole /ready report (graphs, TP rebuild)."""
    ready, ttft, text = coldstart_first_token(port, t0, {}, timeout, PROMPT)
    return ready, ttft, text, httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5).json()


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def cold(args: argparse.Namespace) -> dict:
    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen(serve_cmd(args, port), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)  # fmt: skip
    try:
        ready, ttft, text, info = first_token(port, t0)
    finally:
        kill_tree(p.pid)
    startup = info.get("startup", {})
    return {**startup, "ready_s": ready, "first_token_s": ttft, "text": text, "cuda_graphs": info["cuda_graphs"]}


def warm(args: argparse.Namespace, store_dir: Path) -> list[dict]:
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.snapshot.restore import RestoreRequest, restore
    from warmstart.store.local import LocalStore

    cdir = Path(tempfile.mkdtemp(prefix="tp-control-"))
    t0 = time.perf_counter()
    p = subprocess.Popen(serve_cmd(args, 0), env={**env(), protocol.CONTROL_DIR_ENV: str(cdir)},
                         stdout=subprocess.DEVNULL, stderr=open(cdir / "worker.err", "wb"), start_new_session=True)
    while not (cdir / protocol.READY_FOR_SNAPSHOT).exists():
        if p.poll() is not None:
            raise SystemExit(f"worker exited: {(cdir / 'worker.err').read_text()[-2000:]}")
        time.sleep(0.05)
    to_point = time.perf_counter() - t0
    info = protocol.read_model(cdir / protocol.READY_FOR_SNAPSHOT, protocol.ReadyInfo)
    store = LocalStore(store_dir)
    pids = [p.pid, *(c.pid for c in psutil.Process(p.pid).children(recursive=True))]
    t0 = time.perf_counter()
    taken = checkpoint(p.pid, store=store, name="tp2",
                       options=CheckpointOptions(labels={"checkpoint_id": info.checkpoint_id or ""}))
    checkpoint_s = time.perf_counter() - t0
    p.wait(60)
    # The restored worker appends to worker.err, and CRIU restores an open file only
    # at its checkpoint-time size: keep that copy to put back before each restore.
    err_at_checkpoint = (cdir / "worker.err").read_bytes()
    rows = []
    for label, gpu_map in (("same", ()), ("swapped", ("0=1", "1=0"))):
        while any(psutil.pid_exists(x) for x in pids):
            time.sleep(0.05)
        for stale in (protocol.RESTORE_COMPLETE, protocol.RESTORE_CONTEXT):
            (cdir / stale).unlink(missing_ok=True)
        err = cdir / "worker.err"
        if err.stat().st_size != len(err_at_checkpoint):
            err.rename(cdir / f"worker.err.before-{label}")
            err.write_bytes(err_at_checkpoint)
        port = free_port()
        t0 = time.perf_counter()
        restored = restore("tp2", store=store, request=RestoreRequest(
            gpu_map=gpu_map, control_dir=cdir, env={"WARMSTART_PORT": str(port)}))
        restore_s = time.perf_counter() - t0
        try:
            ready, ttft, text, rinfo = first_token(port, t0)
        finally:
            kill_tree(restored.pid)
            for x in pids:
                kill_tree(x)
        phases = {ph.name.strip(): ph.seconds for ph in restored.timer.phases}
        rows.append({
            "gpus": label, "cold_to_checkpoint_point_s": to_point, "snapshot_bytes": taken.manifest.total_bytes,
            "checkpoint_s": checkpoint_s, "restore_s": restore_s,
            "criu_restore_s": phases.get("criu-restore", 0.0), "gpu_restore_s": phases.get("gpu-restore", 0.0),
            "rebuild_s": rinfo.get("startup", {}).get("rebuild_s", 0.0), "ready_s": ready, "first_token_s": ttft,
            "text": text, "cuda_graphs": rinfo["cuda_graphs"], "tensor_parallel": rinfo.get("tensor_parallel"),
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpus", default="0,1")
    ap.add_argument("--kv-gib", type=float, default=8.0, help="per rank")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="raise it, or the KV cache stays small")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        c = cold(args)
        w = warm(args, Path(d) / "store")
    result = {"kv_gib_per_rank": args.kv_gib, "cold": c, "restores": w,
              "same_output": all(r["text"] == c["text"] for r in w)}
    print(json.dumps(result, indent=2))
    phases = ["weights_load_s", "kv_alloc_s", "rendezvous_s", "warmup_s"]
    print(f"cold: first token {c['first_token_s']:.2f} s (" +
          ", ".join(f"{k[:-2]} {c.get(k, 0):.2f}" for k in phases) + ")")
    for r in w:
        print(f"restore ({r['gpus']} GPUs): first token {r['first_token_s']:.2f} s (criu {r['criu_restore_s']:.2f}, "
              f"gpu {r['gpu_restore_s']:.2f}, rebuild {r['rebuild_s']:.2f}, restore call {r['restore_s']:.2f}); "
              f"snapshot {r['snapshot_bytes'] / 1e9:.2f} GB; ratio {c['first_token_s'] / r['first_token_s']:.1f}x")
    print(f"greedy outputs identical: {result['same_output']}")


if __name__ == "__main__":
    main()
