"""A container's filesystem changes as a tar archive with OCI whiteouts, and applying one.

Capture reads either the overlay upper directory (overlay whiteouts — 0:0 character
devices, ``trusted.overlay.opaque`` directories — become OCI ``.wh.NAME`` and
``.wh..wh..opq`` entries) or, for a plain-directory rootfs, the difference between
the rootfs and the image's base rootfs. Apply runs in a child process chrooted into
the target root, so no symlink in the archive or the target can lead outside it.

Standard library only: the apply half runs as ``python -m warmstart.runtime.rootfs_diff``.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: str) -> bool:
    for attr in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, attr, follow_symlinks=False) == b"y":
                return True
        except OSError:
            continue
    return False


def _marker(tar: tarfile.TarFile, arcname: str) -> None:
    info = tarfile.TarInfo(arcname)
    info.size = 0
    info.mode = 0o600
    tar.addfile(info)


def _walk(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(dirnames) + sorted(filenames):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            yield rel, os.path.join(dirpath, name)


def capture_overlay(upperdir: str | Path, out: str | Path) -> int:
    """Archive an overlay upper directory; returns the number of entries."""
    count = 0
    upper = str(upperdir)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _walk(upper):
            st = os.lstat(path)
            head, _, name = rel.rpartition("/")
            if _is_whiteout(st):
                _marker(tar, f"{head}/{WHITEOUT}{name}" if head else f"{WHITEOUT}{name}")
            else:
                tar.add(path, arcname=rel, recursive=False)
                if stat.S_ISDIR(st.st_mode) and _is_opaque(path):
                    _marker(tar, f"{rel}/{OPAQUE}")
            count += 1
    return count


def _same(a: str, b: str, sa: os.stat_result, sb: os.stat_result) -> bool:
    if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode) or sa.st_mode != sb.st_mode:
        return False
    if (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
        return False
    if stat.S_ISLNK(sa.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sa.st_mode):
        if sa.st_size != sb.st_size:
            return False
        return sa.st_mtime_ns == sb.st_mtime_ns or filecmp.cmp(a, b, shallow=False)
    if stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode):
        return sa.st_rdev == sb.st_rdev
    return True


def capture_plain(rootfs: str | Path, base: str | Path, out: str | Path) -> int:
    """Archive what differs between a plain rootfs and the image's ``base`` rootfs."""
    count = 0
    root, base = str(rootfs), str(base)
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in _walk(root):
            other = os.path.join(base, rel)
            st = os.lstat(path)
            try:
                so = os.lstat(other)
            except FileNotFoundError:
                so = None
            if so is not None and _same(path, other, st, so):
                continue
            if so is not None and stat.S_ISDIR(so.st_mode) != stat.S_ISDIR(st.st_mode):
                head, _, name = rel.rpartition("/")
                _marker(tar, f"{head}/{WHITEOUT}{name}" if head else f"{WHITEOUT}{name}")
            tar.add(path, arcname=rel, recursive=False)
            count += 1
        for rel, path in _walk(base):
            if os.path.lexists(os.path.join(root, rel)):
                continue
            head, _, name = rel.rpartition("/")
            if head and not os.path.lexists(os.path.join(root, head)):
                continue  # its parent's whiteout covers it
            _marker(tar, f"{head}/{WHITEOUT}{name}" if head else f"{WHITEOUT}{name}")
            count += 1
    return count


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_here(tar: tarfile.TarFile) -> int:
    """Apply an archive to ``/`` (the caller has chrooted into the target root)."""
    count = 0
    for member in tar:
        name = os.path.normpath(member.name.lstrip("/"))
        if name.startswith(".."):
            raise ValueError(f"archive entry {member.name!r} leaves the root")
        head, _, base = name.rpartition("/")
        parent = "/" + head
        if base == OPAQUE:
            for child in os.listdir(parent):
                _remove(os.path.join(parent, child))
        elif base.startswith(WHITEOUT):
            _remove(os.path.join(parent, base[len(WHITEOUT):]))
        else:
            target = "/" + name
            if os.path.lexists(target) and not (member.isdir() and os.path.isdir(target)):
                _remove(target)
            member.name = name
            tar.extract(member, "/", set_attrs=True, numeric_owner=True,
                        filter="fully_trusted")
        count += 1
    return count


def apply(archive: str | Path, root: str | Path, *, timeout: float = 600.0) -> None:
    """Apply ``archive`` onto ``root`` in a child chrooted there."""
    import warmstart

    env = dict(os.environ)
    pkg_root = str(Path(warmstart.__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-m", "warmstart.runtime.rootfs_diff", "apply", str(root), str(archive)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    if proc.returncode != 0:
        from warmstart.errors import WarmstartError

        lines = (proc.stderr.strip() or "no output").splitlines()
        raise WarmstartError(f"applying the filesystem changes to {root} failed: {lines[-1]}",
                             hint="nothing was restored; retry into a fresh placeholder or cold-start this one")


def _main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "apply":
        print("usage: python -m warmstart.runtime.rootfs_diff apply ROOT ARCHIVE", file=sys.stderr)
        return 2
    root, archive = argv[1], argv[2]
    with tarfile.open(archive, "r:") as tar:
        os.chroot(root)
        os.chdir("/")
        apply_here(tar)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
