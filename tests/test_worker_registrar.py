from __future__ import annotations

import json
import os

import pytest

from warmstart.errors import UsageError
from warmstart.worker import FileRegistrar, Identity, Registrar


def test_identity_from_env():
    ident = Identity.from_env(port=8000, environ={"HOSTNAME": "h1", "POD_NAME": "pod-a", "POD_IP": "10.1.2.3"})
    assert ident == Identity("pod-a", "h1", "10.1.2.3", 8000, os.getpid())
    moved = Identity.from_env(port=8000, environ={"HOSTNAME": "h2", "POD_NAME": "pod-b", "POD_IP": "10.9.9.9",
                                                  "WARMSTART_PORT": "9001"})
    assert (moved.name, moved.host, moved.ip, moved.port) == ("pod-b", "h2", "10.9.9.9", 9001)


def test_identity_bad_port():
    with pytest.raises(UsageError, match="WARMSTART_PORT"):
        Identity.from_env(port=1, environ={"WARMSTART_PORT": "http"})


def test_file_registrar(tmp_path):
    reg = FileRegistrar(tmp_path / "reg")
    assert isinstance(reg, Registrar)
    ident = Identity("pod/a", "h", "1.2.3.4", 80, 42)
    reg.register(ident)
    files = list((tmp_path / "reg").iterdir())
    assert [f.name for f in files] == ["pod_a.json"]
    assert json.loads(files[0].read_text()) == {"name": "pod/a", "host": "h", "ip": "1.2.3.4", "port": 80, "pid": 42}
    reg.deregister(ident)
    assert list((tmp_path / "reg").iterdir()) == []


def test_file_registrar_unwritable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="cannot register"):
        FileRegistrar(blocker / "sub").register(Identity("a", "h", "i", 1, 1))
