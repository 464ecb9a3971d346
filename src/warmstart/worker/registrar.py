"""Phase 2 service registration: who this worker is and where to reach it.

The identity is read from the environment each time (``POD_NAME``, ``HOSTNAME``,
``POD_IP``, ``WARMSTART_PORT``...), so after a restore -- once the restore
context's env has been applied -- it is the new replica's, not the snapshot's.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from warmstart.errors import UsageError
from warmstart.protocol import write_atomic


@dataclass(frozen=True)
class Identity:
    name: str
    host: str
    ip: str
    port: int
    pid: int

    @classmethod
    def from_env(
        cls, *, port: int, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Identity:
        env = os.environ if environ is None else environ
        host = env.get("HOSTNAME") or socket.gethostname()
        name = env.get("WARMSTART_NAME") or env.get("POD_NAME") or host
        ip = env.get("POD_IP") or env.get("WARMSTART_ADVERTISE_IP") or "127.0.0.1"
        raw_port = env.get("WARMSTART_PORT")
        try:
            port = int(raw_port) if raw_port else port
        except ValueError:
            raise UsageError(
                f"WARMSTART_PORT={raw_port!r} is not a port number", hint="set an integer 1-65535"
            ) from None
        return cls(name=name, host=host, ip=ip, port=port, pid=os.getpid() if pid is None else pid)


@runtime_checkable
class Registrar(Protocol):
    """Announces a serving worker to service discovery and withdraws it."""

    def register(self, identity: Identity) -> None: ...

    def deregister(self, identity: Identity) -> None: ...


class FileRegistrar:
    """Writes ``<dir>/<name>.json`` = {name, host, ip, port, pid}; removes it on deregister."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _path(self, identity: Identity) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in identity.name)
        return self.directory / f"{safe}.json"

    def register(self, identity: Identity) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path(identity), json.dumps(asdict(identity)).encode(), mode=0o644)
        except OSError as exc:
            raise UsageError(
                f"cannot register in {self.directory}: {exc.strerror}",
                hint="pass a writable --register-dir",
            ) from None

    def deregister(self, identity: Identity) -> None:
        self._path(identity).unlink(missing_ok=True)


class NullRegistrar:
    def register(self, identity: Identity) -> None:
        pass

    def deregister(self, identity: Identity) -> None:
        pass
