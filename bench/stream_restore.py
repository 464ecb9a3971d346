"""Streaming restore vs pull-then-restore from a remote store, in one run (root, CRIU).

A process holding ``--mib`` of random memory is checkpointed and pushed to a
``file://`` store. Each round then restores it into a fresh local store
twice: (a) ``restore_streaming`` (CRIU and the page fill run while the page
images download), (b) ``pull`` then ``restore`` (what ``restore URL
--no-stream`` does). Both read through the same ``--rate`` MB/s limit, which
stands in for the network (0: unthrottled). Reports, per mode, the median
seconds until the tasks resume and until the call returns (the snapshot then
published), and for (a) the share of the page images that arrived after
CRIU started.

    python bench/stream_restore.py --mib 512 --rate 200 --rounds 3
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

from warmstart.host.process import kill_tree
from warmstart.snapshot.checkpoint import checkpoint
from warmstart.snapshot.restore import RestoreRequest, restore
from warmstart.snapshot.streaming import restore_streaming
from warmstart.store.local import LocalStore
from warmstart.store.remote import RemoteStore
from warmstart.store.signing import TrustPolicy

WORKER = r"""
import os, sys, time
mem = bytearray(os.urandom(int(sys.argv[1]) << 20))
open(sys.argv[2], "w").write("ready")
while True:
    time.sleep(0.1)
"""


def gone(pid: int) -> None:
    kill_tree(pid)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument(
        "--rate", type=float, default=200.0, help="MB/s for both modes (0: unthrottled)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ws-stream-bench-", dir=args.dir))
    rate = args.rate * 1e6 if args.rate else None
    trust = TrustPolicy([])
    try:
        ready = work / "ready"
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(args.mib), str(ready)],
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        while not ready.exists():
            time.sleep(0.05)
        src = LocalStore(work / "src")
        checkpoint(proc.pid, store=src, name="snap")
        proc.wait()
        remote = RemoteStore.open(f"file://{work / 'remote'}", jobs=args.jobs)
        remote.push(src, "snap")
        shutil.rmtree(work / "src")
        runs: dict[str, list[dict[str, float]]] = {"stream": [], "pull_then_restore": []}
        for i in range(args.rounds):
            for mode, rows in runs.items():
                local = LocalStore(work / f"{mode}-{i}")
                marks: dict[str, float] = {}
                t0 = time.perf_counter()

                def on_phase(name: str, marks: dict[str, float] = marks) -> None:
                    marks.setdefault(name, time.perf_counter())

                if mode == "stream":
                    s = restore_streaming(
                        remote, "snap", local=local, request=RestoreRequest(), trust=trust,
                        limit_rate=rate, listener=on_phase,
                    )  # fmt: skip
                    pid, share = s.result.pid, s.stats.overlapped_bytes / s.stats.bulk_bytes
                else:
                    remote.pull("snap", local, trust=trust, limit_rate=rate)
                    r = restore("snap", store=local, request=RestoreRequest(), listener=on_phase)
                    pid, share = r.pid, 0.0
                done = time.perf_counter() - t0
                gone(pid)
                rows.append(
                    {"resumed_s": marks["resume"] - t0, "returned_s": done, "overlap_share": share}
                )
                shutil.rmtree(local.root)
                print(f"bench: {mode} round {i}: {rows[-1]}", file=sys.stderr, flush=True)
        out: dict[str, object] = {"mib": args.mib, "rate_mb_s": args.rate, "rounds": args.rounds}
        for mode, rs in runs.items():
            out[mode] = {k: round(statistics.median(r[k] for r in rs), 3) for k in rs[0]}
        print(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
