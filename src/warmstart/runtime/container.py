"""Checkpoint a container; restore it into a placeholder container.

Checkpoint: the container's init and its tree go through the ordinary snapshot path
(:func:`warmstart.snapshot.checkpoint.checkpoint`: GPU lock/checkpoint, ``criu dump``,
integrity, atomic publish) with the options ``runc checkpoint`` would give CRIU: the
container rootfs as ``--root``, the network namespace external, mounts per
:mod:`warmstart.runtime.mounts`, stdio that lives outside the container external.
While the tree is still stopped, the filesystem changes are archived into the snapshot
(``rootfs-diff.tar``) and the manifest gets ``kind: container`` and a ``container`` record.

Restore into a placeholder (a container whose init is ``warmstart placeholder``):

1. refuse unless the target is a *waiting* placeholder of the same image;
2. write ``restore-started``; verify and apply the diff archive onto its rootfs;
3. run CRIU *inside the placeholder's namespaces*: in its cgroups, its PID namespace
   (``nsenter --pid``) with a private mount namespace whose ``/proc`` is that PID
   namespace's; the restored tree joins the placeholder's network (inherited fd), UTS and
   IPC namespaces (``--join-ns``) and gets the placeholder's stdio; CRIU recreates the
   mount namespace on the placeholder's rootfs (``--root``) and a PID namespace nested in
   the placeholder's (the restored init keeps PID 1 there). The restored root is the
   placeholder's child once CRIU exits;
4. resume, hand over (``restore-context.json``, ``restore-complete``): the placeholder
   now serves as the restored worker's init and exits with its status.

A failure at any step kills whatever was restored and removes ``restore-started``: the
placeholder keeps waiting, to be retried or cold-started.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from warmstart import protocol
from warmstart.errors import Cancelled, Incompatible, NotFoundError, UsageError
from warmstart.host import process as hostproc
from warmstart.host.criu import Criu, DumpOptions, RestoreOptions, find_criu
from warmstart.runtime import mounts as mount_policy
from warmstart.runtime import placeholder as ph
from warmstart.runtime import procinfo, rootfs_diff
from warmstart.runtime.discovery import Container
from warmstart.snapshot import compat, hostinfo
from warmstart.snapshot.checkpoint import CheckpointOptions, CheckpointResult, checkpoint
from warmstart.snapshot.manifest import ContainerInfo, FileEntry, Manifest
from warmstart.snapshot.restore import RestoreRequest, RestoreResult, restore
from warmstart.snapshot.timing import PhaseListener
from warmstart.store.integrity import Expected, digest_file, verify_files
from warmstart.store.local import LocalStore, Staging

DIFF_FILE = "rootfs-diff.tar"
NET_KEY = "extRootNetNS"
#: Joins every cgroups.procs file given before ``--``, then execs the rest.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo 0 > "$1" || exit 125; shift; done; shift; exec "$@"'


# -- checkpoint --------------------------------------------------------------------------
@dataclass(frozen=True)
class ContainerDump:
    options: DumpOptions
    info: ContainerInfo


def plan_dump(container: Container, *, image: str | None = None,
              rootfs_kind: str = "overlay") -> ContainerDump:
    """The CRIU options and manifest record for dumping ``container``."""
    view = container.proc
    external: list[str] = []
    net_key = None
    own_net = os.stat("/proc/self/ns/net").st_ino
    net = view.namespaces.get("net")
    if net is not None and net.inode != own_net:
        external.append(f"net[{net.inode}]:{NET_KEY}")
        net_key = NET_KEY
    inside = {m.mount_id for m in view.mounts}
    stdio: dict[str, str] = {}
    for s in view.stdio:
        if s.target.startswith("pipe:"):
            stdio[str(s.fd)] = s.target
        elif s.target.startswith("/") and s.mnt_id is not None and s.mnt_id not in inside:
            key = f"file[{s.mnt_id:x}:{s.inode:x}]"
            if key not in external:
                external.append(key)
            stdio[str(s.fd)] = key
    dumped_mounts = mount_policy.dump_args(view.mounts)
    extra = ("--root", str(container.rootfs), "--network-lock", "skip", *dumped_mounts.args)
    saved = [ns for ns in ("mnt", "pid", "uts", "ipc", "time") if ns in view.namespaces]
    ns_pids = {}
    for p in hostproc.tree_processes(container.pid):
        try:
            ns_pids[str(p.pid)] = procinfo.ns_pid_chain(p.pid)[-1]
        except OSError:
            continue
    info = ContainerInfo(
        runtime=container.runtime, container_id=container.id,
        image=image if image is not None else container.image,
        rootfs_kind=rootfs_kind, net_key=net_key, stdio=stdio,
        ext_mounts=dumped_mounts.keys, namespaces=saved, ns_pids=ns_pids,
    )
    return ContainerDump(DumpOptions(external=tuple(external), extra_args=extra), info)


def wait_ready(container: Container, timeout_s: float, *,
               cancelled: Callable[[], bool] = lambda: False) -> None:
    wait_for_ready(container.control_dir(), f"container {container.id!r}", timeout_s,
                   cancelled=cancelled)


def wait_for_ready(control: Path | None, what: str, timeout_s: float, *,
                   cancelled: Callable[[], bool] = lambda: False) -> None:
    """Wait for ``ready-for-snapshot`` in the control dir of ``what`` (a container, a PID)."""
    if control is None:
        raise UsageError(f"{what} has no ${protocol.CONTROL_DIR_ENV}",
                         hint="set it in the worker's environment, or do not wait_ready")
    deadline = time.monotonic() + timeout_s
    while not (control / protocol.READY_FOR_SNAPSHOT).exists():
        if cancelled():
            raise Cancelled("checkpoint cancelled while waiting for the worker")
        if time.monotonic() > deadline:
            raise UsageError(f"{what} did not write "
                             f"{protocol.READY_FOR_SNAPSHOT} within {timeout_s:g}s",
                             hint="is the worker using the warmstart SDK?")
        time.sleep(0.1)


def checkpoint_container(
    container: Container, *, store: LocalStore, name: str | None = None,
    base_rootfs: Path | None = None, leave_running: bool = False,
    labels: dict[str, str] | None = None, criu: Criu | None = None,
    listener: PhaseListener | None = None, allow_bound_ip: bool = False,
) -> CheckpointResult:
    upper = container.proc.overlay_upperdir
    if upper:
        kind = "overlay"
    elif base_rootfs is not None:
        if not Path(base_rootfs).is_dir():
            raise NotFoundError(f"base rootfs {base_rootfs} is not a directory",
                                hint="pass the image's unpacked rootfs")
        kind = "plain"
    else:
        kind = "none"
    plan = plan_dump(container, rootfs_kind=kind)

    def capture(staging: Staging) -> dict[str, Any]:
        files: list[FileEntry] = []
        info = plan.info
        if kind != "none":
            out = staging.path / DIFF_FILE
            if kind == "overlay":
                rootfs_diff.capture_overlay(upper, out)  # type: ignore[arg-type]
            else:
                rootfs_diff.capture_plain(container.rootfs, base_rootfs, out)  # type: ignore[arg-type]
            size, digest = digest_file(out)
            files.append(FileEntry(path=DIFF_FILE, size=size, digest=digest))
            info = info.model_copy(update={"rootfs_diff": DIFF_FILE})
        return {"kind": "container", "container": info, "files": files}

    options = CheckpointOptions(
        leave_running=leave_running, dump=plan.options, allow_bound_ip=allow_bound_ip,
        labels={"container_id": container.id, **(labels or {})},
    )
    result = checkpoint(container.pid, store=store, name=name, options=options, criu=criu,
                        listener=listener, after_dump=capture)
    if not leave_running:  # reported done once the runtime, too, sees the container stopped
        hostproc.wait_exits(p.pid for p in result.manifest.tree.processes)
    return result


# -- restore -----------------------------------------------------------------------------
def placeholder_control(target: Container) -> Path:
    """The placeholder's control directory, as a path the agent can use."""
    control = target.control_dir()
    if control is None:  # the placeholder's own default
        control = Path(f"/proc/{target.pid}/root") / ph.DEFAULT_CONTROL_DIR.lstrip("/")
    return control


