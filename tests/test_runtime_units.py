"""Container discovery parsing, the mount policy, rootfs diffs and the placeholder."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from _support import wait_for
from warmstart.k8s import contract
from warmstart.runtime import mounts as policy
from warmstart.runtime import placeholder as ph
from warmstart.runtime import rootfs_diff
from warmstart.runtime.discovery import parse_ctr_info, parse_ctr_tasks, parse_runc_state
from warmstart.runtime.procinfo import cgroup_procs_files, parse_cgroup, parse_mountinfo
from warmstart import protocol

SRC = Path(__file__).resolve().parents[1] / "src"

CONTAINER_MOUNTINFO = """\
65 43 254:0 /tmp/b/rootfs / rw,relatime - overlay overlay rw,lowerdir=/img/l1:/img/l2,upperdir=/tmp/b/upper,workdir=/tmp/b/work
66 65 0:40 / /proc rw,relatime - proc proc rw
67 65 0:41 / /dev rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
68 67 0:42 / /dev/pts rw,nosuid,noexec,relatime - devpts devpts rw,gid=5,mode=620,ptmxmode=666
71 65 0:44 / /sys ro,nosuid,nodev,noexec,relatime - sysfs sysfs ro
72 65 254:0 /var/lib/kubelet/pods/x/volumes/my\\040data /data rw,relatime - ext4 /dev/vda rw
73 71 0:30 /kubepods/pod1/c1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw
47 66 0:40 /sys /proc/sys ro,relatime - proc proc rw
49 66 0:41 /null /proc/keys rw,nosuid - tmpfs tmpfs rw,size=65536k,mode=755
"""

HOST_MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:30 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw
31 22 0:31 / /sys/fs/cgroup/memory rw shared:5 - cgroup cgroup rw,memory
"""


def test_parse_mountinfo_unescapes_and_finds_overlay() -> None:
    mounts = parse_mountinfo(CONTAINER_MOUNTINFO)
    assert len(mounts) == 9
    data = next(m for m in mounts if m.mountpoint == "/data")
    assert data.root == "/var/lib/kubelet/pods/x/volumes/my data"
    root = mounts[0]
    assert root.fstype == "overlay" and root.super_option("upperdir") == "/tmp/b/upper"
    assert root.super_option("lowerdir") == "/img/l1:/img/l2"


def test_mount_policy_mirrors_runc() -> None:
    mounts = parse_mountinfo(CONTAINER_MOUNTINFO)
    actions = {d.mountpoint: d.action for d in policy.classify(mounts)}
    assert actions == {"/": "root", "/proc": "criu", "/dev": "criu", "/dev/pts": "criu",
                       "/sys": "criu", "/data": "external", "/sys/fs/cgroup": "external",
                       "/proc/sys": "criu", "/proc/keys": "masked"}
    dumped = policy.dump_args(mounts)
    assert dumped.args == ("--external", "mnt[/data]:/data", "--external",
                           "mnt[/sys/fs/cgroup]:/sys/fs/cgroup",
                           "--ext-mount-map", "/proc/keys:/dev/null")
    assert dumped.keys == {"/data": "/data", "/sys/fs/cgroup": "/sys/fs/cgroup", "/dev/null": ""}

    # restore: each key maps to what the *placeholder* has mounted there, as a host path
    host = parse_mountinfo(HOST_MOUNTINFO)
    placeholder = parse_mountinfo(CONTAINER_MOUNTINFO.replace("/kubepods/pod1/c1", "/kubepods/pod2/c9")
                                  .replace("pods/x/", "pods/y/"))
    args = policy.restore_args(dumped.keys, placeholder, host)
    assert args == ["--ext-mount-map", "/data:/var/lib/kubelet/pods/y/volumes/my data",
                    "--ext-mount-map", "/dev/null:/dev/null",
                    "--ext-mount-map", "/sys/fs/cgroup:/sys/fs/cgroup/kubepods/pod2/c9"]
    with pytest.raises(Exception, match="no mount at /data"):
        policy.restore_args(dumped.keys, [m for m in placeholder if m.mountpoint != "/data"], host)


