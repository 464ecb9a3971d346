"""Sockets bound to a specific non-loopback address are refused at checkpoint (real sockets)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from _support import wait_for

from warmstart.host.sockets import bound_to_specific_ip, decode_address, is_specific
from warmstart.snapshot.checkpoint import CheckpointOptions, preflight

SRC = Path(__file__).resolve().parents[1] / "src"
IP_FREEBIND, IPV6_FREEBIND = 15, 78


def _bind(family: int, kind: int, address: str, *, listen: bool = True) -> socket.socket:
    s = socket.socket(family, kind)
    if family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)  # the address need not exist here
    else:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    s.bind((address, 0))
    if listen and kind == socket.SOCK_STREAM:
        s.listen()
    return s


def test_decode_and_classify() -> None:
    # /proc/net/tcp prints each 32-bit word of the address as a host-order integer
    word = int.from_bytes(socket.inet_aton("10.244.1.7"), sys.byteorder)
    assert decode_address(f"{word:08X}", socket.AF_INET) == "10.244.1.7"
    raw6 = socket.inet_pton(socket.AF_INET6, "fd00::1:7")
    words6 = "".join(f"{int.from_bytes(raw6[i:i + 4], sys.byteorder):08X}" for i in range(0, 16, 4))
    assert decode_address(words6, socket.AF_INET6) == "fd00::1:7"
    assert not is_specific("0.0.0.0") and not is_specific("::") and not is_specific("127.0.0.53")
    assert not is_specific("::1") and not is_specific("::ffff:127.0.0.1")
    assert is_specific("10.244.1.7") and is_specific("fd00::7") and is_specific("::ffff:10.0.0.1")


def test_only_specific_non_loopback_sockets_are_found(tmp_path: Path) -> None:
    fine = [_bind(socket.AF_INET, socket.SOCK_STREAM, a) for a in ("127.0.0.1", "0.0.0.0")]
    fine += [_bind(socket.AF_INET6, socket.SOCK_STREAM, a) for a in ("::1", "::")]
    fine += [_bind(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")]
    other, _port = _listener(tmp_path, "10.77.0.9")  # another process's socket is not ours
    try:
        assert bound_to_specific_ip([os.getpid()]) == []
        assert [b.address for b in bound_to_specific_ip([other.pid])] == ["10.77.0.9"]
    finally:
        other.kill()
        other.wait()
    bad = [_bind(socket.AF_INET, socket.SOCK_STREAM, "10.77.0.5"),
           _bind(socket.AF_INET6, socket.SOCK_STREAM, "fd00::5"),
           _bind(socket.AF_INET, socket.SOCK_DGRAM, "10.77.0.6")]
    try:
        found = {(b.address, b.port, b.listening, b.proto) for b in bound_to_specific_ip([os.getpid()])}
        ports = [s.getsockname()[1] for s in bad]
        assert found == {("10.77.0.5", ports[0], True, "tcp"), ("fd00::5", ports[1], True, "tcp6"),
                         ("10.77.0.6", ports[2], False, "udp")}
        assert str(next(b for b in bound_to_specific_ip([os.getpid()]) if b.proto == "tcp6")) \
            == f"TCP listener on [fd00::5]:{ports[1]} (PID {os.getpid()})"
    finally:
        for s in fine + bad:
            s.close()


def _listener(tmp_path: Path, address: str) -> tuple[subprocess.Popen, int]:
    ready = tmp_path / f"ready-{address}"
    code = ("import socket, time, pathlib\n"
            "s = socket.socket(); s.setsockopt(socket.IPPROTO_IP, 15, 1)\n"
            f"s.bind(({address!r}, 0)); s.listen()\n"
            f"pathlib.Path({str(ready)!r}).write_text(str(s.getsockname()[1]))\n"
            "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: ready.exists() and ready.read_text(), 20, what="the listener")
    return p, int(ready.read_text())


def test_preflight_refuses_and_allow_bound_ip_lets_it_through(tmp_path: Path) -> None:
    from warmstart.errors import UsageError

    p, port = _listener(tmp_path, "10.77.0.5")
    ok, _ = _listener(tmp_path, "127.0.0.1")
    try:
        with pytest.raises(UsageError, match=f"TCP listener on 10.77.0.5:{port} \\(PID {p.pid}\\)") as exc:
            preflight(p.pid, CheckpointOptions())
        assert "--allow-bound-ip" in (exc.value.hint or "")
        assert preflight(p.pid, CheckpointOptions(allow_bound_ip=True)) == [p.pid]
        assert preflight(ok.pid, CheckpointOptions()) == [ok.pid]  # loopback: fine
    finally:
        for proc in (p, ok):
            proc.kill()
            proc.wait()


@pytest.mark.criu
def test_the_cli_refuses_with_one_line(tmp_path: Path) -> None:
    p, port = _listener(tmp_path, "10.77.0.5")
    try:
        proc = subprocess.run([sys.executable, "-m", "warmstart", "checkpoint", "--pid", str(p.pid),
                               "--store", str(tmp_path / "store")], capture_output=True, text=True,
                              timeout=120, check=False,
                              env={**os.environ, "PYTHONPATH": str(SRC), "COLUMNS": "300"})
        assert proc.returncode == 2
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, proc.stderr
        assert f"10.77.0.5:{port}" in lines[0] and "--allow-bound-ip" in lines[0]
        assert p.poll() is None  # refused before anything touched it
        assert not any((tmp_path / "store").glob("*[!.]*")) if (tmp_path / "store").exists() else True
    finally:
        p.kill()
        p.wait()
