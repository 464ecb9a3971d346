"""The naive restore pipeline the benches compare against: bare ``criu restore -d``
on a snapshot's images, then the CUDA driver's restore and unlock of each GPU
process, nothing else (no page server, no checks, no overlap)."""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

from warmstart import protocol
from warmstart.host.criu import DumpOptions, find_criu
from warmstart.host.process import wait_exits
from warmstart.snapshot.manifest import IMAGES_DIR
from warmstart.store.local import LocalStore


def bare_restore(store: LocalStore, name: str, gpu: bool, images: Path | None = None) -> tuple[float, int]:
    """Restore ``name`` the naive way; (seconds until the tree runs with its GPU state back, pid)."""
    manifest = store.manifest(name)
    images = images or store.path_of(name) / IMAGES_DIR
    criu = find_criu()
    pidfile = Path(tempfile.mktemp(prefix="naive-", suffix=".pid"))
    args = DumpOptions.from_record(manifest.criu_options).shared_args()
    wait_exits(p.pid for p in manifest.tree.processes)  # the checkpoint does not wait for its kill
    t0 = time.perf_counter()
    subprocess.run(
        [str(criu.path), "restore", "-D", str(images), "-d", "--pidfile", str(pidfile), *args,
         "-o", str(pidfile.with_suffix(".log"))],
        check=True,
    )  # fmt: skip
    pid = int(pidfile.read_text())
    if gpu:
        from warmstart.gpu.driver import load_driver

        drv = load_driver()
        for g in manifest.gpus:
            drv.restore(g.pid)
        for g in manifest.gpus:
            drv.unlock(g.pid)
    return time.perf_counter() - t0, pid


def hand_over(store: LocalStore, name: str, control_dir: Path, env: dict[str, str]) -> None:
    """Tell a worker restored the naive way that it runs again (the least an operator's
    script must do for a checkpoint-aware worker to serve)."""
    manifest = store.manifest(name)
    ctx = protocol.RestoreContext(snapshot_id=manifest.snapshot_id, snapshot_name=manifest.name, env=env,
                                  checkpoint_id=manifest.labels.get("checkpoint_id"))  # fmt: skip
    protocol.signal_file(control_dir, protocol.RESTORE_CONTEXT, ctx)
    protocol.signal_file(control_dir, protocol.RESTORE_COMPLETE)
