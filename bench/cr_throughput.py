"""Checkpoint/restore throughput: warmstart vs bare CRIU on the same process, same run.

For each size, a process holding that much patterned memory is checkpointed
and restored by ``criu dump``/``criu restore -d`` (bare) and by warmstart
(preflight, guard, streamed checksums, durable publish, verification during
restore), alternating, ``--rounds`` times. Prints GB/s, medians and the
warmstart/bare ratio (1.05 = 5 % overhead). Run as root:

    python bench/cr_throughput.py --gib 1 4 8 [--rounds 3] [--no-fsync] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from warmstart.host.criu import find_criu
from warmstart.host.process import kill_tree
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.store.local import LocalStore

HOLDER = """
import sys, time
pattern = bytes((i * 7) % 251 for i in range(1 << 20))
mem = bytearray(pattern) * int(float(sys.argv[1]) * 1024)
open(sys.argv[2], "w").write("ready")
while True:
    time.sleep(0.05)
"""


def start(gib: float, work: Path) -> subprocess.Popen[bytes]:
    flag = work / "ready"
    flag.unlink(missing_ok=True)
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(gib), str(flag)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    while not flag.exists():
        if p.poll() is not None:
            raise SystemExit("holder died")
        time.sleep(0.05)
    return p


def wait_gone(pid: int) -> None:
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)


def bare(gib: float, work: Path) -> tuple[float, float]:
    criu = find_criu()
    images = work / "bare"
    images.mkdir()
    p = start(gib, work)
    t0 = time.perf_counter()
    subprocess.run([str(criu.path), "dump", "-t", str(p.pid), "-D", str(images)], check=True)
    t1 = time.perf_counter()
    p.wait()
    t2 = time.perf_counter()
    subprocess.run([str(criu.path), "restore", "-D", str(images), "-d"], check=True)
    t3 = time.perf_counter()
    kill_tree(p.pid)
    wait_gone(p.pid)
    shutil.rmtree(images)
    return t1 - t0, t3 - t2


def ours(gib: float, work: Path, durable: bool, verify: bool) -> tuple[float, float, int]:
    store = LocalStore(work / "store")
    p = start(gib, work)
    t0 = time.perf_counter()
    c = checkpoint(p.pid, store=store, name="bench", options=CheckpointOptions(durable=durable))
    t1 = time.perf_counter()
    p.wait()
    t2 = time.perf_counter()
    r = restore("bench", store=store, request=RestoreRequest(verify=verify))
    t3 = time.perf_counter()
    kill_tree(r.pid)
    wait_gone(r.pid)
    store.remove("bench")
    return t1 - t0, t3 - t2, c.manifest.total_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--no-verify", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for gib in args.gib:
        b_ck, b_rs, w_ck, w_rs, nbytes = [], [], [], [], 0
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                ck, rs = bare(gib, Path(d))
                b_ck.append(ck)
                b_rs.append(rs)
            with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                ck, rs, nbytes = ours(gib, Path(d), not args.no_fsync, not args.no_verify)
                w_ck.append(ck)
                w_rs.append(rs)
        med = statistics.median
        rows.append({
            "gib": gib, "bytes": nbytes,
            "bare_checkpoint_s": med(b_ck), "warmstart_checkpoint_s": med(w_ck),
            "bare_restore_s": med(b_rs), "warmstart_restore_s": med(w_rs),
            "checkpoint_ratio": med(w / b for w, b in zip(w_ck, b_ck)),
            "restore_ratio": med(w / b for w, b in zip(w_rs, b_rs)),
        })  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"fsync={'off' if args.no_fsync else 'on'} verify={'off' if args.no_verify else 'on'} "
          f"rounds={args.rounds} (medians)")  # fmt: skip
    print(f"{'GiB':>4} {'bare ckpt GB/s':>15} {'ws ckpt GB/s':>13} {'ratio':>6} "
          f"{'bare rst GB/s':>14} {'ws rst GB/s':>12} {'ratio':>6}")  # fmt: skip
    for r in rows:
        gb = r["bytes"] / 1e9
        print(f"{r['gib']:>4} {gb / r['bare_checkpoint_s']:>15.2f} {gb / r['warmstart_checkpoint_s']:>13.2f} "
              f"{r['checkpoint_ratio']:>6.2f} {gb / r['bare_restore_s']:>14.2f} "
              f"{gb / r['warmstart_restore_s']:>12.2f} {r['restore_ratio']:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