def check_placeholder(target: Container) -> Path:
    """The control dir of ``target`` if it is a placeholder waiting for a restore."""
    control = placeholder_control(target)
    if not (control / ph.WAITING).exists():
        raise UsageError(
            f"container {target.id!r} is not a waiting placeholder",
            hint="restore only into a container started with `warmstart placeholder` "
            f"and ${protocol.CONTROL_DIR_ENV} set",
        )
    if (control / ph.COLD_START).exists():
        raise UsageError(f"placeholder {target.id!r} was told to cold-start",
                         hint="start a fresh placeholder container")
    if (control / ph.RESTORE_COMPLETE).exists():
        raise UsageError(f"placeholder {target.id!r} was already restored into",
                         hint="start a fresh placeholder container")
    return control


def check_image(manifest: Manifest, target: Container) -> ContainerInfo:
    info = manifest.container
    if manifest.kind != "container" or info is None:
        raise UsageError(f"snapshot {manifest.name!r} is not a container snapshot",
                         hint="restore it with `warmstart restore`, or take a container "
                         "checkpoint through the agent")
    if info.image and target.image and info.image != target.image:
        raise Incompatible(
            f"snapshot {manifest.name!r} is of image {info.image!r}, "
            f"placeholder {target.id!r} runs {target.image!r}",
            hint="start the placeholder from the snapshot's image",
        )
    return info


