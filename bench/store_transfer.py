"""Push/pull throughput of remote stores, and deduplication of real snapshots, in one run.

1. Throughput: a snapshot of ``--size-mib`` random pages is pushed to and
   pulled from (a) a directory (``file://``) and (b) a moto S3 server on
   loopback, each into a fresh store; the same bytes are copied with ``cp -r``
   (+ ``sync``) and with boto3's transfer manager (``upload_file`` /
   ``download_file``, same concurrency) as baselines. A second push of the
   same snapshot under another name shows what dedup makes of a re-push.
2. Dedup (root and CRIU, skipped with ``--no-criu``): a CPU worker holding
   ``--criu-mib`` of seeded, read-only "weights" and a KV region of 1/8 of that
   which it keeps rewriting (2 MiB every 0.2 s; ``--scatter``: also a few bytes
   in ~1 %/s of all pages) is checkpointed twice, ``--apart`` seconds apart
   (``leave_running``), and a second worker with other weights on the same stack once; all three are
   pushed to one store. Reports the stored bytes of each push and the ratios.
3. Minutes apart (``--gap-only``; root and CRIU): one worker is checkpointed,
   keeps working for ``--gap`` seconds (default 120), and is checkpointed
   again (both ``leave_running``); both snapshots are pushed to one store and
   the dedup ratio printed. With ``--model DIR`` the worker is the reference
   server's engine (warmstart.serve, CPU, ``--kv-gib`` of KV cache) generating
   one completion after another in-process; else the synthetic one above.

    python bench/store_transfer.py                       # 256 MiB, < 1 min here
    python bench/store_transfer.py --size-mib 4096 --criu-mib 2048 --jobs 16
    python bench/store_transfer.py --gap-only --gap 120 --model /tmp/tinym   # ~2.5 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from warmstart.snapshot.manifest import FileEntry, HostInfo, Manifest, ProcessTree
from warmstart.store.chunking import ChunkParams
from warmstart.store.integrity import digest_file
from warmstart.store.local import LocalStore
from warmstart.store.remote import RemoteStore

WORKER = r"""
import random, sys, time
mib, seed, ready, scatter = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
rng = random.Random(seed)
weights = bytearray(b"".join(rng.randbytes(1 << 20) for _ in range(mib)))  # the 'model': seeded, read-only
kv = bytearray(max(1, mib // 8) << 20)  # 'KV cache' and heap: rewritten while serving
heap = random.Random()
open(ready, "w").write("ready")
step, i = 2 << 20, 0
while True:  # a 'request' every 0.2 s writes 2 MiB of the KV region, round robin
    pos = (i * step) % len(kv)
    kv[pos:pos + step] = heap.randbytes(min(step, len(kv) - pos))
    i += 1
    if scatter:  # --scatter: also 8 bytes in ~0.2 % of all weight pages, anywhere
        for _ in range(max(1, len(weights) // 4096 // 500)):
            p = heap.randrange(len(weights) // 4096) * 4096
            weights[p:p + 8] = heap.randbytes(8)
    time.sleep(0.2)
"""

# The reference worker's engine (warmstart.serve) in-process, serving one greedy
# completion after another. Not over HTTP: CRIU 4.1.1 cannot dump TCP sockets on
# this kernel, which is why `warmstart serve` checkpoints before it listens.
ENGINE_WORKER = r"""
import os, sys
from warmstart.serve.engine import Engine, EngineConfig, SamplingParams
model, kv, ready, served = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
engine = Engine(EngineConfig(model_dir=model, device="cpu", kv_cache_gib=kv))
engine.warmup()
open(ready, "w").write("ready")
i = 0
while True:
    prompt = engine.encode(f"Request {i}: the history of city number {i * 7919 % 1000} is")
    engine.generate(prompt, SamplingParams(max_tokens=32))
    i += 1
    with open(served + ".tmp", "w") as f:
        f.write(str(i))
    os.replace(served + ".tmp", served)
"""


def fake_snapshot(store: LocalStore, name: str, size: int) -> None:
    st = store.begin(name)
    rng = np.random.default_rng(1)
    with open(st.images / "pages-1.img", "wb") as f:
        left = size
        while left:
            n = min(left, 64 << 20)
            f.write(rng.integers(0, 2**63, size=n // 8, dtype=np.int64).tobytes())
            left -= n
    (st.images / "core-1.img").write_bytes(os.urandom(8192))
    files = [
        FileEntry(path=str(p.relative_to(st.path)), size=s, digest=d)
        for p in sorted(st.images.iterdir())
        for s, d in [digest_file(p)]
    ]
    store.publish(
        st,
        Manifest(
            snapshot_id=uuid.uuid4().hex, name=name, created_at=dt.datetime.now(dt.timezone.utc),
            source=HostInfo(hostname="bench", kernel="", arch="", cpu_model="", criu_version=""),
            tree=ProcessTree(root_pid=1, processes=[]), files=files,
        ),
        durable=False,
    )  # fmt: skip


def timed(fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def note(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def gbps(nbytes: int, s: float) -> float:
    return round(nbytes / s / 1e9, 3)


def start_moto(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=open(work / "moto.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
    )  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def throughput(work: Path, args: argparse.Namespace) -> dict[str, object]:
    import boto3
    from boto3.s3.transfer import TransferConfig

    size = args.size_mib << 20
    src = LocalStore(work / "src")
    fake_snapshot(src, "snap", size)
    snap_dir = src.path_of("snap")
    logical = sum(p.stat().st_size for p in snap_dir.rglob("*") if p.is_file())
    params = ChunkParams.around(args.chunk_mib << 20)
    out: dict[str, object] = {"bytes": logical, "jobs": args.jobs, "chunk_mib": args.chunk_mib}

    # directory store vs cp
    url = f"file://{work / 'dirstore'}"
    s, _ = timed(lambda: RemoteStore.open(url, jobs=args.jobs).push(src, "snap", params=params))
    out["file_push_gbps"] = gbps(logical, s)
    s, _ = timed(lambda: RemoteStore.open(url, jobs=args.jobs).pull("snap", LocalStore(work / "p1")))
    out["file_pull_gbps"] = gbps(logical, s)
    s, r2 = timed(lambda: RemoteStore.open(url, jobs=args.jobs).push(src, "snap", as_name="again", params=params))
    out["file_repush_gbps_effective"] = gbps(logical, s)
    out["file_repush_uploaded_bytes"] = r2.uploaded_bytes
    s, _ = timed(lambda: subprocess.run(["cp", "-r", str(snap_dir), str(work / "cp1")], check=True))
    out["cp_gbps"] = gbps(logical, s)
    s, _ = timed(lambda: (subprocess.run(["cp", "-r", str(snap_dir), str(work / "cp2")], check=True),
                          subprocess.run(["sync", "-f", str(work / "cp2")], check=True)))  # fmt: skip
    out["cp_sync_gbps"] = gbps(logical, s)

    note(f"directory store: {out}")
    # moto S3 vs boto3's transfer manager
    moto, endpoint = start_moto(work)
    try:
        out["s3_endpoint"] = endpoint
        client = boto3.client("s3")
        client.create_bucket(Bucket="bench")
        url = "s3://bench/warmstart"
        s, _ = timed(lambda: RemoteStore.open(url, jobs=args.jobs).push(src, "snap", params=params))
        out["s3_push_gbps"] = gbps(logical, s)
        s, _ = timed(lambda: RemoteStore.open(url, jobs=args.jobs).pull("snap", LocalStore(work / "p2")))
        out["s3_pull_gbps"] = gbps(logical, s)
        cfg = TransferConfig(max_concurrency=args.jobs, multipart_chunksize=8 << 20)
        files = [p for p in snap_dir.rglob("*") if p.is_file()]

        def up() -> None:
            for p in files:
                client.upload_file(str(p), "bench", f"tm/{p.relative_to(snap_dir)}", Config=cfg)

        def down() -> None:
            for p in files:
                dst = work / "tm" / p.relative_to(snap_dir)
                dst.parent.mkdir(parents=True, exist_ok=True)
                client.download_file("bench", f"tm/{p.relative_to(snap_dir)}", str(dst), Config=cfg)

        s, _ = timed(up)
        out["boto3_upload_gbps"] = gbps(logical, s)
        s, _ = timed(down)
        out["boto3_download_gbps"] = gbps(logical, s)
    finally:
        moto.terminate()
        moto.wait()
    return out


def dedup(work: Path, args: argparse.Namespace) -> dict[str, object]:
    from warmstart.host.process import kill_tree
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint

    local = LocalStore(work / "criu")
    procs = []

    def worker(seed: int) -> int:
        ready = work / f"ready-{seed}-{len(procs)}"
        p = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(args.criu_mib), str(seed), str(ready), str(int(args.scatter))],
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        procs.append(p)
        while not ready.exists():
            if p.poll() is not None:
                raise SystemExit(f"bench worker exited with {p.returncode}")
            time.sleep(0.05)
        return p.pid

    try:
        a = worker(1)
        b = worker(2)
        opts = CheckpointOptions(leave_running=True)
        checkpoint(a, store=local, name="a-1", options=opts)
        time.sleep(args.apart)
        checkpoint(a, store=local, name="a-2", options=opts)
        checkpoint(b, store=local, name="b-1", options=opts)
    finally:
        for p in procs:
            kill_tree(p.pid)
            p.wait()
    remote = RemoteStore.open(f"file://{work / 'dedupstore'}", jobs=args.jobs)
    params = ChunkParams.around(args.chunk_mib << 20)
    pushed = {n: remote.push(local, n, params=params) for n in ("a-1", "a-2", "b-1")}
    st = remote.stats()
    first, again, other = pushed["a-1"], pushed["a-2"], pushed["b-1"]
    return {
        "worker_mib": args.criu_mib,
        "apart_s": args.apart,
        "scattered_writes": args.scatter,
        "snapshot_bytes": {n: r.logical_bytes for n, r in pushed.items()},
        "uploaded_bytes": {n: r.uploaded_bytes for n, r in pushed.items()},
        # same worker minutes apart: logical bytes of both / bytes stored for both
        "same_worker_ratio": round(
            (first.logical_bytes + again.logical_bytes) / (first.uploaded_bytes + again.uploaded_bytes), 3
        ),
        "same_worker_second_push_new_fraction": round(again.uploaded_bytes / again.logical_bytes, 4),
        "other_model_new_fraction": round(other.uploaded_bytes / other.logical_bytes, 4),
        "store_dedup_ratio": round(st.dedup_ratio, 3),
    }


def gap_dedup(work: Path, args: argparse.Namespace) -> dict[str, object]:
    """Two checkpoints of one worker ``--gap`` seconds apart, the worker working in between."""
    from warmstart.host.process import kill_tree
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint

    local = LocalStore(work / "gap")
    ready, served = work / "gap-ready", work / "gap-served"
    if args.model:
        cmd = [sys.executable, "-c", ENGINE_WORKER, args.model, str(args.kv_gib), str(ready), str(served)]
        worker = f"warmstart.serve Engine, --model {args.model} --device cpu --kv-cache-gib {args.kv_gib}"
    else:
        cmd = [sys.executable, "-c", WORKER, str(args.criu_mib), "1", str(ready), str(int(args.scatter))]
        worker = f"synthetic, {args.criu_mib} MiB weights"
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)

    def count() -> int | None:
        try:
            return int(served.read_text())
        except (OSError, ValueError):
            return None

    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise SystemExit(f"bench worker exited with {proc.returncode}")
            time.sleep(0.05)
        opts = CheckpointOptions(leave_running=True, durable=False)
        first = checkpoint(proc.pid, store=local, name="gap-1", options=opts)
        at_first = count()
        note(f"gap: first checkpoint ({first.manifest.total_bytes} bytes); working {args.gap:.0f} s")
        time.sleep(args.gap)
        checkpoint(proc.pid, store=local, name="gap-2", options=opts)
        at_second = count()
    finally:
        kill_tree(proc.pid)
        proc.wait()
    remote = RemoteStore.open(f"file://{work / 'gapstore'}", jobs=args.jobs)
    params = ChunkParams.around(args.chunk_mib << 20)
    a = remote.push(local, "gap-1", params=params)
    b = remote.push(local, "gap-2", params=params)
    st = remote.stats()
    return {
        "worker": worker,
        "gap_s": args.gap,
        "requests_between": at_second - at_first if at_first is not None and at_second is not None else None,
        "chunk_mib": args.chunk_mib,
        "snapshot_bytes": [a.logical_bytes, b.logical_bytes],
        "uploaded_bytes": [a.uploaded_bytes, b.uploaded_bytes],
        "second_push_new_fraction": round(b.uploaded_bytes / b.logical_bytes, 4),
        # both snapshots: logical bytes / bytes stored for both
        "dedup_ratio": round((a.logical_bytes + b.logical_bytes) / (a.uploaded_bytes + b.uploaded_bytes), 3),
        "store_dedup_ratio": round(st.dedup_ratio, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--criu-mib", type=int, default=256)
    ap.add_argument("--apart", type=float, default=5.0, help="seconds between the two checkpoints")
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--chunk-mib", type=int, default=4)
    ap.add_argument("--no-criu", action="store_true")
    ap.add_argument("--scatter", action="store_true", help="the worker also writes all over its weights")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--gap-only", action="store_true", help="only the minutes-apart dedup (3.)")
    ap.add_argument("--gap", type=float, default=120.0, help="seconds between its two checkpoints")
    ap.add_argument("--model", default=None, help="--gap-only: checkpoint `warmstart serve` of this model")
    ap.add_argument("--kv-gib", type=float, default=0.1, help="--gap-only --model: its KV cache")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-store-bench-", dir=args.dir))
    try:
        if args.gap_only:
            if os.geteuid() != 0:
                raise SystemExit("--gap-only needs root (CRIU)")
            print(json.dumps({"gap_dedup": gap_dedup(work, args)}, indent=2))
            return
        result: dict[str, object] = {"throughput": throughput(work, args)}
        note(f"throughput: {result}")
        if not args.no_criu:
            if os.geteuid() != 0:
                result["dedup"] = "skipped: needs root for CRIU"
            else:
                result["dedup"] = dedup(work, args)
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
