"""``warmstart doctor``: can this host checkpoint and restore?"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Annotated

import typer
from rich.table import Table

from warmstart.cli.app import app
from warmstart.cli.output import console, emit_json, progress
from warmstart.errors import EnvironmentProblem, WarmstartError
from warmstart.host.bandwidth import Bandwidth, cache_path, measure

_CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_CHECKPOINT_RESTORE": 40}


@dataclass
class Check:
    name: str
    ok: bool | None  # None: informational, not required
    detail: str


def _effective_caps() -> int:
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _privileges() -> Check:
    caps = _effective_caps()
    have = [n for n, bit in _CAPS.items() if caps >> bit & 1]
    ok = os.geteuid() == 0 or {"CAP_SYS_ADMIN", "CAP_SYS_PTRACE"} <= set(have)
    return Check("privileges", ok, f"euid {os.geteuid()}; {', '.join(have) or 'no checkpoint capabilities'}")


def _criu() -> list[Check]:
    from warmstart.host.criu import find_criu

    try:
        criu = find_criu(require_root=False)
    except WarmstartError as exc:
        return [Check("criu", False, str(exc))]
    checks = [Check("criu", True, f"{criu.version} at {criu.path}")]
    if os.geteuid() == 0:
        ok, text = criu.check()
        last = text.splitlines()[-1] if text else ""
        checks.append(Check("criu check", ok, last))
    return checks


def _gpu() -> list[Check]:
    from warmstart.gpu import get_inventory

    try:
        inv = get_inventory()
    except WarmstartError as exc:
        return [Check("nvidia driver", None, f"{exc} (only needed for GPU workers)")]
    f = inv.features
    checks = [
        Check(
            "nvidia driver",
            f.checkpoint_api,
            f"{inv.driver_version} (CUDA driver API {inv.cuda_driver_api}, via {inv.source})",
        ),
        Check(
            "gpu checkpoint features",
            None,
            f"checkpoint API: {'yes' if f.checkpoint_api else 'no'}; "
            f"restore onto another GPU: {'yes' if f.gpu_remap else 'no'}",
        ),
    ]
    for d in inv.devices:
        checks.append(
            Check(f"gpu {d.index}", None, f"{d.name}, {d.uuid}, {d.total_memory_bytes / 2**30:.1f} GiB")
        )
    return checks


def _gds() -> Check:
    """GPUDirect Storage (kvikio/cuFile), for the GPU memory service's weight loading."""
    try:
        import kvikio  # type: ignore[import-not-found]
    except ImportError:
        return Check("gpudirect storage", None,
                     "kvikio not installed; the memory service streams weights through pinned host buffers")  # fmt: skip
    try:
        mode = kvikio.defaults.compat_mode()
    except Exception as exc:  # noqa: BLE001 - any kvikio failure is just reported
        mode = f"unknown ({exc})"
    return Check("gpudirect storage", None,
                 f"kvikio {getattr(kvikio, '__version__', '?')}, compat mode {mode}; "
                 "the memory service does not use it yet (pinned host buffers)")  # fmt: skip


def _sparse_store() -> Check:
    from warmstart.host.sparse import keeps_holes
    from warmstart.store.local import default_root

    root = default_root()
    holes = keeps_holes(root)
    detail = {
        True: f"{root}: its filesystem keeps holes (zero pages of page images take no disk and are never read)",
        False: f"{root}: its filesystem keeps no holes (zero pages are stored and read like data)",
        None: f"{root}: cannot tell (not writable here)",
    }[holes]
    return Check("sparse page images", None, detail)


def collect() -> list[Check]:
    return [
        Check("kernel", None, f"{platform.release()} ({platform.machine()})"),
        _privileges(),
        *_criu(),
        *_gpu(),
        _gds(),
        _sparse_store(),
    ]


def _bandwidth(directory: Path, refresh: bool) -> tuple[Bandwidth, bool]:
    """The cached figures, or new ones (measured, then cached). (figures, measured now?)"""
    cached = None if refresh else Bandwidth.load()
    if cached is not None:
        return cached, False
    with progress(True, "measuring memory, disk and host-to-device bandwidth"):
        bw = measure(directory)
        try:
            from warmstart.gpu.bandwidth import h2d_pinned

            bw.h2d_pinned = h2d_pinned()
        except WarmstartError:
            pass  # no GPU here: the host figures stand alone
    try:
        bw.save()
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot cache the bandwidth figures at {cache_path()}: {exc.strerror}",
            hint="run as root, or set WARMSTART_CACHE to a writable directory",
        ) from None
    return bw, True


def _bandwidth_checks(bw: Bandwidth, fresh: bool) -> list[Check]:
    when = "measured now" if fresh else f"cached in {cache_path()}"
    rows = [
        Check("memcpy", None, f"{bw.memcpy_1t:.1f} GB/s one thread, {bw.memcpy_nt:.1f} GB/s {bw.threads} threads"),
        Check("populate fresh memory", None,
              f"{bw.populate_1t:.1f} GB/s one thread (CRIU's page restore), "
              f"{bw.populate_nt:.1f} GB/s {bw.threads} threads (warmstart's page server)"),
        Check("page-cache read", None, f"{bw.pagecache_read_nt:.1f} GB/s"),
        Check("disk read", None, "not measured" if bw.disk_read_nt is None
              else f"{bw.disk_read_nt:.2f} GB/s, {bw.threads} threads (cold restore ceiling)"),
    ]  # fmt: skip
    for uuid, rate in bw.h2d_pinned.items():
        rows.append(Check(f"h2d pinned {uuid[:12]}", None, f"{rate:.1f} GB/s (GPU restore ceiling)"))
    rows.append(Check("bandwidth figures", None, when))
    return rows


@app.command()
def doctor(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    bandwidth: Annotated[
        bool,
        typer.Option("--bandwidth", help="Also report (measure once, then cache) the ceilings restores are held to."),
    ] = False,
    refresh: Annotated[bool, typer.Option("--refresh", help="With --bandwidth: measure again.")] = False,
    scratch: Annotated[
        Path, typer.Option("--scratch", help="With --bandwidth: where to write the 1 GiB test file (the store's disk).")
    ] = Path("/var/tmp"),
) -> None:
    """Report whether this host can checkpoint and restore (CRIU, privileges, GPU driver)."""
    checks = collect()
    if bandwidth:
        bw, fresh = _bandwidth(scratch, refresh)
        checks += _bandwidth_checks(bw, fresh)
    ready = all(c.ok is not False for c in checks)
    if json_out:
        out: dict[str, object] = {"ready": ready, "checks": [asdict(c) for c in checks]}
        if bandwidth:
            out["bandwidth_GBps"] = asdict(bw)
        emit_json(out)
    else:
        table = Table(title="warmstart doctor", title_justify="left")
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail")
        mark = {True: "[green]ok[/]", False: "[red]FAIL[/]", None: "[dim]info[/]"}
        for c in checks:
            table.add_row(c.name, mark[c.ok], c.detail)
        console.print(table)
        console.print("[green]ready to checkpoint[/]" if ready else "[red]not ready[/]")
    raise typer.Exit(0 if ready else 1)
