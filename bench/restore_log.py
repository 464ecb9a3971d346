"""Where CRIU's part of a restore goes: the largest gaps in its -v4 log.

Snapshots the worker the way ``bench/restore_speed.py`` does, restores it once
with warmstart (after dropping the page cache with ``--cold``), and prints the
longest pauses between consecutive lines of CRIU's restore log with the line
that preceded each, plus time per kind of log line. Run as root:

    python3 bench/restore_log.py --model /var/tmp/q --device cuda --cold --out /tmp/restore.log
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from restore_speed import drop_caches, snapshot_worker  # noqa: E402

from warmstart.host.criu import LOG_LEVEL_ENV  # noqa: E402
from warmstart.host.process import kill_tree  # noqa: E402
from warmstart.snapshot.restore import RestoreRequest, restore  # noqa: E402
from warmstart.store.local import LocalStore  # noqa: E402

STAMP = re.compile(r"^\((\d+\.\d+)\)\s*(.*)$")


def gaps(log: Path, top: int) -> tuple[list[tuple[float, str, str]], dict[str, float]]:
    lines = [(float(m[1]), m[2]) for line in log.read_text(errors="replace").splitlines() if (m := STAMP.match(line))]
    out: list[tuple[float, str, str]] = []
    by_kind: dict[str, float] = collections.defaultdict(float)
    for (t0, before), (t1, after) in zip(lines, lines[1:], strict=False):
        out.append((t1 - t0, before[:140], after[:140]))
        kind = re.sub(r"[0-9a-fx]{3,}|\d+", "#", before.split(":", 1)[0])[:60]
        by_kind[kind] += t1 - t0
    out.sort(reverse=True)
    return out[:top], dict(sorted(by_kind.items(), key=lambda kv: -kv[1])[:top])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--zero-mib", type=int, default=0)
    ap.add_argument("--compress", default="none")
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", type=Path, help="copy CRIU's restore log here")
    args = ap.parse_args()
    os.environ[LOG_LEVEL_ENV] = "4"  # every step of CRIU's, timed (warmstart's default is 2)
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        work = Path(d)
        store = LocalStore(work / "store")
        name, control = snapshot_worker(args, store, work)
        if args.cold:
            drop_caches()
        t0 = time.perf_counter()
        r = restore(name, store=store, request=RestoreRequest(control_dir=control, prefetch=args.prefetch))
        took = time.perf_counter() - t0
        kill_tree(r.pid)
        print(f"restore {took:.2f} s ({'cold' if args.cold else 'warm'} page cache)")
        for p in r.timer.phases:
            print(f"  {p.name:<16} {p.seconds:7.3f} s")
        top, kinds = gaps(r.log, args.top)
        print("longest pauses in CRIU's log (seconds, line before, line after):")
        for dt, before, after in top:
            print(f"{dt:8.3f}  {before}\n{'':10}-> {after}")
        print("seconds after each kind of line:")
        for kind, total in kinds.items():
            print(f"{total:8.3f}  {kind}")
        if args.out:
            shutil.copy(r.log, args.out)


if __name__ == "__main__":
    main()
