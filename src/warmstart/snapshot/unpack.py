"""A directory CRIU can restore from, for a snapshot with compressed page images.

CRIU reads ``pages-<id>.img`` itself, so the restore gets a view of the
snapshot's images in its run directory: every file a symlink to the store,
except each compressed pages image, which becomes a raw file of the right
size. With warmstart's page server, only the runs CRIU reads itself (those
not flagged lazy: stacks, shared memory) are decompressed into it, sparse;
the page server decompresses the rest straight into the restored tasks.
Without it, the whole image is decompressed, chunks in parallel.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from warmstart.host.pagemap import PE_PRESENT, PageRun, read_pagemap_file
from warmstart.store.compress import CODECS, CompressedPages, suffix


def eager_runs(images: Path) -> dict[str, list[PageRun]]:
    """Raw pages image name -> the runs CRIU itself reads from it in a lazy restore."""
    out: dict[str, list[PageRun]] = {}
    for pm_path in sorted(images.glob("pagemap-*.img")):
        pm = read_pagemap_file(pm_path)
        runs = out.setdefault(pm.pages.name, [])
        runs += [r for r in pm.runs if r.flags & PE_PRESENT and not r.lazy]
    return out


def unpack_view(images: Path, view: Path, *, lazy: bool) -> int:
    """Build ``view`` for CRIU; return the raw bytes decompressed into it."""
    view.mkdir(parents=True, exist_ok=True)
    packed: dict[Path, str] = {}
    for f in sorted(images.iterdir()):
        codec = next((c for c in CODECS if f.name.startswith("pages-") and f.name.endswith(suffix(c))), None)
        if codec is None:
            os.symlink(f, view / f.name)
        else:
            packed[f] = f.name[: -len(suffix(codec))]
    needed = eager_runs(images) if lazy else {}
    written = 0
    with ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="unpack") as pool:
        for src, raw_name in packed.items():
            reader = CompressedPages(src)
            try:
                dest = view / raw_name
                if raw_name not in needed:
                    written += reader.decompress_to(dest, pool)
                    continue
                written += _write_runs(reader, dest, needed[raw_name], pool)
            finally:
                reader.close()
    return written


def _write_runs(reader: CompressedPages, dest: Path, runs: list[PageRun], pool: ThreadPoolExecutor) -> int:
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, reader.raw_size)  # sparse: the lazy runs are never read from here

        def one(run: PageRun) -> int:
            buf = bytearray(run.length)
            got = reader.readinto(memoryview(buf), run.offset)
            return os.pwrite(fd, memoryview(buf)[:got], run.offset)

        return sum(pool.map(one, runs))
    finally:
        os.close(fd)
