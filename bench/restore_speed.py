"""Restore speed: warmstart's restore against the naive pipeline on the same snapshot.

The snapshot is taken once by warmstart. Then, alternating, each round
restores it with

* naive: bare ``criu restore -d`` on the snapshot's images, then (GPU) the
  driver's restore + unlock calls, nothing else;
* naive-dense: the same on a copy of the images with every hole filled in
  (what a plain ``criu dump`` writes: warmstart punches zero runs out of its
  page images, which also spares bare CRIU the disk reads of them);
* warmstart: ``warmstart.snapshot.restore`` with its parallel page server
  (``--criu-pages``: without it), checksums verified, hand-over to the worker,

with the page cache warm and, with ``--cold``, after dropping it. A restore
is timed until the tree runs with its GPU state back. With ``--model`` the
worker is the reference server and warmstart's restores are also timed to
the first completion on the restored worker. Run as root:

    python bench/restore_speed.py --mib 2048 --rounds 3 --cold          # CPU tree
    python bench/restore_speed.py --model DIR --device cuda --cold      # GPU worker
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "bench")]

from _support import Tree, start_tree  # noqa: E402
from coldstart import first_token, free_port, http_client, serve_cmd  # noqa: E402
from naive import bare_restore  # noqa: E402

from warmstart import protocol  # noqa: E402
from warmstart.host.criu import LOG_LEVEL_ENV  # noqa: E402
from warmstart.host import pageserver  # noqa: E402
from warmstart.host.process import kill_tree  # noqa: E402
from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint  # noqa: E402
from warmstart.snapshot.manifest import IMAGES_DIR  # noqa: E402
from warmstart.snapshot.restore import RestoreRequest, restore  # noqa: E402
from warmstart.store.local import LocalStore  # noqa: E402


ONE_TOKEN = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def ours(
    store: LocalStore, name: str, control: Path | None, port: int | None, parallel: bool, who: str
) -> tuple[float, int, dict[str, float], float | None]:
    env = {"WARMSTART_PORT": str(port)} if port else {}
    lazy = who.startswith("lazy")
    request = RestoreRequest(control_dir=control, env=env, parallel_pages=parallel or lazy, lazy=lazy,
                             prefetch=who.endswith("prefetch"), verify=who != "noverify")  # fmt: skip
    short = pageserver.SWITCH_INTERVAL
    if who == "long-switch":  # the page server's short GIL slices off, for an A/B in one run
        pageserver.SWITCH_INTERVAL = sys.getswitchinterval()
    level = os.environ.pop(LOG_LEVEL_ENV, None)
    if who == "criu-v4":  # CRIU logging at debug level, for an A/B in one run
        os.environ[LOG_LEVEL_ENV] = "4"
    load_runs = pageserver.RunsCache.__dict__["load"]  # the classmethod itself, put back below
    if who == "parse":  # the snapshot's decoded pagemaps ignored: decoded from the images again
        pageserver.RunsCache.load = classmethod(lambda cls, path: None)  # type: ignore[method-assign,assignment]
    try:
        t0 = time.perf_counter()
        r = restore(name, store=store, request=request)
        took = time.perf_counter() - t0
    finally:
        pageserver.SWITCH_INTERVAL = short
        pageserver.RunsCache.load = load_runs  # type: ignore[method-assign]
        os.environ.pop(LOG_LEVEL_ENV, None)
        if level is not None:
            os.environ[LOG_LEVEL_ENV] = level
    ttft = first_token(port, t0, {}, 60, ONE_TOKEN)[1] if port else None
    return took, r.pid, {p.name.strip(): p.seconds for p in r.timer.phases}, ttft


def snapshot_worker(args: argparse.Namespace, store: LocalStore, work: Path) -> tuple[str, Path | None]:
    codec = None if args.compress == "none" else args.compress
    if args.model is None:
        tree = start_tree(work / "tree", args.mib, args.zero_mib)
        checkpoint(tree.pid, store=store, name="speed", options=CheckpointOptions(compress=codec))
        tree.popen.wait()
        return "speed", None
    control = work / "control"
    control.mkdir()
    worker = subprocess.Popen(
        serve_cmd(args.model, args.device, args.kv_gib, free_port()),
        stdin=subprocess.DEVNULL, stdout=open(work / "worker.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, protocol.CONTROL_DIR_ENV: str(control)},
    )  # fmt: skip
    while not (control / protocol.READY_FOR_SNAPSHOT).exists():
        if worker.poll() is not None:
            raise SystemExit((work / "worker.log").read_text()[-3000:])
        time.sleep(0.05)
    ready = protocol.read_model(control / protocol.READY_FOR_SNAPSHOT, protocol.ReadyInfo)
    labels = {"checkpoint_id": ready.checkpoint_id} if ready.checkpoint_id else {}
    checkpoint(ready.pid, store=store, name="speed", options=CheckpointOptions(labels=labels, compress=codec))
    worker.wait()
    return "speed", control


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=2048, help="CPU tree: MiB of patterned memory")
    ap.add_argument("--zero-mib", type=int, default=0, help="CPU tree: MiB of memory holding zeros")
    ap.add_argument("--model", help="reference-server model dir (GPU worker)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also with a dropped page cache")
    ap.add_argument("--compress", default="none", choices=["none", "zstd", "lz4"],
                    help="take the snapshot with checkpoint --compress")  # fmt: skip
    ap.add_argument("--criu-pages", action="store_true",
                    help="warmstart without its page server (CRIU fills memory)")  # fmt: skip
    ap.add_argument("--modes", nargs="+", default=["naive", "warmstart", "lazy"],
                    choices=["naive", "naive-dense", "warmstart", "lazy", "prefetch", "lazy+prefetch", "noverify",
                             "long-switch", "criu-v4", "parse"],
                    help="lazy: warmstart restore --lazy (runs while the pages are filled); "
                         "prefetch: warmstart restore --prefetch; "
                         "noverify: warmstart restore --no-verify (what the checksums cost); "
                         "long-switch: warmstart with Python's default 5 ms GIL switch interval during the "
                         "page server's work (it shortens it to 0.2 ms); "
                         "criu-v4: warmstart with CRIU's log at level 4 (debug), not its default 2; "
                         "parse: warmstart decoding the pagemaps at restore, not from the snapshot's "
                         "pagemap-runs.bin")  # fmt: skip
    ap.add_argument("--trace", type=Path, help="write each restore's page-server trace here (bench/fill_trace.py)")
    args = ap.parse_args()
    http_client()  # made before anything is timed
    gpu = args.model is not None and args.device.startswith("cuda")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        work = Path(d)
        store = LocalStore(work / "store")
        name, control = snapshot_worker(args, store, work)
        size = store.manifest(name).total_bytes
        compressed = store.manifest(name).compression is not None
        dense = work / "dense-images"
        if "naive-dense" in args.modes:
            subprocess.run(["cp", "-r", "--sparse=never", str(store.path_of(name) / IMAGES_DIR), str(dense)],
                           check=True)  # fmt: skip
        print(f"snapshot {size / 1e9:.2f} GB, {store.manifest(name).sparse_bytes / 1e9:.2f} GB of it holes",
              flush=True)  # fmt: skip
        results: dict[str, list[float]] = {}
        phases: dict[str, list[dict[str, float]]] = {}
        for cache in ["warm", "cold"] if args.cold else ["warm"]:
            for rnd in range(args.rounds):
                for who in args.modes:
                    if cache == "cold":
                        drop_caches()
                    if args.trace:
                        args.trace.mkdir(parents=True, exist_ok=True)
                        os.environ["WARMSTART_PAGES_TRACE"] = str(args.trace / f"{cache}-{who}-{rnd}.json")
                    if who in ("naive", "naive-dense"):
                        if compressed:
                            continue  # bare CRIU cannot read compressed images
                        took, pid = bare_restore(store, name, gpu, dense if who == "naive-dense" else None)
                    else:
                        port = free_port() if control else None
                        took, pid, ph, ttft = ours(store, name, control, port, not args.criu_pages, who)
                        phases.setdefault(f"{cache}/{who}", []).append(ph)
                        if ttft is not None:
                            results.setdefault(f"{cache}/{who}/first-token", []).append(ttft)
                    results.setdefault(f"{cache}/{who}", []).append(took)
                    print(f"{cache} {who}: {took:.2f} s", flush=True)
                    if control is None:
                        Tree(work / "tree", None, pid).wait_progress(60)
                    kill_tree(pid)
                    time.sleep(0.5)
    med = {k: statistics.median(v) for k, v in results.items()}
    out = {"snapshot_bytes": size, "rounds": args.rounds, "median_s": med, "all_s": results,
           "warmstart_phases": phases}  # fmt: skip
    print(json.dumps(out, indent=1))
    print(f"snapshot {size / 1e9:.2f} GB, {args.rounds} rounds, medians:")
    print(f"{'cache':>5} {'mode':>11} {'restore s':>9} {'vs naive':>8} {'vs dense':>8} {'GB/s':>6} "
          f"{'1st token s':>11}")  # fmt: skip
    for cache in ("warm", "cold"):
        n = med.get(f"{cache}/naive")
        nd = med.get(f"{cache}/naive-dense")
        for who in args.modes:
            if (w := med.get(f"{cache}/{who}")) is None:
                continue
            ft = med.get(f"{cache}/{who}/first-token")
            print(f"{cache:>5} {who:>11} {w:>9.2f} {'-' if n is None else f'{n / w:.2f}x':>8} "
                  f"{'-' if nd is None else f'{nd / w:.2f}x':>8} "
                  f"{size / w / 1e9:>6.2f} {'' if ft is None else f'{ft:.2f}':>11}")  # fmt: skip

if __name__ == "__main__":
    main()
