"""Find a container from its runtime's own state: runc ``state.json``, containerd (``ctr``)
or CRI-O (its inspect API on ``crio.sock``).

Both give the same :class:`Container`: init PID, root filesystem (a host path), bundle,
configured mounts, image identity and what ``/proc/PID`` says (namespaces, mountinfo,
overlay upper dir, cgroups, stdio). Nothing here changes the container.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from warmstart import protocol
from warmstart.errors import EnvironmentProblem, NotFoundError, UsageError
from warmstart.runtime.procinfo import ProcView

RUNC_ROOT = Path("/run/runc")
CONTAINERD_NAMESPACE = "k8s.io"
#: containerd's --state directory; task bundles live under it.
CONTAINERD_STATE = Path("/run/containerd")
TASK_DIR = "io.containerd.runtime.v2.task"
#: CRI-O's socket; it serves an HTTP inspect API (``GET /containers/ID``) next to CRI gRPC.
CRIO_SOCKET = Path("/var/run/crio/crio.sock")
CONTAINERD_SOCKET = Path("/run/containerd/containerd.sock")
#: Annotation (OCI) naming the image a container runs; wins over what is inferred.
IMAGE_ANNOTATION = "warmstart.dev/image"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,253}$")


@dataclass(frozen=True)
class ConfiguredMount:
    destination: str
    source: str
    type: str


@dataclass(frozen=True)
class Container:
    id: str
    runtime: str
    pid: int
    rootfs: Path
    bundle: Path | None
    #: Image identity ("" when unknown): annotation, image name or overlay lower dirs.
    image: str
    mounts: list[ConfiguredMount]
    masked_paths: list[str]
    annotations: dict[str, str]
    proc: ProcView
    env: dict[str, str] = field(default_factory=dict)

    def control_dir(self) -> Path | None:
        """The container's $SNAPSHOT_CONTROL_DIR as a path the agent can use."""
        inside = self.env.get(protocol.CONTROL_DIR_ENV)
        if not inside:
            return None
        return Path(f"/proc/{self.pid}/root") / inside.lstrip("/")

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "runtime": self.runtime,
            "pid": self.pid,
            "rootfs": str(self.rootfs),
            "bundle": str(self.bundle) if self.bundle else None,
            "image": self.image,
            "overlay_upperdir": self.proc.overlay_upperdir,
            "namespaces": {k: v.inode for k, v in self.proc.namespaces.items()},
            "cgroups": self.proc.cgroups,
            "control_dir": self.env.get(protocol.CONTROL_DIR_ENV),
        }


class Runtime(Protocol):
    name: str

    def get(self, container_id: str) -> Container: ...


def check_id(container_id: str) -> str:
    if not _ID.match(container_id):
        raise UsageError(f"invalid container id {container_id!r}",
                         hint="pass a runc/containerd container id")
    return container_id


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            env[key] = value
    return env


def _start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def _image_identity(annotations: dict[str, str], proc: ProcView, fallback: str = "") -> str:
    if annotations.get(IMAGE_ANNOTATION):
        return annotations[IMAGE_ANNOTATION]
    if fallback:
        return fallback
    if lower := proc.overlay_lowerdir:
        return f"overlay:{lower}"
    return ""


def parse_runc_state(doc: dict[str, Any]) -> dict[str, Any]:
    """The facts warmstart needs from runc's ``state.json`` (libcontainer format)."""
    config = doc.get("config") or {}
    labels = config.get("labels") or []
    annotations = {}
    bundle = None
    for label in labels:
        key, _, value = str(label).partition("=")
        if key == "bundle":
            bundle = value
        else:
            annotations[key] = value
    mounts = [
        ConfiguredMount(
            destination=m.get("destination", ""),
            source=m.get("source", ""),
            type="bind" if m.get("device") == "bind" else m.get("device", ""),
        )
        for m in config.get("mounts") or []
    ]
    return {
        "id": doc["id"],
        "pid": int(doc["init_process_pid"]),
        "start": int(doc.get("init_process_start") or 0),
        "rootfs": config.get("rootfs", ""),
        "bundle": bundle,
        "annotations": annotations,
        "mounts": mounts,
        "masked_paths": list(config.get("mask_paths") or []),
    }


