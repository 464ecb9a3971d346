"""Drive the ``criu`` command line.

warmstart uses CRIU's CLI, not its RPC service (``criu swrk``); the reasons
are in docs/architecture.md. Every run writes a verbose log next to the images;
on failure the log is parsed into a one-line :class:`~warmstart.errors.CriuError`.

CRIU always runs in a session of its own with its output going to a file, so
a Ctrl-C at the terminal or the death of warmstart never kills it half-way
through a dump (see :mod:`warmstart.snapshot.guard` for what resumes the tree).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from warmstart.errors import CriuError, EnvironmentProblem, PermissionError_, UsageError
from warmstart.host.criulog import diagnose_file

MIN_VERSION = (4, 1)
CRIU_ENV = "WARMSTART_CRIU"
#: CRIU's log level for every run (``-v``; 1 errors, 2 warnings, 3 info, 4 debug).
LOG_LEVEL_ENV = "WARMSTART_CRIU_LOG_LEVEL"
#: CRIU's own default. At 4 (debug) CRIU writes a line per mapping, page run and
#: file, one ``write`` each: on a 16-core H200 that made a 1 GiB dump 10 % slower
#: (seventh session, docs/benchmarks.md; on the GPU worker's restore the difference
#: was within the noise). Errors are logged at every level, so failures are
#: explained the same way.
DEFAULT_LOG_LEVEL = 2
_SEARCH_PATH = ("/usr/local/sbin/criu", "/usr/sbin/criu", "/usr/local/bin/criu", "/usr/bin/criu")


@dataclass(frozen=True, order=True)
class CriuVersion:
    major: int
    minor: int
    patch: int = 0

    @classmethod
    def parse(cls, text: str) -> CriuVersion:
        m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
        if not m:
            raise ValueError(f"no CRIU version in {text!r}")
        return cls(int(m[1]), int(m[2]), int(m[3] or 0))

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class DumpOptions:
    """What CRIU may meet in the tree. Restore must mirror the dump's choices."""

    tcp_established: bool = False
    tcp_close: bool = False
    shell_job: bool = False
    ext_unix_sk: bool = False
    file_locks: bool = True
    link_remap: bool = False
    #: Largest deleted-but-open file CRIU copies into the images.
    ghost_limit: int = 256 << 20
    #: Paths of external mounts etc., passed as ``--external``.
    external: tuple[str, ...] = ()
    extra_args: tuple[str, ...] = ()

    def shared_args(self) -> list[str]:
        """Flags that dump and restore must both be given."""
        args: list[str] = []
        if self.tcp_established:
            args.append("--tcp-established")
        if self.tcp_close:
            args.append("--tcp-close")
        if self.shell_job:
            args.append("--shell-job")
        if self.ext_unix_sk:
            args.append("--ext-unix-sk")
        if self.file_locks:
            args.append("--file-locks")
        return args

    def as_record(self) -> dict[str, bool | int | str]:
        return {
            "tcp_established": self.tcp_established,
            "tcp_close": self.tcp_close,
            "shell_job": self.shell_job,
            "ext_unix_sk": self.ext_unix_sk,
            "file_locks": self.file_locks,
            "link_remap": self.link_remap,
            "ghost_limit": self.ghost_limit,
        }

    @classmethod
    def from_record(cls, record: dict[str, bool | int | str]) -> DumpOptions:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        return cls(**known)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RestoreOptions:
    dump: DumpOptions = field(default_factory=DumpOptions)
    #: Leave every restored task stopped (SIGSTOP); the caller sends SIGCONT.
    leave_stopped: bool = False
    #: Restore with this directory as the root of the tree.
    root: Path | None = None
    #: ``--inherit-fd fd[N]:KEY`` pairs and similar container plumbing.
    extra_args: tuple[str, ...] = ()
    #: File descriptors of ours that CRIU must inherit (for --inherit-fd).
    pass_fds: tuple[int, ...] = ()
    #: Leave private anonymous memory to a page server (``--lazy-pages``); it
    #: connects to ``work_dir/lazy-pages.socket``.
    lazy_pages: bool = False
    #: CRIU's working directory (``-W``): its sockets live there.
    work_dir: Path | None = None


