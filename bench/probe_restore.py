"""What bounds a restore: the memory layout of a checkpointed worker and the
machine's ceilings, next to CRIU restore variants on the same images.

Run as root on a GPU machine (environment from scripts/device-env.sh):

    python3 bench/probe_restore.py --model /var/tmp/q --device cuda

Prints JSON: the worker's mappings by kind once its GPU state sits in host
memory, memcpy / page-cache / disk / host-to-device bandwidths, and the
seconds of ``criu restore`` (plain, warm and cold cache; cold with a parallel
prefetch; lazy pages) each followed by the driver's restore + unlock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from warmstart import protocol  # noqa: E402
from warmstart.gpu.driver import load_driver  # noqa: E402
from warmstart.host.criu import find_criu  # noqa: E402
from warmstart.host.process import kill_tree  # noqa: E402

CHUNK = 8 << 20


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def smaps_summary(pid: int) -> dict[str, float]:
    kinds: dict[str, float] = {}
    current = "?"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5:
            path = " ".join(head[5:]) if len(head) > 5 else ""
            shared = head[1][3] == "s"
            if not path:
                current = "anon-shared" if shared else "anon-private"
            elif path.startswith("/memfd:") or path.startswith("/dev/zero") or path.startswith("/SYSV"):
                current = ("shm:" + path.split()[0])[:60]
            elif path.startswith("["):
                current = path
            elif path.startswith("/dev/"):
                current = "dev:" + path
            else:
                current = "file-shared" if shared else "file-private"
        elif head[0] == "Rss:":
            kinds[current] = kinds.get(current, 0.0) + int(head[1]) * 1024 / 1e9
    return {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v > 0.001}


def zero_census(images: Path) -> dict[str, float]:
    """How much of the page images is zero pages, and how much sits in zero runs of >= 64 KiB."""
    import numpy as np

    total = zero = in_runs = 0
    for f in sorted(images.glob("pages-*.img")):
        run = 0
        with f.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                pages = np.frombuffer(chunk[: len(chunk) // 4096 * 4096], dtype=np.uint64).reshape(-1, 512)
                empty = ~pages.any(axis=1)
                total += len(empty) * 4096
                zero += int(empty.sum()) * 4096
                for is_zero in empty.tolist():  # run lengths across chunk borders
                    if is_zero:
                        run += 1
                    else:
                        in_runs += run * 4096 if run >= 16 else 0
                        run = 0
        in_runs += run * 4096 if run >= 16 else 0
    return {"pages_GB": round(total / 1e9, 3), "zero_GB": round(zero / 1e9, 3),
            "zero_in_64KiB_runs_GB": round(in_runs / 1e9, 3)}  # fmt: skip


def read_files(files: list[Path], threads: int) -> float:
    def one(job: tuple[Path, int]) -> int:
        path, off = job
        with open(path, "rb", buffering=0) as f:
            return len(os.pread(f.fileno(), CHUNK, off))

    jobs = [(p, off) for p in files for off in range(0, p.stat().st_size, CHUNK)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        n = sum(pool.map(one, jobs))
    return n / (time.perf_counter() - t0) / 1e9


def bandwidths(images: Path) -> dict[str, float]:
    import torch

    out: dict[str, float] = {}
    a = torch.empty(1 << 30, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    for t in (1, 8, os.cpu_count() or 1):
        torch.set_num_threads(t)
        b.copy_(a)
        t0 = time.perf_counter()
        b.copy_(a)
        out[f"memcpy_{t}t_GBps"] = a.numel() / (time.perf_counter() - t0) / 1e9
    files = sorted(images.glob("pages-*.img"))
    out["pagecache_read_1t_GBps"] = read_files(files, 1)
    out["pagecache_read_16t_GBps"] = read_files(files, 16)
    drop_caches()
    out["disk_read_1t_GBps"] = read_files(files, 1)
    drop_caches()
    out["disk_read_16t_GBps"] = read_files(files, 16)
    drop_caches()
    out["disk_read_64t_GBps"] = read_files(files, 64)
    if torch.cuda.is_available():
        pinned = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
        dev = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        for name, src in (("h2d_pinned_GBps", pinned), ("h2d_pageable_GBps", a)):
            dev.copy_(src)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dev.copy_(src)
            torch.cuda.synchronize()
            out[name] = src.numel() / (time.perf_counter() - t0) / 1e9
    return {k: round(v, 2) for k, v in out.items()}


def start_worker(model: str, device: str, kv: float, control: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "warmstart", "serve", "--model", model, "--device", device,
         "--kv-cache-gib", str(kv), "--port", "18555"],
        stdin=subprocess.DEVNULL, stdout=open(control / "log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True, env={**os.environ, protocol.CONTROL_DIR_ENV: str(control)},
    )  # fmt: skip


def restore_variant(criu: str, images: Path, mode: str, log: Path, gpu: bool) -> dict[str, object]:
    try:
        return _restore_variant(criu, images, mode, log, gpu)
    except Exception as exc:  # a probe reports what failed and goes on
        return {"error": f"{type(exc).__name__}: {exc}"}


def _restore_variant(criu: str, images: Path, mode: str, log: Path, gpu: bool) -> dict[str, object]:
    drv = load_driver() if gpu else None
    pidfile = log.with_suffix(".pid")
    pidfile.unlink(missing_ok=True)
    base = [criu, "restore", "-D", str(images), "-d", "--pidfile", str(pidfile), "--file-locks",
            "-o", str(log), "-v2"]  # fmt: skip
    res: dict[str, float] = {}
    daemon = None
    prefetch = None
    if mode.startswith("cold"):
        drop_caches()
    t0 = time.perf_counter()
    if mode == "cold+prefetch":
        files = sorted(images.glob("pages-*.img"), key=lambda p: -p.stat().st_size)
        prefetch = threading.Thread(target=read_files, args=(files, 32))
        prefetch.start()
    if mode.endswith("lazy"):
        sock = images / "lazy.sock"
        daemon = subprocess.Popen([criu, "lazy-pages", "-D", str(images), "--address", str(sock),
                                   "-o", str(log.with_suffix(".lazy.log")), "-v2"])  # fmt: skip
        base += ["--lazy-pages", "--address", str(sock)]
        time.sleep(0.2)
    subprocess.run(base, check=True, timeout=300)
    res["criu_restore_s"] = time.perf_counter() - t0
    pid = int(pidfile.read_text())
    t1 = time.perf_counter()
    if drv is not None:
        drv.restore(pid)
        drv.unlock(pid)
    res["gpu_restore_s"] = time.perf_counter() - t1
    res["total_s"] = time.perf_counter() - t0
    if daemon is not None:
        daemon.wait(300)
        res["lazy_all_pages_s"] = time.perf_counter() - t0
    if prefetch is not None:
        prefetch.join()
    kill_tree(pid)
    return {k: round(v, 3) for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--modes", nargs="*", default=["warm", "warm", "cold", "cold+prefetch", "warm-lazy"])
    args = ap.parse_args()
    criu = str(find_criu().path)
    gpu = args.device.startswith("cuda")
    drv = load_driver() if gpu else None
    work = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="probe-"))
    control = work / "control"
    control.mkdir()
    images = work / "img"
    images.mkdir()
    report: dict[str, object] = {}
    w = start_worker(args.model, args.device, args.kv_gib, control)
    try:
        while not (control / protocol.READY_FOR_SNAPSHOT).exists():
            if w.poll() is not None:
                raise SystemExit((control / "log").read_text()[-3000:])
            time.sleep(0.05)
        pid = w.pid
        report["worker_log"] = [line for line in (control / "log").read_text().splitlines()
                                if "checkpoint point" in line or "released" in line]  # fmt: skip
        report["rss_before_gpu_checkpoint_GB"] = smaps_summary(pid)
        if drv is not None:
            drv.lock(pid, 30000)
            t0 = time.perf_counter()
            drv.checkpoint(pid)
            report["gpu_checkpoint_s"] = round(time.perf_counter() - t0, 3)
        report["rss_after_gpu_checkpoint_GB"] = smaps_summary(pid)
        t0 = time.perf_counter()
        subprocess.run([criu, "dump", "-t", str(pid), "-D", str(images), "--file-locks",
                        "-o", str(work / "dump.log")], check=True)  # fmt: skip
        report["criu_dump_s"] = round(time.perf_counter() - t0, 3)
        w.wait()
    finally:
        if w.poll() is None:
            w.kill()
    report["images_GB"] = {p.name: round(p.stat().st_size / 1e9, 3) for p in images.iterdir()
                           if p.stat().st_size > 10_000_000}  # fmt: skip
    report["zero_pages"] = zero_census(images)
    print(json.dumps(report, indent=1), flush=True)
    report["restores"] = [{"mode": m, **restore_variant(criu, images, m, work / f"r{i}.log", gpu)}
                          for i, m in enumerate(args.modes)]  # fmt: skip
    report["bandwidth"] = bandwidths(images)
    print(json.dumps(report, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
