"""What a process must look like at its checkpoint point, and the checks for it.

CRIU dumps a process tree only if it holds nothing it cannot re-create: no TCP
or listening sockets, no io_uring instances. NCCL/Gloo must talk over loopback
and must not use cuMem-backed (VMM) IPC handles, so checkpoint mode pins them.
"""

from __future__ import annotations

import os
from pathlib import Path

from warmstart.errors import UsageError

#: Set (unless the user set them already) when a control dir is present.
CHECKPOINT_ENV: dict[str, str] = {
    "NCCL_SOCKET_IFNAME": "lo",
    "GLOO_SOCKET_IFNAME": "lo",
    "NCCL_CUMEM_ENABLE": "0",
    "NCCL_IB_DISABLE": "1",
    # NCCL >= 2.24 runs a process-wide RAS thread whose TCP listener and peer connections
    # outlive every communicator: destroying the process group would leave them open.
    "NCCL_RAS_ENABLE": "0",
}


class NotCheckpointable(UsageError):
    """The process holds a resource CRIU cannot checkpoint."""


def apply_checkpoint_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Pin NCCL/Gloo to loopback without cuMem; returns the variables it set."""
    env = os.environ if environ is None else environ
    applied: dict[str, str] = {}
    for key, value in CHECKPOINT_ENV.items():
        if key not in env:
            env[key] = value
            applied[key] = value
    return applied


def _fd_targets(pid: int | str = "self") -> list[tuple[int, str]]:
    fd_dir = Path(f"/proc/{pid}/fd")
    out: list[tuple[int, str]] = []
    for entry in fd_dir.iterdir():
        try:
            out.append((int(entry.name), os.readlink(entry)))
        except OSError:  # closed while we looked
            continue
    return out


def io_uring_fds(pid: int | str = "self") -> list[int]:
    """File descriptors of ``pid`` that are io_uring instances."""
    return sorted(fd for fd, target in _fd_targets(pid) if target == "anon_inode:[io_uring]")


def _socket_inodes(pid: int | str) -> set[str]:
    inodes: set[str] = set()
    for _, target in _fd_targets(pid):
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def inet_sockets(pid: int | str = "self") -> list[str]:
    """TCP/UDP sockets (v4 and v6) held by ``pid``, as ``proto local->remote`` lines."""
    inodes = _socket_inodes(pid)
    found: list[str] = []
    if not inodes:
        return found
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        table = Path(f"/proc/{pid}/net/{proto}")
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[9] in inodes:
                found.append(f"{proto} {cols[1]}->{cols[2]}")
    return found


def check_checkpointable(pid: int | str = "self") -> None:
    """Raise `NotCheckpointable` if ``pid`` holds io_uring or inet sockets."""
    rings = io_uring_fds(pid)
    if rings:
        raise NotCheckpointable(
            f"process uses io_uring (fds {', '.join(map(str, rings))}); CRIU cannot checkpoint it",
            hint="disable io_uring in the engine (e.g. no liburing-based I/O) before the checkpoint point",
        )
    socks = inet_sockets(pid)
    if socks:
        raise NotCheckpointable(
            f"process holds {len(socks)} TCP/UDP socket(s) at the checkpoint point ({socks[0]})",
            hint="open listeners and connections only after checkpoint_point() (phase 2)",
        )
