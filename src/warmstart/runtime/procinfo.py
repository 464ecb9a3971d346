"""What ``/proc/PID`` says about a container's init: namespaces, mounts, cgroups, stdio."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

NS_TYPES = ("mnt", "uts", "ipc", "net", "pid", "cgroup", "time", "user")


@dataclass(frozen=True)
class Namespace:
    type: str
    inode: int
    path: str


@dataclass(frozen=True)
class MountInfo:
    """One line of ``/proc/PID/mountinfo``."""

    mount_id: int
    parent_id: int
    dev: str
    root: str
    mountpoint: str
    options: str
    fstype: str
    source: str
    super_options: str
    optional: tuple[str, ...] = ()

    def super_option(self, name: str) -> str | None:
        for opt in self.super_options.split(","):
            key, _, value = opt.partition("=")
            if key == name:
                return value
        return None


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m[1], 8)), text)


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mounts.append(
            MountInfo(
                mount_id=int(f[0]),
                parent_id=int(f[1]),
                dev=f[2],
                root=_unescape(f[3]),
                mountpoint=_unescape(f[4]),
                options=f[5],
                optional=tuple(f[6:]),
                fstype=r[0],
                source=_unescape(r[1]),
                super_options=r[2] if len(r) > 2 else "",
            )
        )
    return mounts


def mountinfo(pid: int | str) -> list[MountInfo]:
    return parse_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())


def namespaces(pid: int) -> dict[str, Namespace]:
    found = {}
    for ns in NS_TYPES:
        path = f"/proc/{pid}/ns/{ns}"
        try:
            found[ns] = Namespace(ns, os.stat(path).st_ino, path)
        except OSError:
            continue
    return found


def parse_cgroup(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> {controllers ("" for cgroup v2): path}."""
    groups = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups[parts[1]] = parts[2]
    return groups


def cgroups(pid: int) -> dict[str, str]:
    return parse_cgroup(Path(f"/proc/{pid}/cgroup").read_text())


def cgroup_procs_files(groups: dict[str, str], host_mounts: list[MountInfo]) -> list[Path]:
    """The ``cgroup.procs`` files (in this mount namespace) of every group in ``groups``."""
    files = []
    for controllers, path in groups.items():
        for m in host_mounts:
            if controllers == "" and m.fstype == "cgroup2":
                pass
            elif controllers and m.fstype == "cgroup":
                wanted = {c.removeprefix("name=") for c in controllers.split(",")}
                have = {o.removeprefix("name=") for o in m.super_options.split(",")}
                if not wanted <= have:
                    continue
            else:
                continue
            rel = path
            if m.root != "/" and rel.startswith(m.root):
                rel = rel[len(m.root):]
            candidate = Path(m.mountpoint) / rel.lstrip("/") / "cgroup.procs"
            if candidate.exists():
                files.append(candidate)
                break
    return files


@dataclass(frozen=True)
class Stdio:
    fd: int
    target: str
    mnt_id: int | None
    inode: int | None


def stdio(pid: int) -> list[Stdio]:
    found = []
    for fd in (0, 1, 2):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        mnt_id = None
        try:
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
                if line.startswith("mnt_id:"):
                    mnt_id = int(line.split()[1])
        except OSError:
            pass
        found.append(Stdio(fd=fd, target=target, mnt_id=mnt_id, inode=st.st_ino))
    return found


@dataclass(frozen=True)
class ProcView:
    """Everything read from /proc for one container init."""

    pid: int
    namespaces: dict[str, Namespace]
    mounts: list[MountInfo]
    cgroups: dict[str, str]
    stdio: list[Stdio] = field(default_factory=list)

    @classmethod
    def read(cls, pid: int) -> ProcView:
        return cls(pid, namespaces(pid), mountinfo(pid), cgroups(pid), stdio(pid))

    @property
    def root_mount(self) -> MountInfo | None:
        return next((m for m in self.mounts if m.mountpoint == "/"), None)

    @property
    def overlay_upperdir(self) -> str | None:
        root = self.root_mount
        if root is None or root.fstype != "overlay":
            return None
        return root.super_option("upperdir")

    @property
    def overlay_lowerdir(self) -> str | None:
        root = self.root_mount
        if root is None or root.fstype != "overlay":
            return None
        return root.super_option("lowerdir")


def ns_pid_chain(pid: int) -> list[int]:
    """``NSpid`` of ``pid``: its PID in every PID namespace from this one inwards."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(x) for x in line.split()[1:]]
    return [pid]