class Criu:
    """One CRIU binary."""

    def __init__(
        self, path: Path, version: CriuVersion, *, prefix: tuple[str, ...] = (), log_level: int | None = None
    ) -> None:
        self.path = Path(path)
        self.version = version
        #: Command that CRIU runs under (e.g. ``nsenter ... --``): the container
        #: restore runs CRIU inside a placeholder's namespaces this way.
        self.prefix = tuple(prefix)
        #: ``-v`` of every run (``$WARMSTART_CRIU_LOG_LEVEL``, else :data:`DEFAULT_LOG_LEVEL`).
        #: Errors are logged at every level, so failures are explained at any of them.
        self.log_level = log_level if log_level is not None else log_level_from_env()

    def __repr__(self) -> str:
        return f"Criu({str(self.path)!r}, {self.version})"

    # -- running --------------------------------------------------------
    def _run(
        self,
        action: str,
        args: list[str],
        *,
        log: Path,
        pass_fds: tuple[int, ...] = (),
        on_start: Callable[[int], None] | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*self.prefix, str(self.path), action, *args, f"-v{self.log_level}", "-o", str(log)]
        out = log.with_suffix(".out")
        with open(out, "wb") as sink:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                pass_fds=pass_fds,
            )
            if on_start is not None:
                on_start(proc.pid)
            try:
                proc.wait()
            except BaseException:
                # Ctrl-C or the like: let CRIU finish; it must never stop half-way.
                proc.wait()
                raise
        return subprocess.CompletedProcess(cmd, proc.returncode, b"", b"")

    def _fail(self, action: str, log: Path) -> CriuError:
        d = diagnose_file(log)
        return CriuError(f"criu {action} failed: {d.message}", hint=d.hint or f"see {log}", log=str(log))

    def dump(
        self,
        pid: int,
        images_dir: Path,
        options: DumpOptions,
        *,
        log: Path,
        on_start: Callable[[int], None] | None = None,
    ) -> None:
        """Dump the tree rooted at ``pid`` and leave it *stopped* (SIGSTOP).

        The caller decides what happens next: SIGCONT (leave running, or a
        failure) or SIGKILL (once the snapshot is safely published). CRIU's own
        default, killing the tree right after the dump, is never used.
        """
        args = ["-t", str(pid), "-D", str(images_dir), "--leave-stopped"]
        args += options.shared_args()
        args += ["--ghost-limit", str(options.ghost_limit)]
        if options.link_remap:
            args.append("--link-remap")
        for ext in options.external:
            args += ["--external", ext]
        args += list(options.extra_args)
        if self._run("dump", args, log=log, on_start=on_start).returncode != 0:
            raise self._fail("dump", log)

    def restore(self, images_dir: Path, options: RestoreOptions, *, log: Path) -> int:
        """Restore detached; return the PID of the restored root."""
        pidfile = log.with_name(log.stem + ".pid")
        pidfile.unlink(missing_ok=True)
        args = ["-D", str(images_dir), "-d", "--pidfile", str(pidfile)]
        args += options.dump.shared_args()
        if options.leave_stopped:
            args.append("--leave-stopped")
        if options.root is not None:
            args += ["--root", str(options.root)]
        if options.lazy_pages:
            args.append("--lazy-pages")
        if options.work_dir is not None:
            args += ["-W", str(options.work_dir)]
        for ext in options.dump.external:
            args += ["--external", ext]
        args += list(options.extra_args)
        if self._run("restore", args, log=log, pass_fds=options.pass_fds).returncode != 0:
            raise self._fail("restore", log)
        try:
            return int(pidfile.read_text().strip())
        except (OSError, ValueError):
            raise CriuError(
                "criu restore reported success but wrote no pid file", hint=f"see {log}", log=str(log)
            ) from None

    def check(self) -> tuple[bool, str]:
        """Run ``criu check``; (ok, what it printed)."""
        proc = subprocess.run(
            [str(self.path), "check"], capture_output=True, text=True, timeout=60, check=False
        )
        text = (proc.stdout + proc.stderr).strip()
        return proc.returncode == 0, text


