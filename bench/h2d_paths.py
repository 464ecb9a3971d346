"""How fast can weights go from a file in the page cache to GPU memory, by which path?

Issue 7 asks the memory service to stream weights at >= 80 % of the host's
host-to-device bandwidth. This measures, on one file held in the page cache
and one device allocation of the service's kind (``cuMemCreate``), in the
same run:

* ``pinned``: the ceiling, pinned buffers copied again and again: one 1 GiB
  copy (as torch's ``pin_memory`` copy measures it), 64 MiB copies queued back
  to back on one stream, and 1-8 lanes each copying its own buffer and waiting;
* ``pageable``: one ``cuMemcpyHtoD`` per chunk straight from the file's mapping;
* ``staged``: the service's loader as it is (``warmstart.gms.loader.fill``:
  ``preadv`` into pinned staging buffers, xxh3 of each chunk, copy overlapped
  with the next read), with 4, 8 and 16 lanes, each lane on a copy stream of
  its own and (``--copy-streams``) all lanes on 1 or 2 shared streams;
* ``staged-nohash``: the same without the hash;
* ``registered``: no staging copy: each 64 MiB chunk of the file's mapping is
  pinned where it lies (``cuMemHostRegister``, read-only), copied, and
  unpinned, on 4, 8 and 16 lanes, with and without the hash (read from the
  same mapping); ``registered rw``: the same from a writable shared mapping
  (what the kernel allows for files in tmpfs).

    python bench/h2d_paths.py --gib 8 [--json OUT]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from warmstart.gms.cuda import CudaServer
from warmstart.gms.layout import DIGEST_CHUNK, _xxh3_128bits
from warmstart.gms.loader import FillFile, fill

CU_MEMHOSTREGISTER_READ_ONLY = 0x08
CHUNK = DIGEST_CHUNK


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = os.urandom(CHUNK)
    with open(path, "wb") as f:
        for pos in range(0, size, CHUNK):
            f.write(block[: min(CHUNK, size - pos)])
    with open(path, "rb") as f:  # into the page cache
        while f.read(CHUNK):
            pass


def lanes_run(lanes: int, size: int, body: Callable[[int, int], None], setup: Callable[[], None]) -> float:
    """Run ``body(offset, length)`` over every chunk on ``lanes`` threads; seconds."""
    offsets = list(range(0, size, CHUNK))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def lane() -> None:
        try:
            setup()
            while True:
                with lock:
                    if not offsets:
                        return
                    off = offsets.pop(0)
                body(off, min(CHUNK, size - off))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=lane) for _ in range(lanes)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=8)
    ap.add_argument("--file", type=Path, default=Path("/var/tmp/h2d-paths.bin"))
    ap.add_argument("--lanes", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--copy-streams", type=int, nargs="+", default=[0, 1, 2],
                    help="the loader's shared copy streams to try (0: one per lane)")
    ap.add_argument("--only", choices=["pinned", "staged"], help="run only these paths")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    size = int(args.gib * (1 << 30)) // CHUNK * CHUNK
    make_file(args.file, size)

    server = CudaServer(0)
    drv = server.driver
    d = server._d
    gran = server.granularity
    alloc = -(-size // gran) * gran
    handle = server.create(alloc)
    target = server.open_fill(handle, alloc)
    hasher = _xxh3_128bits()
    fd = os.open(args.file, os.O_RDONLY)
    # The file mapped read-only at an address of our own (Python's mmap gives no address).
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    base = int(libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0))
    results: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        results[name] = size / seconds / 1e9
        print(f"{name:28s} {seconds:7.3f} s  {results[name]:6.2f} GB/s", flush=True)

    # pinned ceiling: 8 lanes, each copying its own pinned buffer over and over
    pinned: dict[int, tuple[int, ctypes.c_void_p]] = {}

    def pinned_setup() -> None:
        d.current()
        p, s = ctypes.c_void_p(), ctypes.c_void_p()
        drv.call("cuMemHostAlloc", ctypes.pointer(p), CHUNK, 0)
        drv.call("cuStreamCreate", ctypes.pointer(s), 1)
        pinned[threading.get_ident()] = (int(p.value or 0), s)

    def pinned_body(off: int, n: int) -> None:
        p, s = pinned[threading.get_ident()]
        drv.call("cuMemcpyHtoDAsync_v2", target + off, p, n, s)
        drv.call("cuStreamSynchronize", s)

    big, stream = ctypes.c_void_p(), ctypes.c_void_p()
    d.current()
    drv.call("cuMemHostAlloc", ctypes.pointer(big), 1 << 30, 0)
    drv.call("cuStreamCreate", ctypes.pointer(stream), 1)
    span = min(size, 1 << 30)

    def one_copy() -> float:
        best = 0.0
        for _ in range(3):
            t0 = time.perf_counter()
            drv.call("cuMemcpyHtoDAsync_v2", target, big, span, stream)
            drv.call("cuStreamSynchronize", stream)
            took = time.perf_counter() - t0
            best = took if not best else min(best, took)
        return best * size / span

    def queued() -> float:
        t0 = time.perf_counter()
        for off in range(0, size, CHUNK):
            n = min(CHUNK, size - off)
            drv.call("cuMemcpyHtoDAsync_v2", target + off, (big.value or 0) + off % span, n, stream)
        drv.call("cuStreamSynchronize", stream)
        return time.perf_counter() - t0

    if args.only != "staged":
        record("pinned 1 GiB copy", one_copy())
        record("pinned queued, 1 stream", queued())
        for lanes in (1, 2, 4, 8):
            pinned.clear()
            record(f"pinned x{lanes}", lanes_run(lanes, size, pinned_body, pinned_setup))
    drv.call("cuMemFreeHost", big)
    drv.call("cuStreamDestroy_v2", stream)
    if args.only == "pinned":
        args.lanes, args.copy_streams = [], []

    def pageable_body(off: int, n: int) -> None:
        drv.call("cuMemcpyHtoD_v2", target + off, base + off, n)

    if args.only is None:
        record("pageable x8", lanes_run(8, size, pageable_body, d.current))

    for streams in args.copy_streams:
        loader = server if streams == 0 else CudaServer(0, copy_streams=streams)
        warm = [loader.lane(CHUNK) for _ in range(max(args.lanes, default=0))]
        for lane in warm:  # pinned buffers allocated before the clock, as in a running service
            lane.close()
        for lanes in args.lanes:
            files = [FillFile("w", str(args.file), 0, size, target)]
            t0 = time.perf_counter()
            fill(loader, files, lanes=lanes)
            record(f"staged (loader) x{lanes}" + (f" {streams} stream(s)" if streams else ""),
                   time.perf_counter() - t0)  # fmt: skip
        if loader is not server:
            loader.close()
    if args.only is not None:
        args.lanes = []

    def staged_nohash(lanes: int) -> float:
        state: dict[int, tuple[ctypes.c_void_p, list[int], list[memoryview]]] = {}

        def setup() -> None:
            d.current()
            s = ctypes.c_void_p()
            drv.call("cuStreamCreate", ctypes.pointer(s), 1)
            ptrs, views = [], []
            for _ in range(2):
                p = ctypes.c_void_p()
                drv.call("cuMemHostAlloc", ctypes.pointer(p), CHUNK, 0)
                ptrs.append(int(p.value or 0))
                views.append(memoryview((ctypes.c_char * CHUNK).from_address(int(p.value or 0))).cast("B"))
            state[threading.get_ident()] = (s, ptrs, views)

        def body(off: int, n: int) -> None:
            s, ptrs, views = state[threading.get_ident()]
            os.preadv(fd, [views[0][:n]], off)
            drv.call("cuStreamSynchronize", s)
            drv.call("cuMemcpyHtoDAsync_v2", target + off, ptrs[0], n, s)
            ptrs.reverse()
            views.reverse()

        took = lanes_run(lanes, size, body, setup)
        for s, _, _ in state.values():
            drv.call("cuStreamSynchronize", s)
        return took

    for lanes in args.lanes:
        record(f"staged-nohash x{lanes}", staged_nohash(lanes))

    def registered(lanes: int, hashed: bool, base: int = base, flags: int = CU_MEMHOSTREGISTER_READ_ONLY) -> float:
        streams: dict[int, ctypes.c_void_p] = {}

        def setup() -> None:
            d.current()
            s = ctypes.c_void_p()
            drv.call("cuStreamCreate", ctypes.pointer(s), 1)
            streams[threading.get_ident()] = s

        def body(off: int, n: int) -> None:
            s = streams[threading.get_ident()]
            drv.call("cuMemHostRegister_v2", base + off, n, flags)
            drv.call("cuMemcpyHtoDAsync_v2", target + off, base + off, n, s)
            if hashed and hasher:
                hasher(base + off, n)
            drv.call("cuStreamSynchronize", s)
            drv.call("cuMemHostUnregister", base + off)

        return lanes_run(lanes, size, body, setup)

    try:
        for lanes in args.lanes if args.only is None else []:
            record(f"registered x{lanes}", registered(lanes, False))
            record(f"registered+hash x{lanes}", registered(lanes, True))
    except Exception as exc:  # noqa: BLE001 - the driver may refuse page-cache pages
        print(f"registered: {str(exc).splitlines()[0][:160]}", flush=True)

    # A writable shared mapping pinned in place: the kernel lets the driver pin shmem
    # (tmpfs, /dev/shm) pages for good, not those of a disk file system.
    rw_fd = os.open(args.file, os.O_RDWR)
    base_rw = int(libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, rw_fd, 0))
    try:
        for lanes in args.lanes if args.only is None else []:
            record(f"registered rw x{lanes}", registered(lanes, False, base_rw, 0))
            record(f"registered rw+hash x{lanes}", registered(lanes, True, base_rw, 0))
    except Exception as exc:  # noqa: BLE001
        print(f"registered rw: {str(exc).splitlines()[0][:160]}", flush=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.munmap(base_rw, size)
    os.close(rw_fd)

    def hash_only(off: int, n: int) -> None:
        hasher(base + off, n)

    if hasher and args.only is None:
        record("hash only x8", lanes_run(8, size, hash_only, lambda: None))

    def register_only(off: int, n: int) -> None:
        drv.call("cuMemHostRegister_v2", base + off, n, CU_MEMHOSTREGISTER_READ_ONLY)
        drv.call("cuMemHostUnregister", base + off)

    try:
        if args.only is None:
            record("register+unregister x8", lanes_run(8, size, register_only, d.current))
    except Exception as exc:  # noqa: BLE001
        print(f"register: {str(exc).splitlines()[0][:160]}", flush=True)

    server.close_fill(target, alloc)
    server.release(handle)
    if args.json:
        args.json.write_text(json.dumps({"gib": args.gib, "gb_per_s": results}, indent=1))
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
