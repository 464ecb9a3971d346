"""GPU checkpoint/restore throughput: warmstart vs the naive pipeline, same run.

The naive pipeline is what the CUDA driver's documentation describes, driven
by hand: cuCheckpointProcessLock + Checkpoint, ``criu dump``, kill,
``criu restore -d``, cuCheckpointProcessRestore + Unlock. warmstart adds
preflight, streamed checksums, verification during restore, a guard and an
atomic publish. Run as root on a GPU host:

    python bench/gpu_cr.py --gib 1 8 32 [--lazy] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _support import WORKLOADS, Tree, wait_for  # noqa: E402
from warmstart.errors import WarmstartError  # noqa: E402
from warmstart.gpu import load_driver  # noqa: E402
from warmstart.host.criu import find_criu  # noqa: E402
from warmstart.host.process import kill_tree  # noqa: E402
from warmstart.snapshot.checkpoint import checkpoint  # noqa: E402
from warmstart.snapshot.restore import RestoreRequest, restore  # noqa: E402
from warmstart.store.local import LocalStore  # noqa: E402


def start(state: Path, gib: float) -> Tree:
    state.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        [sys.executable, str(WORKLOADS / "cuda_tree.py"), str(state), str(gib)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    t = Tree(state, popen, popen.pid)
    wait_for(t.started, 300, what="workload")
    return t


def naive(work: Path, gib: float) -> dict[str, float]:
    t = start(work / "naive-w", gib)
    try:
        return _naive(t, work)
    finally:
        kill_tree(t.pid)


def _naive(t: Tree, work: Path) -> dict[str, float]:
    drv, criu = load_driver(), find_criu()
    images = work / "naive-img"
    images.mkdir()
    t0 = time.perf_counter()
    drv.lock(t.pid, 30000)
    drv.checkpoint(t.pid)
    t1 = time.perf_counter()
    subprocess.run([str(criu.path), "dump", "-t", str(t.pid), "-D", str(images), "--file-locks"], check=True)
    t2 = time.perf_counter()
    t.popen.wait()
    t3 = time.perf_counter()
    subprocess.run([str(criu.path), "restore", "-D", str(images), "-d", "--file-locks"], check=True)
    t4 = time.perf_counter()
    drv.restore(t.pid)
    drv.unlock(t.pid)
    t5 = time.perf_counter()
    Tree(t.state, None, t.pid).wait_progress(60)
    shutil.rmtree(images)
    return {"gpu_checkpoint": t1 - t0, "criu_dump": t2 - t1, "checkpoint": t2 - t0,
            "criu_restore": t4 - t3, "gpu_restore": t5 - t4, "restore": t5 - t3}  # fmt: skip


def ours(work: Path, gib: float, lazy: bool = False) -> dict[str, float]:
    t = start(work / "ws-w", gib)
    store = LocalStore(work / "store")
    try:
        c = checkpoint(t.pid, store=store, name="bench")
        t.popen.wait()
        r = restore("bench", store=store, request=RestoreRequest(lazy=lazy))
        Tree(t.state, None, r.pid).wait_progress(60)
    finally:
        kill_tree(t.pid)  # the restored tree has the original's pid
    phases = {p.name.strip(): p.seconds for p in c.timer.phases} | {
        "r_" + p.name.strip(): p.seconds for p in r.timer.phases
    }
    store.remove("bench")
    return {"gpu_checkpoint": phases.get("gpu-checkpoint", 0), "checkpoint": c.timer.total,
            "criu_restore": phases["r_criu-restore"], "gpu_restore": phases.get("r_gpu-restore", 0),
            "restore": r.timer.total, "device_bytes": float(c.manifest.gpus[0].device_memory_bytes),
            "phases": phases}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, nargs="+", default=[1, 8])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--lazy", action="store_true", help="also warmstart --lazy (GPU restore beside the fill)")
    args = ap.parse_args()
    header = (f"{'GiB':>5} {'dev GB':>7} {'naive ckpt':>10} {'ws ckpt':>8} {'ratio':>6} "
              f"{'naive rst':>9} {'ws rst':>7} {'ratio':>6} {'GPU rst GB/s':>12}")  # fmt: skip
    rows = []
    if not args.json:
        print(header, flush=True)
    for gib in args.gib:
        try:
            with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                n = naive(Path(d), gib)
            with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                w = ours(Path(d), gib)
            lz = None
            if args.lazy:
                with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                    lz = ours(Path(d), gib, lazy=True)
        except (subprocess.CalledProcessError, WarmstartError) as exc:  # one size failing keeps the others
            print(f"{gib:>5} failed: {exc}", file=sys.stderr, flush=True)
            continue
        r = {"gib": gib, "naive": n, "warmstart": w, "lazy": lz,
             "checkpoint_ratio": w["checkpoint"] / n["checkpoint"], "restore_ratio": w["restore"] / n["restore"]}  # fmt: skip
        rows.append(r)
        if not args.json:
            gbs = w["device_bytes"] / w["gpu_restore"] / 1e9 if w["gpu_restore"] else 0
            print(f"{gib:>5} {w['device_bytes'] / 1e9:>7.2f} {n['checkpoint']:>10.2f} {w['checkpoint']:>8.2f} "
                  f"{r['checkpoint_ratio']:>6.2f} {n['restore']:>9.2f} {w['restore']:>7.2f} "
                  f"{r['restore_ratio']:>6.2f} {gbs:>12.2f}", flush=True)  # fmt: skip
            print("       warmstart phases: " + ", ".join(f"{k} {v:.2f}" for k, v in w["phases"].items() if v >= 0.01),
                  flush=True)  # fmt: skip
            if lz is not None:
                print(f"       --lazy: restore {lz['restore']:.2f} s (ratio {lz['restore'] / n['restore']:.2f}); phases: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in lz["phases"].items() if k.startswith("r_") and v >= 0.01),
                      flush=True)  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))

if __name__ == "__main__":
    main()