class RuncRuntime:
    """Containers of one runc state root (``runc --root``, default /run/runc)."""

    name = "runc"

    def __init__(self, root: Path | str = RUNC_ROOT) -> None:
        self.root = Path(root)

    def get(self, container_id: str) -> Container:
        check_id(container_id)
        path = self.root / container_id / "state.json"
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFoundError(
                f"no runc container {container_id!r} under {self.root}",
                hint="check `runc --root " + str(self.root) + " list`",
            ) from None
        except (OSError, ValueError) as exc:
            raise EnvironmentProblem(f"cannot read {path}: {exc}") from None
        facts = parse_runc_state(doc)
        pid = facts["pid"]
        if facts["start"] and _start_time(pid) != facts["start"]:
            raise UsageError(f"runc container {container_id!r} is not running",
                             hint="start it, or pass a running container")
        try:
            proc = ProcView.read(pid)
        except OSError:
            raise UsageError(f"runc container {container_id!r} is not running",
                             hint="start it, or pass a running container") from None
        return Container(
            id=container_id, runtime=self.name, pid=pid, rootfs=Path(facts["rootfs"]),
            bundle=Path(facts["bundle"]) if facts["bundle"] else None,
            image=_image_identity(facts["annotations"], proc), mounts=facts["mounts"],
            masked_paths=facts["masked_paths"], annotations=facts["annotations"], proc=proc,
            env=environ(pid),
        )


def parse_ctr_tasks(text: str) -> dict[str, tuple[int, str]]:
    """``ctr task ls`` -> {container id: (pid, status)}."""
    tasks = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 3 and parts[1].isdigit():
            tasks[parts[0]] = (int(parts[1]), parts[2])
    return tasks


def parse_ctr_info(doc: dict[str, Any]) -> dict[str, Any]:
    """``ctr containers info ID`` (JSON) -> image, annotations, labels, mounts, root path."""
    spec = doc.get("Spec") or {}
    mounts = [
        ConfiguredMount(
            destination=m.get("destination", ""), source=m.get("source", ""),
            type="bind" if "bind" in (m.get("options") or []) or m.get("type") == "bind"
            else m.get("type", ""),
        )
        for m in spec.get("mounts") or []
    ]
    annotations = dict(spec.get("annotations") or {})
    annotations.update({k: v for k, v in (doc.get("Labels") or {}).items()})
    return {
        "image": doc.get("Image") or "",
        "annotations": annotations,
        "mounts": mounts,
        "root": (spec.get("root") or {}).get("path", "rootfs"),
        "masked_paths": list((spec.get("linux") or {}).get("maskedPaths") or []),
    }


class ContainerdRuntime:
    """Containers of a containerd namespace, found through the ``ctr`` client."""

    name = "containerd"

    def __init__(self, namespace: str = CONTAINERD_NAMESPACE, *, ctr: str = "ctr",
                 address: str | None = None, state: Path | str = CONTAINERD_STATE) -> None:
        self.namespace = namespace
        self.ctr = ctr
        self.address = address
        self.state = Path(state)

    def _ctr(self, *args: str) -> str:
        exe = shutil.which(self.ctr)
        if exe is None:
            raise EnvironmentProblem("`ctr` (containerd client) not found",
                                     hint="install containerd, or use --runtime runc")
        cmd = [exe]
        if self.address:
            cmd += ["--address", self.address]
        cmd += ["-n", self.namespace, *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise EnvironmentProblem(f"ctr {' '.join(args)} failed: {proc.stderr.strip()[:200]}")
        return proc.stdout

    def get(self, container_id: str) -> Container:
        check_id(container_id)
        tasks = parse_ctr_tasks(self._ctr("task", "ls"))
        if container_id not in tasks:
            raise NotFoundError(f"no containerd task {container_id!r} in namespace "
                                f"{self.namespace!r}", hint="check `ctr -n k8s.io task ls`")
        pid, status = tasks[container_id]
        if status.upper() != "RUNNING":
            raise UsageError(f"container {container_id!r} is {status.lower()}",
                             hint="pass a running container")
        info = parse_ctr_info(json.loads(self._ctr("containers", "info", container_id)))
        bundle = self.state / TASK_DIR / self.namespace / container_id
        root = Path(info["root"])
        proc = ProcView.read(pid)
        return Container(
            id=container_id, runtime=self.name, pid=pid,
            rootfs=root if root.is_absolute() else bundle / root, bundle=bundle,
            image=_image_identity(info["annotations"], proc, info["image"]),
            mounts=info["mounts"], masked_paths=info["masked_paths"],
            annotations=info["annotations"], proc=proc, env=environ(pid),
        )


def parse_crio_info(doc: dict[str, Any]) -> dict[str, Any]:
    """CRI-O's ``GET /containers/ID`` (``types.ContainerInfo``: name, pid, image, image_ref,
    labels, annotations, crio_annotations, log_path, root, sandbox, ip_addresses)."""
    annotations = dict(doc.get("annotations") or {})
    annotations.update(doc.get("labels") or {})
    return {
        "pid": int(doc.get("pid") or 0),
        "image": doc.get("image") or doc.get("image_ref") or "",
        "root": doc.get("root") or "",
        "annotations": annotations,
        "sandbox": doc.get("sandbox") or "",
        "ips": list(doc.get("ip_addresses") or ([doc["ip_address"]] if doc.get("ip_address") else [])),
    }


class CrioRuntime:
    """Containers of CRI-O, found through the inspect API it serves on its socket.

    The API gives the init PID, image, labels/annotations and the container's mount point
    (``root``); everything else comes from ``/proc/PID``. Without a usable ``root`` (older
    CRI-O) the rootfs is the host mount that the container's ``/`` is (mountinfo)."""

    name = "crio"

    def __init__(self, socket: Path | str = CRIO_SOCKET) -> None:
        self.socket = Path(socket)

    def _inspect(self, container_id: str) -> dict[str, Any]:
        import httpx

        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                              base_url="http://crio", timeout=10.0) as http:
                resp = http.get(f"/containers/{container_id}")
        except httpx.TransportError as exc:
            raise EnvironmentProblem(f"cannot reach CRI-O at {self.socket} ({exc})",
                                     hint="is crio running? ($WARMSTART_CRIO_SOCKET)") from None
        if resp.status_code == 404:
            raise NotFoundError(f"no CRI-O container {container_id!r}",
                                hint="check `crictl ps` (the full container id)")
        if resp.status_code >= 400:
            raise EnvironmentProblem(f"CRI-O inspect of {container_id!r} failed: "
                                     f"{resp.status_code} {resp.text.strip()[:200]}")
        try:
            return resp.json()
        except ValueError:
            raise EnvironmentProblem(f"CRI-O at {self.socket} answered no JSON for "
                                     f"{container_id!r}") from None

    def get(self, container_id: str) -> Container:
        check_id(container_id)
        info = parse_crio_info(self._inspect(container_id))
        pid = info["pid"]
        try:
            if pid <= 0:
                raise OSError
            proc = ProcView.read(pid)
        except OSError:
            raise UsageError(f"CRI-O container {container_id!r} is not running",
                             hint="pass a running container") from None
        rootfs = _checked_root(info["root"], pid) or host_root_of(pid, proc)
        if rootfs is None:
            raise EnvironmentProblem(
                f"cannot find the root filesystem of CRI-O container {container_id!r} "
                "in the agent's mount namespace",
                hint="run the agent in the host's mount namespace (or mount /var/lib/containers)")
        annotations = {**info["annotations"]}
        if info["sandbox"]:
            annotations.setdefault("io.kubernetes.cri-o.SandboxID", info["sandbox"])
        return Container(
            id=container_id, runtime=self.name, pid=pid, rootfs=rootfs, bundle=None,
            image=_image_identity(annotations, proc, info["image"]), mounts=[],
            masked_paths=[], annotations=annotations, proc=proc, env=environ(pid),
        )


