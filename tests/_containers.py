"""Build a tiny root filesystem and run runc containers on it (tests only).

The base rootfs holds busybox-static and the Python interpreter with its standard
library (the placeholder runs on it) plus the few warmstart modules the placeholder
imports. Each container gets an overlay (lower = base) like a containerd snapshot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src" / "warmstart"
_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
         "pydoc_data", "site-packages", "dist-packages", "__pycache__", "config-3.11-x86_64-linux-gnu"}


def _ldd(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def build_base(root: Path, *, python: bool = True) -> Path:
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "data", "run", "opt/warmstart"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    busybox = shutil.which("busybox")
    shutil.copy2(busybox, root / "bin" / "busybox")
    names = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout
    for name in names.split():
        if name != "busybox" and not (root / "bin" / name).exists():
            (root / "bin" / name).symlink_to("busybox")
    (root / "etc" / "hostname").write_text("base\n")
    (root / "data" / "seed.txt").write_text("from the image\n")
    (root / "data" / "doomed.txt").write_text("deleted by the workload\n")
    if python:
        exe = "/usr/bin/python3.11" if Path("/usr/bin/python3.11").exists() else sys.executable
        stdlib = Path(sysconfig.get_paths(vars={"installed_base": "/usr", "base": "/usr"})["stdlib"])
        if not stdlib.exists():
            stdlib = Path("/usr/lib/python3.11")
        for lib in [*_ldd(exe)]:
            dest = root / lib.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lib, dest)
        (root / "usr/bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(exe, root / "usr/bin/python3")
        shutil.copytree(stdlib, root / stdlib.relative_to("/"), symlinks=True,
                        ignore=lambda d, names: [n for n in names if n in _SKIP])
        pkg = root / "opt/warmstart/warmstart"
        (pkg / "runtime").mkdir(parents=True, exist_ok=True)
        shutil.copy2(SRC / "__init__.py", pkg / "__init__.py")
        shutil.copy2(SRC / "runtime" / "__init__.py", pkg / "runtime" / "__init__.py")
        shutil.copy2(SRC / "runtime" / "placeholder.py", pkg / "runtime" / "placeholder.py")
    return root


def spec(args: list[str], *, env: dict[str, str] | None = None, image: str = "test-image",
         hostname: str = "box", binds: tuple[str, ...] = (), devices: tuple[Path, ...] = ()) -> dict:
    """An OCI config like `runc spec` writes, detached (no terminal), without a cgroup mount.

    ``binds``: host directories mounted read-only at the same path; ``devices``: host
    character devices created in the container and allowed by its device cgroup.
    """
    tmp = Path(f"/tmp/warmstart-spec-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    subprocess.run(["runc", "spec"], cwd=tmp, check=True)
    s = json.loads((tmp / "config.json").read_text())
    shutil.rmtree(tmp)
    s["process"]["terminal"] = False
    s["process"]["args"] = args
    s["process"]["env"] += [f"{k}={v}" for k, v in (env or {}).items()]
    s["root"] = {"path": "rootfs", "readonly": False}
    s["hostname"] = hostname
    s["mounts"] = [m for m in s["mounts"] if m["type"] != "cgroup"]
    if {"type": "cgroup"} not in s["linux"]["namespaces"]:  # as runc makes on cgroup v2 hosts
        s["linux"]["namespaces"].append({"type": "cgroup"})
    s["annotations"] = {"warmstart.dev/image": image}
    s["mounts"] += [{"destination": b, "type": "bind", "source": b, "options": ["rbind", "ro"]}
                    for b in binds]
    for dev in devices:
        rdev = dev.stat().st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        s["linux"].setdefault("devices", []).append(
            {"path": str(dev), "type": "c", "major": major, "minor": minor, "fileMode": 0o666})
        s["linux"]["resources"].setdefault("devices", []).append(
            {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"})
    return s


def nvidia_devices() -> tuple[Path, ...]:
    """The host's NVIDIA character devices (what the NVIDIA container toolkit would inject)."""
    return tuple(p for p in sorted(Path("/dev").glob("nvidia*")) if p.is_char_device())


def build_host_base(root: Path) -> Path:
    """A rootfs that runs the host's own Python and libraries from a read-only bind of /usr.

    Like an image built on the host's distribution: merged-/usr symlinks, the loader cache
    and the few files of /etc a process reads. Pass ``binds=("/usr", ...)`` to the spec.
    """
    for d in ("usr", "proc", "sys", "dev", "tmp", "etc", "data", "run", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)
    for link in ("bin", "sbin", "lib", "lib64"):
        target = Path("/") / link
        if target.is_symlink():
            (root / link).symlink_to(os.readlink(target))
    for name in ("ld.so.cache", "passwd", "group", "hosts", "nsswitch.conf"):
        if (Path("/etc") / name).is_file():
            shutil.copy2(Path("/etc") / name, root / "etc" / name)
    (root / "etc" / "hostname").write_text("base\n")
    return root


def host_python_binds() -> tuple[str, ...]:
    """/usr plus every directory this Python imports from outside it (src, venv, wheels)."""
    paths = [sys.prefix, sys.base_prefix, str(SRC.parent), str(Path(__file__).parent), *sys.path]
    outside = {str(Path(p).resolve()) for p in paths if p and Path(p).is_dir()}
    outside = {p for p in outside if p != "/" and not p.startswith(("/usr", "/proc", "/tmp/pytest"))}
    return ("/usr", *sorted(p for p in outside if not any(p.startswith(q + "/") for q in outside)))


