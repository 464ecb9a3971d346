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


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        try:
            link = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


def bound_to_specific_ip(pids: list[int]) -> list[BoundSocket]:
    """Listening TCP and bound UDP sockets of ``pids`` on a specific non-loopback address.
    Established TCP connections are left to their own check."""
    owners: dict[int, int] = {}
    by_netns: dict[int, int] = {}  # netns inode -> a PID in it (its tables are per netns)
    for pid in pids:
        for inode in socket_inodes(pid):
            owners.setdefault(inode, pid)
        try:
            by_netns.setdefault(os.stat(f"/proc/{pid}/ns/net").st_ino, pid)
        except OSError:
            continue
    found = []
    for pid in by_netns.values():
        for table, family in _TABLES:
            try:
                text = Path(f"/proc/{pid}/net/{table}").read_text()
            except OSError:
                continue
            for inode, address, port, state in parse_table(text, family):
                if inode not in owners or port == 0 or not is_specific(address):
                    continue
                if table.startswith("tcp") and state != _TCP_LISTEN:
                    continue  # established connections have their own check
                found.append(BoundSocket(owners[inode], table, address, port,
                                         state == _TCP_LISTEN and table.startswith("tcp")))
    return found