def test_cgroup_procs_files_for_v1_and_v2(tmp_path: Path) -> None:
    (tmp_path / "unified/ph").mkdir(parents=True)
    (tmp_path / "unified/ph/cgroup.procs").touch()
    (tmp_path / "memory/a/ph").mkdir(parents=True)
    (tmp_path / "memory/a/ph/cgroup.procs").touch()
    host = parse_mountinfo(
        f"30 22 0:30 / {tmp_path}/unified rw - cgroup2 cgroup2 rw\n"
        f"31 22 0:31 / {tmp_path}/memory rw - cgroup cgroup rw,memory\n"
        f"32 22 0:32 / {tmp_path}/pids rw - cgroup cgroup rw,pids\n")
    groups = parse_cgroup("4:memory:/a/ph\n8:pids:/gone\n0::/ph\n")
    assert cgroup_procs_files(groups, host) == [tmp_path / "memory/a/ph/cgroup.procs",
                                                tmp_path / "unified/ph/cgroup.procs"]


def test_parse_runc_state() -> None:
    doc = {"id": "c1", "init_process_pid": 42, "init_process_start": 7,
           "config": {"rootfs": "/b/rootfs", "labels": ["bundle=/b", "warmstart.dev/image=img:1"],
                      "mask_paths": ["/proc/kcore"],
                      "mounts": [{"source": "/host/x", "destination": "/x", "device": "bind"},
                                 {"source": "proc", "destination": "/proc", "device": "proc"}]}}
    facts = parse_runc_state(doc)
    assert facts["pid"] == 42 and facts["bundle"] == "/b" and facts["rootfs"] == "/b/rootfs"
    assert facts["annotations"] == {"warmstart.dev/image": "img:1"}
    assert [(m.destination, m.type) for m in facts["mounts"]] == [("/x", "bind"), ("/proc", "proc")]


def test_parse_ctr_output() -> None:
    tasks = parse_ctr_tasks("TASK      PID     STATUS\nabc       1234    RUNNING\ndef 0 STOPPED\n")
    assert tasks == {"abc": (1234, "RUNNING"), "def": (0, "STOPPED")}
    info = parse_ctr_info({
        "Image": "docker.io/library/worker:1", "Labels": {"io.kubernetes.pod.name": "w-0"},
        "Spec": {"root": {"path": "rootfs"}, "annotations": {"a": "b"},
                 "mounts": [{"destination": "/data", "source": "/host", "options": ["rbind"]},
                            {"destination": "/etc/hosts", "type": "bind", "source": "/h"}],
                 "linux": {"maskedPaths": ["/proc/kcore"]}}})
    assert info["image"] == "docker.io/library/worker:1" and info["root"] == "rootfs"
    assert info["annotations"] == {"a": "b", "io.kubernetes.pod.name": "w-0"}
    assert [m.type for m in info["mounts"]] == ["", "bind"]


def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (p.read_text() if p.is_file() else "<dir>")
            for p in sorted(root.rglob("*"))}