def host_python_env() -> dict[str, str]:
    """The environment a container on :func:`build_host_base` needs to import what we do."""
    path = [str(SRC.parent), *(p for p in sys.path if p and Path(p).is_dir())]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(path)), "PYTHONDONTWRITEBYTECODE": "1",
            "HOME": "/root", "SNAPSHOT_CONTROL_DIR": "/run/warmstart"}


@dataclass
class RuncContainer:
    id: str
    bundle: Path
    runc_root: Path
    log: Path
    mounted: bool = True
    extra: dict = field(default_factory=dict)

    def runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["runc", "--root", str(self.runc_root), *args],
                              capture_output=True, text=True, check=check, timeout=60)

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def upper(self) -> Path:
        return self.bundle / "upper"

    def state(self) -> dict:
        return json.loads(self.runc("state", self.id).stdout)

    @property
    def pid(self) -> int:
        return int(self.state()["pid"])

    def status(self) -> str:
        proc = self.runc("state", self.id, check=False)
        return json.loads(proc.stdout)["status"] if proc.returncode == 0 else "gone"

    def destroy(self) -> None:
        self.runc("kill", self.id, "KILL", check=False)
        for _ in range(50):
            if self.runc("delete", "-f", self.id, check=False).returncode == 0:
                break
            time.sleep(0.1)
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.rootfs)], check=False)
            self.mounted = False


def run_container(cid: str, base: Path, workdir: Path, runc_root: Path, args: list[str], *,
                  env: dict[str, str] | None = None, image: str = "test-image",
                  hostname: str = "box", binds: tuple[str, ...] = (),
                  devices: tuple[Path, ...] = ()) -> RuncContainer:
    bundle = workdir / cid
    for d in ("upper", "work", "rootfs"):
        (bundle / d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={base},upperdir={bundle / 'upper'},workdir={bundle / 'work'}",
                    str(bundle / "rootfs")], check=True)
    (bundle / "config.json").write_text(json.dumps(spec(args, env=env, image=image, hostname=hostname,
                                                        binds=binds, devices=devices)))
    log = bundle / "stdio.log"
    c = RuncContainer(cid, bundle, runc_root, log)
    with open(log, "ab") as out:
        proc = subprocess.run(["runc", "--root", str(runc_root), "run", "-d", cid], cwd=bundle,
                              stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60)
    if proc.returncode != 0:
        c.destroy()
        raise RuntimeError(f"runc run {cid} failed: {log.read_text()[-500:]}")
    return c


PLACEHOLDER_ARGS = ["/usr/bin/python3", "-m", "warmstart.runtime.placeholder", "--"]
PLACEHOLDER_ENV = {"PYTHONPATH": "/opt/warmstart", "SNAPSHOT_CONTROL_DIR": "/run/warmstart",
                   "PYTHONDONTWRITEBYTECODE": "1"}
COUNTER = ("i=0; rm /data/doomed.txt; echo changed > /data/new.txt; "
           "while true; do i=$((i+1)); echo $i > /data/counter; sleep 0.1; done")


def oci_image_tar(rootfs: Path, out: Path, name: str) -> Path:
    """An OCI image archive (one uncompressed layer) of ``rootfs``, for `ctr images import`."""
    import hashlib
    import io
    import tarfile

    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest, len(data)

    layer_buf = io.BytesIO()
    with tarfile.open(fileobj=layer_buf, mode="w") as layer:
        for p in sorted(rootfs.rglob("*")):
            layer.add(p, arcname=str(p.relative_to(rootfs)), recursive=False)
    layer_digest, layer_size = blob(layer_buf.getvalue())
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                         "Cmd": ["sh"]},
              "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
    config_digest, config_size = blob(json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                            "digest": layer_digest, "size": layer_size}]}
    manifest_digest, manifest_size = blob(json.dumps(manifest).encode())
    index = {"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {"io.containerd.image.name": name,
                        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1]}}]}
    with tarfile.open(out, "w") as tar:
        def put(arcname: str, data: bytes) -> None:
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        put("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        put("index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            put(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out


@contextmanager
def host_containers(tmp: Path, *, image: str, devices: tuple[Path, ...] = ()) -> Iterator[HostContainers]:
    """A node agent and runc containers that run the host's Python (:func:`build_host_base`),
    with ``devices`` in them; everything is stopped and removed afterwards."""
    from _agent import Agent

    base = build_host_base(tmp / "image" / "rootfs")
    binds, env = host_python_binds(), host_python_env()
    runc_root = tmp / "runc"
    runc_root.mkdir()
    agent = Agent(tmp, runc_root)
    agent.start()
    made: list[RuncContainer] = []

    def run(cid: str, args: list[str]) -> RuncContainer:
        c = run_container(cid, base, tmp / "bundles", runc_root, args, env=env, binds=binds,
                          devices=devices, image=image)
        made.append(c)
        return c

    def placeholder(cid: str) -> RuncContainer:
        c = run(cid, PLACEHOLDER_ARGS + ["sh", "-c", "echo cold > /data/cold; sleep 1000"])
        deadline = time.monotonic() + 60
        while not (c.rootfs / "run/warmstart/placeholder-waiting").exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"placeholder {cid} did not wait: {c.log.read_text()[-500:]}")
            time.sleep(0.05)
        return c

    try:
        yield HostContainers(agent, run, placeholder)
    finally:
        agent.stop()
        for c in made:
            c.destroy()


@dataclass
class HostContainers:
    agent: Any
    run: Callable[[str, list[str]], RuncContainer]
    placeholder: Callable[[str], RuncContainer]
