"""The snapshot's record of its tree's page-cache-resident file pages (``prefetch.json``).

Written at checkpoint time while the tree is stopped, checked like every other
snapshot file, and read back by a restore, which asks the kernel to read
those ranges in as soon as the tree runs, while its GPU state comes back,
instead of the worker faulting them in from disk one by one
(:mod:`warmstart.host.residency`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from warmstart.host.residency import FileRanges, prefetch, resident_files
from warmstart.snapshot.manifest import FileEntry
from warmstart.store.integrity import digest_file

log = logging.getLogger(__name__)

PREFETCH_FILE = "prefetch.json"


def record(snapshot_dir: Path, pids: Iterable[int]) -> FileEntry:
    """Write ``prefetch.json`` for ``pids`` into ``snapshot_dir``; return its manifest entry."""
    files = resident_files(pids)
    doc = {
        "version": 1,
        "files": [
            {"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns, "ranges": list(f.ranges)}
            for f in files
        ],
    }
    path = Path(snapshot_dir) / PREFETCH_FILE
    path.write_text(json.dumps(doc, separators=(",", ":")))
    path.chmod(0o600)
    size, digest = digest_file(path)
    return FileEntry(path=PREFETCH_FILE, size=size, digest=digest)


def load(snapshot_dir: Path) -> list[FileRanges]:
    """The recorded ranges; empty for snapshots without (or with an unreadable) record."""
    try:
        doc = json.loads((Path(snapshot_dir) / PREFETCH_FILE).read_text())
        return [
            FileRanges(f["path"], int(f["size"]), int(f["mtime_ns"]),
                       tuple((int(o), int(n)) for o, n in f["ranges"]))  # fmt: skip
            for f in doc["files"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


class Prefetch:
    """Readahead of a snapshot's recorded file pages on a background thread."""

    def __init__(self, files: list[FileRanges]) -> None:
        self.files = files
        self.requested = 0
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    @classmethod
    def start(cls, snapshot_dir: Path) -> Prefetch | None:
        files = load(snapshot_dir)
        if not files:
            return None
        job = cls(files)
        job._thread.start()
        return job

    def _run(self) -> None:
        try:
            self.requested = prefetch(self.files)
        except Exception as exc:  # noqa: BLE001 - an optimisation: never fails a restore
            log.debug("prefetch failed: %s", exc)
        finally:
            self.done.set()
