"""The mount policy: which of a container's mounts CRIU saves, recreates or treats as external.

It mirrors what ``runc checkpoint`` asks of CRIU (libcontainer/criu_linux.go):

=====================  ==========  ==========================================================
mount                  action      why / how
=====================  ==========  ==========================================================
``/`` (the rootfs)     root        restored onto the placeholder's rootfs (``criu --root``);
                                   its *changes* travel as the rootfs diff archive
proc, sysfs, devpts,   criu        CRIU mounts them afresh in the restored mount namespace;
mqueue, tmpfs                      tmpfs *contents* (``/dev``, ``/dev/shm``) are in the images
bind of proc/sys       criu        read-only ``/proc/sys`` etc. (runc ``readonlyPaths``):
subtrees                           internal bind mounts CRIU restores itself
file bind of a         masked      runc ``maskedPaths`` (``/proc/kcore``...): external with
``null`` device                    key ``/dev/null`` (``--ext-mount-map PATH:/dev/null``),
                                   restored as a bind of the host's ``/dev/null``
anything else (host    external    ``--external mnt[MOUNTPOINT]:MOUNTPOINT``; on restore the
bind mounts, cgroup,               key maps to the *placeholder's* mount at the same place
secrets, volumes...)               (resolved through the host's mount table), so the restored
                                   worker sees the new pod's volumes, not the old ones
=====================  ==========  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from warmstart.errors import UsageError
from warmstart.runtime.procinfo import MountInfo

CRIU_MANAGED = frozenset({"proc", "sysfs", "devpts", "mqueue", "tmpfs"})
MASK_KEY = "/dev/null"


@dataclass(frozen=True)
class Decision:
    mountpoint: str
    action: str  # root | criu | masked | external
    reason: str


def classify(mounts: list[MountInfo]) -> list[Decision]:
    decisions = []
    for m in mounts:
        if m.mountpoint == "/":
            decisions.append(Decision("/", "root", "container rootfs"))
        elif m.root.rsplit("/", 1)[-1] == "null" and m.root != "/":
            decisions.append(Decision(m.mountpoint, "masked", f"masked with {m.root}"))
        elif m.fstype in CRIU_MANAGED:
            why = "fresh mount" if m.root == "/" else f"bind of {m.fstype}:{m.root}"
            decisions.append(Decision(m.mountpoint, "criu", why))
        else:
            decisions.append(Decision(m.mountpoint, "external", f"{m.fstype} from the host"))
    return decisions


@dataclass(frozen=True)
class DumpMounts:
    args: tuple[str, ...]
    #: CRIU key -> mountpoint inside the container ("" for the /dev/null key).
    keys: dict[str, str]
    decisions: list[Decision]


def dump_args(mounts: list[MountInfo]) -> DumpMounts:
    args: list[str] = []
    keys: dict[str, str] = {}
    decisions = classify(mounts)
    for d in decisions:
        if d.action == "masked":
            args += ["--ext-mount-map", f"{d.mountpoint}:{MASK_KEY}"]
            keys[MASK_KEY] = ""
        elif d.action == "external":
            args += ["--external", f"mnt[{d.mountpoint}]:{d.mountpoint}"]
            keys[d.mountpoint] = d.mountpoint
    return DumpMounts(tuple(args), keys, decisions)


def host_source(inner: MountInfo, host_mounts: list[MountInfo]) -> str | None:
    """The path, in this mount namespace, of what ``inner`` (another namespace's mount) shows."""
    best: MountInfo | None = None
    for h in host_mounts:
        if h.dev != inner.dev:
            continue
        if h.root == "/" or inner.root == h.root or inner.root.startswith(h.root.rstrip("/") + "/"):
            if best is None or len(h.root) > len(best.root):
                best = h
    if best is None:
        return None
    rest = inner.root[len(best.root.rstrip("/")):] if best.root != "/" else inner.root
    return best.mountpoint.rstrip("/") + "/" + rest.lstrip("/") if rest.strip("/") else best.mountpoint


def restore_args(keys: dict[str, str], placeholder_mounts: list[MountInfo],
                 host_mounts: list[MountInfo]) -> list[str]:
    """``--ext-mount-map KEY:HOSTPATH`` for every external key, from the placeholder's mounts."""
    by_point = {m.mountpoint: m for m in placeholder_mounts}
    args = []
    for key, mountpoint in sorted(keys.items()):
        if key == MASK_KEY:
            args += ["--ext-mount-map", f"{MASK_KEY}:/dev/null"]
            continue
        inner = by_point.get(mountpoint)
        source = host_source(inner, host_mounts) if inner else None
        if source is None:
            raise UsageError(
                f"the placeholder has no mount at {mountpoint}, which the snapshot needs",
                hint="start the placeholder with the same mounts (volumes) as the original",
            )
        args += ["--ext-mount-map", f"{key}:{source}"]
    return args
