"""Can this snapshot restore on this host? Decided before anything runs."""

from __future__ import annotations

from warmstart.errors import Incompatible
from warmstart.snapshot.manifest import HostInfo, Manifest


def check_host(manifest: Manifest, here: HostInfo) -> None:
    src = manifest.source
    if src.arch != here.arch:
        raise Incompatible(
            f"snapshot {manifest.name!r} was taken on {src.arch}, this host is {here.arch}",
            hint="restore it on a host of the same architecture",
        )
    missing = sorted(set(src.cpu_flags) - set(here.cpu_flags))
    if missing:
        raise Incompatible(
            f"this CPU lacks {', '.join(missing)}, which the snapshot's host had",
            hint="restore on a CPU of the same or a newer generation, or re-take the snapshot here",
        )
