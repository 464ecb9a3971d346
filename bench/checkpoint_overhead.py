"""warmstart's own cost around CRIU in one checkpoint: everything but the dump.

Starts a process holding ``--mib`` of patterned memory, checkpoints it with
``--durability none`` ``--rounds`` times (a fresh process each time), and prints
per-phase medians plus the *fixed cost*: the whole ``checkpoint()`` call minus
its ``dump`` phase (pre-flight, finding CRIU, the guard, checksums, residency
record, manifest, publish, stopping the original). Run as root:

    PYTHONPATH=src python bench/checkpoint_overhead.py [--mib 64] [--rounds 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from warmstart.host.process import wait_exits
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
from warmstart.store.local import LocalStore

HOLDER = """
import sys, time
mem = bytearray(bytes(range(256)) * 4096) * int(sys.argv[1])
open(sys.argv[2], "w").write("ready")
while True:
    time.sleep(0.05)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    phases: dict[str, list[float]] = defaultdict(list)
    fixed: list[float] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:
        store = LocalStore(Path(d) / "store")
        for i in range(args.rounds):
            ready = Path(d) / f"ready{i}"
            holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(args.mib), str(ready)],
                                      start_new_session=True)  # fmt: skip
            while not ready.exists():
                time.sleep(0.01)
            t0 = time.perf_counter()
            result = checkpoint(holder.pid, store=store, name=f"o{i}", options=CheckpointOptions(durable=False))
            took = time.perf_counter() - t0
            holder.wait()
            wait_exits([holder.pid])
            by_name = {p.name.strip(): p.seconds for p in result.timer.phases}
            for name, seconds in by_name.items():
                phases[name].append(seconds)
            fixed.append(took - by_name["dump"])
            store.remove(f"o{i}")
    print(f"{args.rounds} checkpoints of {args.mib} MiB, --durability none; medians in ms")
    for name, values in phases.items():
        print(f"  {name:<16} {statistics.median(values) * 1e3:8.2f}")
    print(f"fixed cost (call minus dump): median {statistics.median(fixed) * 1e3:.1f} ms, "
          f"min {min(fixed) * 1e3:.1f}, max {max(fixed) * 1e3:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