@pytest.mark.root
def test_plain_diff_round_trip(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    base, changed, target = tmp_path / "base", tmp_path / "changed", tmp_path / "target"
    files = {"etc/conf": "a\n", "data/keep": "k\n", "data/gone": "g\n", "old/x/y": "y\n"}
    _tree(base, files)
    _tree(target, files)
    _tree(changed, {**{k: v for k, v in files.items() if k not in ("data/gone", "old/x/y")},
                    "etc/conf": "b\n", "data/new": "n\n"})
    (changed / "link").symlink_to("/etc/conf")
    archive = tmp_path / "diff.tar"
    rootfs_diff.capture_plain(changed, base, archive)
    names = tarfile.open(archive).getnames()
    assert "data/.wh.gone" in names and ".wh.old" in names and "old/x/.wh.y" not in names
    assert "data/keep" not in names  # unchanged files stay out
    rootfs_diff.apply(archive, target)
    assert _snapshot(target) == _snapshot(changed)
    assert os.readlink(target / "link") == "/etc/conf"


@pytest.mark.root
def test_overlay_whiteouts_become_oci_whiteouts(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("overlay whiteouts need root")
    upper = tmp_path / "upper"
    _tree(upper, {"data/new": "n\n", "opaque/fresh": "f\n"})
    os.mknod(upper / "data/gone", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    archive = tmp_path / "diff.tar"
    rootfs_diff.capture_overlay(upper, archive)
    names = tarfile.open(archive).getnames()
    assert {"data/.wh.gone", "opaque/.wh..wh..opq", "opaque/fresh", "data/new"} <= set(names)
    target = tmp_path / "target"
    _tree(target, {"data/gone": "old\n", "data/other": "o\n", "opaque/stale": "s\n"})
    rootfs_diff.apply(archive, target)
    assert _snapshot(target) == {"data": "<dir>", "data/new": "n\n", "data/other": "o\n",
                                 "opaque": "<dir>", "opaque/fresh": "f\n"}


@pytest.mark.root
def test_apply_never_follows_a_symlink_out_of_the_root(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    outside = tmp_path / "outside"
    outside.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "etc").symlink_to(outside)  # absolute link to a host directory
    src = tmp_path / "src"
    _tree(src, {"etc/passwd": "evil\n"})
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src / "etc/passwd", arcname="etc/passwd")
    with pytest.raises(Exception):
        rootfs_diff.apply(archive, target)  # the link resolves inside the root: no such dir
    assert list(outside.iterdir()) == []


def test_placeholder_names_match_the_contract() -> None:
    assert ph.COLD_START == contract.PLACEHOLDER_COLD_START
    assert ph.RESTORE_STARTED == contract.PLACEHOLDER_RESTORE_STARTED
    assert ph.RESTORE_COMPLETE == protocol.RESTORE_COMPLETE
    assert ph.CONTROL_DIR_ENV == protocol.CONTROL_DIR_ENV
    assert ph.PLACEHOLDER_DEADLINE_ENV == contract.PLACEHOLDER_DEADLINE_ENV
    assert ph.RESTORE_DEADLINE_ENV == contract.RESTORE_DEADLINE_ENV


def _placeholder(tmp_path: Path, *cmd: str, **env: str) -> subprocess.Popen:
    e = dict(os.environ, PYTHONPATH=str(SRC), SNAPSHOT_CONTROL_DIR=str(tmp_path / "ctl"), **env)
    return subprocess.Popen([sys.executable, "-m", "warmstart.runtime.placeholder", "--", *cmd],
                            env=e)


def test_placeholder_cold_starts_when_told(tmp_path: Path) -> None:
    p = _placeholder(tmp_path, "sh", "-c", f"echo ran > {tmp_path}/out; exit 7")
    wait_for(lambda: (tmp_path / "ctl" / ph.WAITING).exists(), 20)
    assert p.poll() is None
    (tmp_path / "ctl" / ph.COLD_START).write_text("told\n")
    assert p.wait(20) == 7  # it exec'd the original command
    assert (tmp_path / "out").read_text() == "ran\n"


def test_placeholder_cold_starts_itself_at_its_deadlines(tmp_path: Path) -> None:
    t0 = time.monotonic()
    p = _placeholder(tmp_path, "true", WARMSTART_PLACEHOLDER_DEADLINE="0.5")
    assert p.wait(20) == 0 and time.monotonic() - t0 >= 0.5
    assert (tmp_path / "ctl" / ph.COLD_START).read_text() == "no restore within 0.5s\n"

    other = tmp_path / "b"
    p = _placeholder(other, "true", WARMSTART_PLACEHOLDER_DEADLINE="0.3",
                     WARMSTART_RESTORE_DEADLINE="1.5")
    wait_for(lambda: (other / "ctl" / ph.WAITING).exists(), 20)
    (other / "ctl" / ph.RESTORE_STARTED).touch()  # a restore began: the longer deadline holds
    time.sleep(0.8)
    assert p.poll() is None
    assert p.wait(20) == 0
    assert "restore did not complete within 1.5s" in (other / "ctl" / ph.COLD_START).read_text()


def test_criu_log_diagnosis_skips_benign_errors_and_names_the_socket_problem() -> None:
    from warmstart.host.criulog import diagnose

    log = """\
(00.087898) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.134942) Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported
(00.134965) Error (criu/cr-dump.c:1681): Dump files (pid: 13431) failed with -1
"""
    d = diagnose(log)
    assert d.message.startswith("CRIU cannot read a socket's options")
    assert "sockets.c:628" in (d.line or "")
    only_rlimit = log.splitlines()[0] + "\n(00.2) Error (criu/mount.c:1): mnt: No mapping for 50\n"
    assert diagnose(only_rlimit).message == "CRIU could not handle a mount of the tree"


def test_criu_log_diagnosis_names_a_file_that_changed_size() -> None:
    """Seen on 2 x H200: a second restore after the first one appended to the worker's log."""
    from warmstart.host.criulog import diagnose

    log = """\
(00.039091) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.113027)   1884: Error (criu/files-reg.c:2175): File tmp/tp-control-f3x0zady/worker.err has bad size 2231 (expect 1360)
(00.113033)   1884: Error (criu/files.c:1221): Unable to open fd=2 id=0x21
(00.113203) Error (criu/cr-restore.c:2320): Restoring FAILED.
"""
    d = diagnose(log)
    assert d.message.startswith("a file the tree has open changed size since the checkpoint")
    assert "worker.err" in (d.line or "")