def _own_ns(pid: int, ns: str) -> bool:
    """Whether ``pid`` is in another ``ns`` namespace than this process."""
    try:
        return os.stat(f"/proc/{pid}/ns/{ns}").st_ino != os.stat(f"/proc/self/ns/{ns}").st_ino
    except FileNotFoundError:  # kernel without that namespace type
        return False


class PlaceholderCriu(Criu):
    """CRIU that restores inside a placeholder's namespaces and returns the host PID."""

    def __init__(self, base: Criu, target: Container, info: ContainerInfo,
                 control: Path) -> None:
        self.target = target
        self.info = info
        self.control = control
        self._fds: list[int] = []
        groups = procinfo.cgroup_procs_files(target.proc.cgroups, procinfo.mountinfo("self"))
        # Its cgroup namespace too (runc makes one on cgroup v2 hosts): CRIU does not
        # restore one here, so the tree inherits the namespace CRIU runs in.
        cgroupns = ("--cgroup",) if _own_ns(target.pid, "cgroup") else ()
        prefix = (
            "sh", "-c", _JOIN_CGROUPS, "warmstart-enter", *map(str, groups), "--",
            "nsenter", "--target", str(target.pid), "--pid", *cgroupns, "--",
            "unshare", "--mount", "--propagation", "private", "--mount-proc", "--",
        )
        super().__init__(base.path, base.version, prefix=prefix, log_level=base.log_level)
        chain = procinfo.ns_pid_chain(target.pid)
        self.depth = len(chain) - 1
        self.inner_pid = chain[-1]  # the placeholder's PID inside its own namespace
        self.root_pid: int | None = None

    def _open(self, path: str, flags: int) -> int:
        fd = os.open(path, flags | os.O_CLOEXEC)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def restore_args(self) -> list[str]:
        t = self.target
        # The placeholder's cgroups: CRIU runs in them and leaves the restored tasks there.
        args = ["--root", str(t.rootfs), "--network-lock", "skip", "--manage-cgroups=ignore"]
        if self.info.net_key:
            fd = self._open(f"/proc/{t.pid}/ns/net", os.O_RDONLY)
            args += ["--inherit-fd", f"fd[{fd}]:{self.info.net_key}"]
        for ns in ("uts", "ipc"):
            if ns in self.info.namespaces:
                args += ["--join-ns", f"{ns}:/proc/{self.inner_pid}/ns/{ns}"]
        for fd_s, key in sorted(self.info.stdio.items()):
            flags = os.O_RDONLY if fd_s == "0" else os.O_WRONLY
            try:
                fd = self._open(f"/proc/{t.pid}/fd/{fd_s}", flags)
            except OSError:
                fd = self._open("/dev/null", flags)
            args += ["--inherit-fd", f"fd[{fd}]:{key}"]
        args += mount_policy.restore_args(self.info.ext_mounts, t.proc.mounts,
                                          procinfo.mountinfo("self"))
        return args

    def host_pid(self, ns_pid: int) -> int:
        candidates = psutil.Process(self.target.pid).children(recursive=True)
        for p in candidates:
            try:
                chain = procinfo.ns_pid_chain(p.pid)
            except OSError:
                continue
            if len(chain) > self.depth and chain[self.depth] == ns_pid:
                return p.pid
        raise NotFoundError(f"restored PID {ns_pid} not found under the placeholder")

    def translate(self, recorded: int) -> int:
        """Host PID at the dump -> host PID of the same process restored here."""
        inner = self.info.ns_pids.get(str(recorded))
        if inner is None or self.root_pid is None:
            raise NotFoundError(f"PID {recorded} of the snapshot has no restored counterpart")
        for p in [psutil.Process(self.root_pid), *psutil.Process(self.root_pid).children(True)]:
            try:
                if procinfo.ns_pid_chain(p.pid)[-1] == inner:
                    return p.pid
            except OSError:
                continue
        raise NotFoundError(f"restored process of PID {recorded} (inner PID {inner}) not found")

    def restore(self, images_dir: Path, options: RestoreOptions, *, log: Path) -> int:
        extra = self.restore_args()
        options = dataclasses.replace(options, extra_args=(*options.extra_args, *extra),
                                      pass_fds=(*options.pass_fds, *self._fds))
        ns_pid = super().restore(images_dir, options, log=log)
        pid = self.root_pid = self.host_pid(ns_pid)
        protocol.write_atomic(self.control / ph.RESTORED_PID, f"{ns_pid}\n".encode(), mode=0o644)
        return pid


