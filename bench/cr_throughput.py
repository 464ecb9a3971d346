"""Checkpoint/restore throughput: warmstart vs bare CRIU on the same process, same run.

For each size, each round starts a fresh process holding that much patterned
memory for each of these, in an order that rotates from round to round:

* **bare**: ``criu dump`` (timed), then an fsync of every image file and of the
  directory (timed separately: "bare+fsync" is bare CRIU made as durable as
  warmstart's default), then ``criu restore -d`` (timed);
* **ws**: warmstart's checkpoint with the default durability (``fsync``, early
  write-back on) and its restore (checksums verified, page server as default);
* **ws-none**: warmstart's checkpoint with ``--durability none`` (no restore);
* with ``--compare-early-writeback``, **ws-late**: the default durability with
  the early write-back off (the fsync at publish writes everything; no restore).

It prints the medians, the median of the per-round ratios with their range
(1.05 = 5 % overhead), warmstart's phase timings, and how much of the page
cache was still dirty when each checkpoint returned. Run as root:

    python bench/cr_throughput.py --gib 1 4 8 [--rounds 3] [--compare-early-writeback] [--json] [--save F]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
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
PHASES = (
    "preflight",
    "dump",
    "  freeze",
    "  memdump",
    "  memwrite",
    "checksum",
    "publish",
    "stop-original",
)


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


def dirty_mib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) >> 10
    return -1


def settle() -> None:
    """Start every run from a clean page cache (nothing dirty left by the run before)."""
    os.sync()


def fsync_dir_files(images: Path) -> None:
    """What `sync DIR/*` and a directory fsync do: every file, then the directory."""
    for path in sorted(images.iterdir()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(images, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bare(gib: float, work: Path) -> dict[str, float]:
    criu = find_criu()
    images = work / "bare"
    images.mkdir()
    p = start(gib, work)
    settle()
    t0 = time.perf_counter()
    subprocess.run(
        [str(criu.path), "dump", "-t", str(p.pid), "-D", str(images)],
        check=True, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    t1 = time.perf_counter()
    dirty = dirty_mib()
    fsync_dir_files(images)
    t2 = time.perf_counter()
    p.wait()
    t3 = time.perf_counter()
    subprocess.run(
        [str(criu.path), "restore", "-D", str(images), "-d"], check=True, stderr=subprocess.DEVNULL
    )
    t4 = time.perf_counter()
    kill_tree(p.pid)
    wait_gone(p.pid)
    shutil.rmtree(images)
    return {
        "ckpt": t1 - t0,
        "fsync": t2 - t1,
        "ckpt+fsync": t2 - t0,
        "restore": t4 - t3,
        "dirty_mib": dirty,
    }


def ours(gib: float, work: Path, durable: bool, early: bool, do_restore: bool) -> dict[str, float]:
    store = LocalStore(work / "store")
    p = start(gib, work)
    settle()
    t0 = time.perf_counter()
    options = CheckpointOptions(durable=durable, early_writeback=early)
    c = checkpoint(p.pid, store=store, name="bench", options=options)
    t1 = time.perf_counter()
    out = {"ckpt": t1 - t0, "dirty_mib": dirty_mib(), "bytes": c.manifest.total_bytes}
    out |= {ph.name: ph.seconds for ph in c.timer.phases if ph.name in PHASES}
    p.wait()
    if do_restore:
        t2 = time.perf_counter()
        r = restore("bench", store=store, request=RestoreRequest(verify=True))
        out["restore"] = time.perf_counter() - t2
        kill_tree(r.pid)
        wait_gone(r.pid)
    store.remove("bench")
    return out


def run_size(gib: float, rounds: int, early: bool, compare: bool) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    kinds = ["bare", "ws", "ws-none"] + (["ws-late"] if compare else [])
    for i in range(rounds):
        k = i % len(kinds)
        for kind in kinds[k:] + kinds[:k]:
            with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
                if kind == "bare":
                    runs[kind].append(bare(gib, Path(d)))
                else:
                    durable, on = kind != "ws-none", early and kind == "ws"
                    runs[kind].append(ours(gib, Path(d), durable, on, kind == "ws"))
    b, w, n = runs["bare"], runs["ws"], runs["ws-none"]

    def ratio(
        xs: list[dict[str, float]], xk: str, ys: list[dict[str, float]], yk: str
    ) -> list[float]:
        return [x[xk] / y[yk] for x, y in zip(xs, ys, strict=True)]

    med = statistics.median
    return {
        "gib": gib,
        "bytes": int(w[0]["bytes"]),
        "rounds": rounds,
        "seconds": {
            "bare_ckpt": [r["ckpt"] for r in b],
            "bare_ckpt_fsync": [r["ckpt+fsync"] for r in b],
            "bare_fsync_alone": [r["fsync"] for r in b],
            "ws_ckpt": [r["ckpt"] for r in w],
            "ws_none_ckpt": [r["ckpt"] for r in n],
            "bare_restore": [r["restore"] for r in b],
            "ws_restore": [r["restore"] for r in w],
        },
        "ratios": {
            "ws_vs_bare": ratio(w, "ckpt", b, "ckpt"),
            "ws_vs_bare_fsync": ratio(w, "ckpt", b, "ckpt+fsync"),
            "ws_none_vs_bare": ratio(n, "ckpt", b, "ckpt"),
            "restore_ws_vs_bare": ratio(w, "restore", b, "restore"),
        }
        | (
            {
                "ws_late_vs_bare_fsync": ratio(runs["ws-late"], "ckpt", b, "ckpt+fsync"),
                "ws_vs_ws_late": ratio(w, "ckpt", runs["ws-late"], "ckpt"),
            }
            if compare
            else {}
        ),
        "ws_phases_median_s": {ph: med(r.get(ph, 0.0) for r in w) for ph in PHASES},
        "dirty_mib_at_return_median": {
            "bare": med(r["dirty_mib"] for r in b),
            "ws": med(r["dirty_mib"] for r in w),
            "ws-none": med(r["dirty_mib"] for r in n),
        },
        "ws_late_publish_median_s": med(r["publish"] for r in runs["ws-late"]) if compare else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-early-writeback", action="store_true")
    ap.add_argument("--compare-early-writeback", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", type=Path, help="Also write the raw per-round results here (JSON).")
    args = ap.parse_args()
    rows = [
        run_size(gib, args.rounds, not args.no_early_writeback, args.compare_early_writeback)
        for gib in args.gib
    ]
    if args.save:
        args.save.write_text(json.dumps(rows, indent=2))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    med = statistics.median
    print(f"rounds={args.rounds} early-writeback={'off' if args.no_early_writeback else 'on'}; "
          "seconds are medians; ratios are medians of per-round ratios [min-max]")  # fmt: skip
    print("| GiB | bare ckpt s | bare+fsync s | ws ckpt s | ws none s | ws/bare | ws/bare+fsync "
          "| ws none/bare | bare rst s | ws rst s | rst ws/bare |")  # fmt: skip
    print("|" + " --- |" * 11)
    for r in rows:
        s, q = r["seconds"], r["ratios"]
        assert isinstance(s, dict) and isinstance(q, dict)
        rq = {k: f"{med(v):.2f} [{min(v):.2f}-{max(v):.2f}]" for k, v in q.items()}
        print(f"| {r['gib']:g} | {med(s['bare_ckpt']):.2f} | {med(s['bare_ckpt_fsync']):.2f} "
              f"| {med(s['ws_ckpt']):.2f} | {med(s['ws_none_ckpt']):.2f} | {rq['ws_vs_bare']} "
              f"| {rq['ws_vs_bare_fsync']} | {rq['ws_none_vs_bare']} | {med(s['bare_restore']):.2f} "
              f"| {med(s['ws_restore']):.2f} | {rq['restore_ws_vs_bare']} |")  # fmt: skip
    print()
    for r in rows:
        print(f"{r['gib']:g} GiB ({int(r['bytes']) / 1e9:.2f} GB): ws phases (median s) "
              + ", ".join(f"{k.strip()} {v:.3f}" for k, v in r["ws_phases_median_s"].items())
              + "; dirty MiB when the checkpoint returned: "
              + ", ".join(f"{k} {v:g}" for k, v in r["dirty_mib_at_return_median"].items()))  # fmt: skip
        q = r["ratios"]
        if args.compare_early_writeback and isinstance(q, dict):
            print(f"  early write-back off: publish {r['ws_late_publish_median_s']:.3f} s, "
                  f"ws-late/bare+fsync {med(q['ws_late_vs_bare_fsync']):.2f}, ws/ws-late "
                  f"{med(q['ws_vs_ws_late']):.2f} [{min(q['ws_vs_ws_late']):.2f}-{max(q['ws_vs_ws_late']):.2f}]")  # fmt: skip


if __name__ == "__main__":
    main()