def _same_dir(a: Path | str, b: Path | str) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _checked_root(root: str, pid: int) -> Path | None:
    """The runtime's word for the rootfs, if it is the directory the container sees as /."""
    if root and _same_dir(root, f"/proc/{pid}/root"):
        return Path(root)
    return None


def host_root_of(pid: int, proc: ProcView | None = None) -> Path | None:
    """Where the container's ``/`` is mounted in this mount namespace: the mount of the
    same device whose root contains the container's (mountinfo), checked by inode."""
    view = proc or ProcView.read(pid)
    croot = view.root_mount
    if croot is None:
        return None
    from warmstart.runtime.procinfo import mountinfo

    candidates = []
    for m in mountinfo("self"):
        if m.dev != croot.dev:
            continue
        if croot.root == m.root or croot.root.startswith(m.root.rstrip("/") + "/"):
            rel = croot.root[len(m.root):].lstrip("/") if m.root != "/" else croot.root.lstrip("/")
            candidates.append(Path(m.mountpoint) / rel)
    for path in sorted(candidates, key=lambda p: len(str(p))):
        if _same_dir(path, f"/proc/{pid}/root"):
            return path
    return None


def detect_runtime() -> str:
    """``auto``: the runtime whose socket is present (CRI-O, then containerd), else runc."""
    if Path(os.environ.get("WARMSTART_CRIO_SOCKET") or CRIO_SOCKET).exists():
        return "crio"
    if Path(os.environ.get("WARMSTART_CONTAINERD_SOCKET") or CONTAINERD_SOCKET).exists():
        return "containerd"
    return "runc"


def runtime_for(name: str, *, runc_root: str | None = None,
                namespace: str | None = None) -> Runtime:
    if name == "auto":
        name = detect_runtime()
    if name in ("crio", "cri-o"):
        return CrioRuntime(os.environ.get("WARMSTART_CRIO_SOCKET") or CRIO_SOCKET)
    if name == "runc":
        return RuncRuntime(runc_root or os.environ.get("WARMSTART_RUNC_ROOT") or RUNC_ROOT)
    if name == "containerd":
        return ContainerdRuntime(
            namespace or os.environ.get("WARMSTART_CONTAINERD_NAMESPACE") or CONTAINERD_NAMESPACE,
            address=os.environ.get("WARMSTART_CONTAINERD_SOCKET"),
            state=os.environ.get("WARMSTART_CONTAINERD_STATE") or CONTAINERD_STATE)
    raise UsageError(f"unknown runtime {name!r}", hint="use runc, containerd, crio or auto")
