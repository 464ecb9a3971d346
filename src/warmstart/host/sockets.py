"""Inet sockets of a process tree bound to one specific address (``/proc/PID/net``).

A socket bound to a specific non-loopback address (the pod IP) cannot come back in a
network namespace that lacks that address: CRIU binds it to the recorded address on
restore (IPv4: the bind fails, and so does the restore; IPv6: CRIU binds with
``IP_FREEBIND``, so the restore succeeds and the socket listens on an address nothing
reaches). Loopback and wildcard (``0.0.0.0``, ``::``) sockets restore anywhere.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

#: /proc/net/tcp state of a listening socket. (A TCP socket bound but neither listening nor
#: connected is not in /proc/net/tcp at all: it is not found here.)
_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"
_TABLES = (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6),
           ("udp", socket.AF_INET), ("udp6", socket.AF_INET6))


@dataclass(frozen=True)
class BoundSocket:
    pid: int
    proto: str  # tcp, tcp6, udp, udp6
    address: str
    port: int
    listening: bool

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        kind = "TCP listener" if self.listening else f"{self.proto.rstrip('6').upper()} socket"
        return f"{kind} on {host}:{self.port} (PID {self.pid})"


def decode_address(hex_addr: str, family: int) -> str:
    """``0100007F`` -> ``127.0.0.1``: /proc/net prints 32-bit words in host byte order."""
    words = [int(hex_addr[i:i + 8], 16) for i in range(0, len(hex_addr), 8)]
    return socket.inet_ntop(family, b"".join(struct.pack("=I", w) for w in words))


def is_specific(address: str) -> bool:
    """Neither a wildcard nor loopback (IPv4-mapped IPv6 included)."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_unspecified or ip.is_loopback)


def parse_table(text: str, family: int) -> list[tuple[int, str, int, str]]:
    """Rows of ``/proc/net/{tcp,udp}[6]`` as (inode, local address, port, state)."""
    rows = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        addr, _, port = f[1].partition(":")
        rows.append((int(f[9]), decode_address(addr, family), int(port, 16), f[3]))
    return rows


def fd_targets(pid: int) -> list[str]:
    """Where every file descriptor of ``pid`` points (``readlink``); empty when it is gone."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return []
    out = []
    for name in names:
        try:
            out.append(os.readlink(f"{fd_dir}/{name}"))
        except OSError:
            continue  # closed meanwhile
    return out


def socket_inodes(pid: int, targets: list[str] | None = None) -> set[int]:
    """Inodes of the sockets ``pid`` holds (of ``targets``, its :func:`fd_targets`, if given)."""
    return {
        int(link[8:-1])
        for link in (fd_targets(pid) if targets is None else targets)
        if link.startswith("socket:[")
    }


def _rows(text: str, owners: dict[int, int]) -> list[list[str]]:
    """Split rows of a /proc/net table whose socket (inode) is in ``owners``; the
    rest (every socket of the namespace: thousands on a busy host) is not decoded."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split(maxsplit=10)
        if len(f) >= 10 and f[9].isdigit() and int(f[9]) in owners:
            out.append(f)
    return out


class TreeSockets:
    """The inet sockets of a process tree, read once for every check that needs them:
    each process's descriptors once, each network namespace's tables once."""

    def __init__(self, pids: list[int], targets: dict[int, list[str]] | None = None) -> None:
        #: socket inode -> the first PID (in ``pids`` order) that holds it
        self.owners: dict[int, int] = {}
        self._netns: dict[int, int] = {}  # netns inode -> a PID in it (its tables are per netns)
        for pid in pids:
            links = targets.get(pid) if targets is not None else None
            for inode in socket_inodes(pid, links):
                self.owners.setdefault(inode, pid)
            try:
                self._netns.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, pid)
            except OSError:
                continue
        self._tables: dict[tuple[int, str], list[list[str]]] = {}

    def _table(self, ns: int, pid: int, table: str) -> list[list[str]]:
        key = (ns, table)
        if key not in self._tables:
            try:
                text = Path(f"/proc/{pid}/net/{table}").read_text()
            except OSError:
                text = ""
            self._tables[key] = _rows(text, self.owners)
        return self._tables[key]

    def _each(self, tables: tuple[tuple[str, int], ...]) -> list[tuple[str, int, list[str]]]:
        """(table, family, split row) of the tree's sockets: namespace by namespace, table by table."""
        if not self.owners:
            return []
        return [
            (table, family, f)
            for ns, pid in self._netns.items()
            for table, family in tables
            for f in self._table(ns, pid, table)
        ]

    def bound_to_specific_ip(self) -> list[BoundSocket]:
        found = []
        for table, family, f in self._each(_TABLES):
            addr, _, port_hex = f[1].partition(":")
            port, state = int(port_hex, 16), f[3]
            if port == 0 or (table.startswith("tcp") and state != _TCP_LISTEN):
                continue  # established connections have their own check
            address = decode_address(addr, family)
            if is_specific(address):
                found.append(BoundSocket(self.owners[int(f[9])], table, address, port,
                                         state == _TCP_LISTEN and table.startswith("tcp")))
        return found

    def established_tcp(self) -> list[str]:
        """Established TCP connections, as ``local -> remote`` strings."""
        out = []
        for _, family, f in self._each(_TABLES[:2]):
            if f[3] != _TCP_ESTABLISHED:
                continue
            local, remote = (_endpoint(text, family) for text in (f[1], f[2]))
            out.append(f"{local} -> {remote}")
        return out


def _endpoint(text: str, family: int) -> str:
    """``0100007F:1F90`` -> ``127.0.0.1:8080`` (as psutil prints it: no brackets for IPv6)."""
    addr, _, port = text.partition(":")
    return f"{decode_address(addr, family)}:{int(port, 16)}"


def bound_to_specific_ip(pids: list[int]) -> list[BoundSocket]:
    """Listening TCP and bound UDP sockets of ``pids`` on a specific non-loopback address.
    Established TCP connections are left to their own check."""
    return TreeSockets(pids).bound_to_specific_ip()


def established_tcp(pids: list[int]) -> list[str]:
    """Established TCP connections held by ``pids`` (in their own network namespaces)."""
    return TreeSockets(pids).established_tcp()