def restore_into_placeholder(
    name: str, target: Container, *, store: LocalStore, criu: Criu | None = None,
    listener: PhaseListener | None = None, env: dict[str, str] | None = None,
    gpu_map: tuple[str, ...] = (),
) -> RestoreResult:
    control = check_placeholder(target)
    path = store.path_of(name)
    manifest = Manifest.load(path)
    info = check_image(manifest, target)
    criu = criu or find_criu()
    compat.check_host(manifest, hostinfo.current(str(criu.version)))  # before touching anything
    protocol.write_atomic(control / ph.RESTORE_STARTED, b"", mode=0o644)
    pcriu = PlaceholderCriu(criu, target, info, control)
    try:
        if listener is not None:
            listener("rehydrate")
        if info.rootfs_diff:
            entry = next(f for f in manifest.files if f.path == info.rootfs_diff)
            verify_files(path, [Expected(entry.path, entry.size, entry.digest)])
            rootfs_diff.apply(path / info.rootfs_diff, target.rootfs)
        request = RestoreRequest(gpu_map=tuple(gpu_map), control_dir=control, env=env or {},
                                 check_pids=False, pid_map=pcriu.translate, file_root=target.rootfs)
        return restore(name, store=store, request=request, criu=pcriu, listener=listener)
    except BaseException:
        for stale in (ph.RESTORED_PID, ph.RESTORE_STARTED):
            (control / stale).unlink(missing_ok=True)
        raise
    finally:
        pcriu.close()


def cold_start(target: Container, reason: str) -> None:
    control = check_placeholder(target)
    protocol.write_atomic(control / ph.COLD_START, (reason.strip() + "\n").encode(), mode=0o644)