def _candidates(explicit: str | os.PathLike[str] | None) -> list[Path]:
    if explicit:
        return [Path(explicit)]
    if env := os.environ.get(CRIU_ENV):
        return [Path(env)]
    found = [Path(p) for p in _SEARCH_PATH]
    if which := shutil.which("criu"):
        found.insert(0, Path(which))
    return found


def probe_version(path: Path) -> CriuVersion:
    proc = subprocess.run(
        [str(path), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    return CriuVersion.parse(proc.stdout + proc.stderr)


def version_cache_path() -> Path:
    """Where :func:`cached_version` keeps what ``criu --version`` said, per binary."""
    return Path(os.environ.get("WARMSTART_CACHE", "/var/cache/warmstart")) / "criu-version.json"


#: Largest number of binaries the cache file remembers.
_CACHE_ENTRIES = 16
#: path -> (identity of the file it named, its version), for this process.
_versions: dict[str, tuple[tuple[int, ...], CriuVersion]] = {}


def _identity(st: os.stat_result) -> tuple[int, ...]:
    # ctime too: no one can set it, and it moves on every write to the file
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _load_cache(path: Path) -> dict[str, dict[str, object]]:
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            # only a file of ours (or root's), that no one else may write, is believed
            if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
                return {}
            doc = json.loads(fh.read())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(path: Path, doc: dict[str, dict[str, object]]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache: the next run asks criu again


def cached_version(path: Path) -> CriuVersion:
    """:func:`probe_version`, remembered per binary (in this process and in
    :func:`version_cache_path`) as long as the file it names is unchanged: same
    device, inode, size, mtime and ctime (a symlink is followed)."""
    st = os.stat(path)
    ident = _identity(st)
    key = str(path)
    hit = _versions.get(key)
    if hit is not None and hit[0] == ident:
        return hit[1]
    cache = version_cache_path()
    doc = _load_cache(cache)
    entry = doc.get(key)
    if isinstance(entry, dict) and entry.get("identity") == list(ident):
        try:
            version = CriuVersion.parse(f"Version: {entry['version']}")
        except (KeyError, TypeError, ValueError):
            pass
        else:
            _versions[key] = (ident, version)
            return version
    version = probe_version(path)
    # the binary may have been replaced while it ran: remember it only if it was not
    if _identity(os.stat(path)) == ident:
        _versions[key] = (ident, version)
        doc = {k: v for k, v in doc.items() if k != key and os.path.exists(k)}
        doc = dict(list(doc.items())[-(_CACHE_ENTRIES - 1) :])
        doc[key] = {"identity": list(ident), "version": str(version)}
        _save_cache(cache, doc)
    return version


def log_level_from_env() -> int:
    raw = os.environ.get(LOG_LEVEL_ENV, "").strip()
    if not raw:
        return DEFAULT_LOG_LEVEL
    if raw not in {"1", "2", "3", "4"}:
        raise UsageError(f"{LOG_LEVEL_ENV}={raw!r} is not a CRIU log level",
                         hint="use 1 (errors), 2 (warnings), 3 (info) or 4 (debug)")  # fmt: skip
    return int(raw)


def find_criu(path: str | os.PathLike[str] | None = None, *, require_root: bool = True) -> Criu:
    """Locate a CRIU >= 4.1; raise a one-line error naming what is wrong."""
    too_old: list[str] = []
    for candidate in _candidates(path):
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            continue
        try:
            version = cached_version(candidate)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            continue
        if (version.major, version.minor) < MIN_VERSION:
            too_old.append(f"{candidate} is {version}")
            continue
        if require_root and os.geteuid() != 0:
            raise PermissionError_(
                "checkpoint and restore need root", hint="run warmstart as root (sudo)"
            )
        return Criu(candidate, version)
    need = ".".join(map(str, MIN_VERSION))
    if too_old:
        raise EnvironmentProblem(
            f"CRIU is too old ({'; '.join(too_old)}); warmstart needs >= {need}",
            hint="run scripts/install-criu.sh, or point WARMSTART_CRIU at a newer criu",
        )
    where = str(path) if path else f"${CRIU_ENV}, PATH or /usr/local/sbin"
    raise EnvironmentProblem(
        f"CRIU not found ({where})",
        hint="run scripts/install-criu.sh, or point WARMSTART_CRIU at a criu >= 4.1",
    )
