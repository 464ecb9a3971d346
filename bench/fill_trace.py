"""Summarize a page-server trace (``restore_speed.py --trace DIR`` / ``WARMSTART_PAGES_TRACE``).

For each trace: how the fill progressed (chunks, bytes, seconds, threads busy, and
the batches of small runs apart), and the faults taken by running tasks (``--lazy``;
before the fill begins: CRIU's restorer): how many, when, in which order, how much
they placed. The event fields are documented at ``PageServer.trace_path``.

    python bench/fill_trace.py DIR/*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def summarize(path: Path) -> str:
    events = json.loads(path.read_text())["events"]
    chunks = [e for e in events if e["kind"] == "chunk"]
    faults = [e for e in events if e["kind"] == "fault"]
    if not chunks:
        return f"{path.name}: no chunks"
    t0 = min(e["began"] for e in chunks)
    took = max(e["ended"] for e in chunks) - t0
    placed = sum(e["bytes"] for e in chunks)
    busy = sum(e["ended"] - e["began"] for e in chunks)
    lines = [f"{path.name}: {len(chunks)} chunks, {placed / 1e9:.2f} GB in {took:.3f} s "
             f"({placed / took / 1e9 if took else 0:.2f} GB/s; threads busy {busy:.2f} s in all)"]  # fmt: skip
    batches = [e for e in chunks if e["runs"]]
    if batches:
        lines.append(f"  batches of small runs: {len(batches)}, {sum(e['runs'] for e in batches)} runs, "
                     f"{sum(e['bytes'] for e in batches) / 1e9:.2f} GB, "
                     f"{sum(e['ended'] - e['began'] for e in batches):.3f} s (one lane), "
                     f"last done at {max(e['ended'] for e in batches) - t0:.3f} s")  # fmt: skip
    if faults:
        ts = sorted(f["at"] - t0 for f in faults)
        addrs = [f["addr"] for f in sorted(faults, key=lambda f: f["at"])]
        rising = sum(b > a for a, b in zip(addrs, addrs[1:], strict=False))
        lines.append(f"  faults: {len(faults)}, {sum(f['bytes'] for f in faults) / 1e6:.1f} MB placed by them; "
                     f"seconds after the fill began: first {ts[0]:.3f}, median {ts[len(ts) // 2]:.3f}, "
                     f"last {ts[-1]:.3f}; address rising {rising} of {len(addrs) - 1} times")  # fmt: skip
    marks = [(e.get("name") or e["kind"], e["at"]) for e in events if e["kind"] in ("mark", "finished")]
    marks += [(f"uffd of PID {e['pid']}", e["at"]) for e in events if e["kind"] == "task"]
    marks += [(f"PID {e['pid']} served", e["ready"]) for e in events if e["kind"] == "task" and "ready" in e]
    if marks:
        base = min(at for _, at in marks)
        lines.append("  timeline (s from the first mark; the fill began at "
                     f"{t0 - base:.3f}): " + ", ".join(f"{n} {at - base:.3f}" for n, at in sorted(marks, key=lambda m: m[1])))  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
