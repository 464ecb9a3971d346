"""A snapshot store in a local (or shared) directory.

Layout::

    ROOT/
      NAME/                 a published snapshot: manifest.json, images/, logs/
      .staging/NAME.ID/     a snapshot being written (never listed)
      .trash/               snapshots being removed
      .lock                 flock taken to publish or remove

A snapshot becomes visible by one ``rename(2)`` of its fully written (and,
unless published with ``durable=False``, fsynced) staging directory, so ``ls``
and ``restore`` never see half of one. Without fsync a power loss can still
lose the snapshot or leave files of it short (restore's checksums refuse it).
Staging directories of dead writers are swept by :meth:`LocalStore.sweep`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from warmstart.errors import NotFoundError, SnapshotCorrupt, StoreError, UsageError
from warmstart.snapshot.manifest import IMAGES_DIR, MANIFEST_NAME, Manifest
from warmstart.store.integrity import fsync_dir, fsync_tree

DEFAULT_ROOT = Path("/var/lib/warmstart/snapshots")
STORE_ENV = "WARMSTART_STORE"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_OWNER = ".owner"


def default_root() -> Path:
    return Path(os.environ.get(STORE_ENV) or DEFAULT_ROOT)


def check_name(name: str) -> str:
    if not _NAME.match(name) or name.endswith(".tmp"):
        raise UsageError(
            f"invalid snapshot name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (at most 128, not starting with '.')",
        )
    return name


@dataclass(frozen=True)
class Staging:
    """A snapshot directory being written."""

    name: str
    path: Path

    @property
    def images(self) -> Path:
        return self.path / IMAGES_DIR

    @property
    def logs(self) -> Path:
        return self.path / "logs"


@dataclass(frozen=True)
class Entry:
    name: str
    path: Path
    manifest: Manifest | None
    error: str | None = None


class LocalStore:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return f"file://{self.root.resolve()}"

    # -- plumbing -------------------------------------------------------
    def _ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            for sub in (".staging", ".trash"):
                (self.root / sub).mkdir(exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(
                f"cannot create snapshot store {self.root}: {exc.strerror}",
                hint="choose a writable directory with --store or WARMSTART_STORE",
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(
                f"snapshot store {self.root} is not writable",
                hint="run as root or choose another store with --store",
            )

    @contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- writing --------------------------------------------------------
    def begin(self, name: str) -> Staging:
        """Reserve a staging directory for snapshot ``name`` (which must be free)."""
        check_name(name)
        self._ensure()
        if (self.root / name).exists():
            raise UsageError(
                f"snapshot {name!r} already exists in {self.root}",
                hint="choose another --name or remove it with `warmstart rm`",
            )
        path = self.root / ".staging" / f"{name}.{uuid.uuid4().hex[:12]}"
        path.mkdir(mode=0o700)
        (path / IMAGES_DIR).mkdir(mode=0o700)
        (path / "logs").mkdir(mode=0o700)
        (path / _OWNER).write_text(f"{os.getpid()}\n")
        return Staging(name, path)

    def begin_resumable(self, name: str, tag: str) -> tuple[Staging, bool]:
        """Like :meth:`begin`, but at a fixed ``.staging/NAME.TAG`` that a later writer may resume.

        Returns the staging directory and whether it was left by an earlier
        writer (who is gone: a live one makes this a :class:`UsageError`).
        """
        check_name(name)
        if not re.match(r"^[0-9a-z-]{1,64}$", tag):
            raise UsageError(f"invalid staging tag {tag!r}")
        self._ensure()
        if (self.root / name).exists():
            raise UsageError(
                f"snapshot {name!r} already exists in {self.root}",
                hint="choose another name or remove it with `warmstart rm`",
            )
        path = self.root / ".staging" / f"{name}.{tag}"
        with self._locked():
            resumed = path.is_dir()
            if resumed:
                try:
                    owner = int((path / _OWNER).read_text())
                except (OSError, ValueError):
                    owner = 0
                if owner and owner != os.getpid() and psutil.pid_exists(owner):
                    raise UsageError(
                        f"snapshot {name!r} is being written into {self.root} by PID {owner}",
                        hint="wait for it to finish",
                    )
            else:
                path.mkdir(mode=0o700)
                (path / IMAGES_DIR).mkdir(mode=0o700)
                (path / "logs").mkdir(mode=0o700)
            (path / _OWNER).write_text(f"{os.getpid()}\n")
        return Staging(name, path), resumed

    def publish(self, staging: Staging, manifest: Manifest, *, durable: bool = True) -> Path:
        """Write the manifest last, fsync everything, and make the snapshot visible atomically.

        ``durable=False`` skips every fsync: the rename is still atomic (no one
        sees half a snapshot), but what reaches the disk before a power loss
        is up to the kernel.
        """
        (staging.path / _OWNER).unlink(missing_ok=True)
        mpath = staging.path / MANIFEST_NAME
        fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = manifest.to_json().encode()
            if os.write(fd, data) != len(data):
                raise StoreError(f"short write of {mpath}", hint="check the store's filesystem")
        finally:
            os.close(fd)
        if durable:
            fsync_tree(staging.path)  # the manifest included
        target = self.root / staging.name
        with self._locked():
            try:
                os.rename(staging.path, target)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise UsageError(
                        f"snapshot {staging.name!r} was published by someone else meanwhile",
                        hint="choose another --name",
                    ) from None
                raise
            if durable:
                fsync_dir(self.root)
        return target

    def abort(self, staging: Staging) -> None:
        shutil.rmtree(staging.path, ignore_errors=True)

    def sweep(self) -> list[Path]:
        """Remove staging directories whose writer is gone; return what was removed."""
        removed = []
        for d in self._hidden(".staging"):
            try:
                owner = int((d / _OWNER).read_text())
            except (OSError, ValueError):
                owner = 0
            if owner and psutil.pid_exists(owner):
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        for d in self._hidden(".trash"):
            shutil.rmtree(d, ignore_errors=True)
        return removed

    def _hidden(self, sub: str) -> list[Path]:
        base = self.root / sub
        return sorted(base.iterdir()) if base.is_dir() else []

    # -- reading --------------------------------------------------------
    def path_of(self, name: str) -> Path:
        check_name(name)
        path = self.root / name
        if not path.is_dir():
            raise NotFoundError(
                f"snapshot {name!r} not found in {self.root}", hint="list snapshots with `warmstart ls`"
            )
        return path

    def manifest(self, name: str) -> Manifest:
        return Manifest.load(self.path_of(name))

    def entries(self) -> list[Entry]:
        if not self.root.is_dir():
            return []
        out = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            try:
                out.append(Entry(path.name, path, Manifest.load(path)))
            except SnapshotCorrupt as exc:
                out.append(Entry(path.name, path, None, str(exc)))
        return out

    def remove(self, name: str) -> None:
        path = self.path_of(name)
        self._ensure()
        trash = self.root / ".trash" / f"{name}.{uuid.uuid4().hex[:12]}"
        with self._locked():
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
