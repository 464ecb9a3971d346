"""find_criu remembers what `criu --version` said until the binary changes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from warmstart.errors import EnvironmentProblem
from warmstart.host import criu as criu_mod
from warmstart.host.criu import CriuVersion, find_criu, version_cache_path


def _fake(path: Path, version: str, calls: Path) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'Version: {version}'\n")
    tmp.chmod(0o755)
    os.replace(tmp, path)  # a new inode, as an install does


def _calls(calls: Path) -> int:
    return len(calls.read_text().split()) if calls.exists() else 0


@pytest.fixture
def fake_criu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("WARMSTART_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(criu_mod, "_versions", {})
    binary, calls = tmp_path / "bin" / "criu", tmp_path / "calls"
    binary.parent.mkdir()
    _fake(binary, "4.1.1", calls)
    return binary, calls


def test_version_is_probed_once_then_remembered_in_process_and_on_disk(fake_criu) -> None:
    binary, calls = fake_criu
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 1, 1)
    assert _calls(calls) == 1
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 1, 1)
    assert _calls(calls) == 1  # this process remembered it
    assert version_cache_path().is_file()
    criu_mod._versions.clear()  # as a new warmstart process would start
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 1, 1)
    assert _calls(calls) == 1  # the cache file answered


def test_a_replaced_binary_is_probed_again(fake_criu) -> None:
    binary, calls = fake_criu
    find_criu(binary, require_root=False)
    _fake(binary, "4.2", calls)  # new inode
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 2, 0)
    assert _calls(calls) == 2
    criu_mod._versions.clear()
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 2, 0)
    assert _calls(calls) == 2


def test_a_binary_rewritten_in_place_is_probed_again(fake_criu) -> None:
    binary, calls = fake_criu
    find_criu(binary, require_root=False)
    ino = binary.stat().st_ino
    st = binary.stat()
    with open(binary, "r+") as fh:  # same inode, same size, mtime put back
        text = fh.read().replace("4.1.1", "3.9.9")
        fh.seek(0)
        fh.write(text)
    os.utime(binary, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert binary.stat().st_ino == ino and binary.stat().st_size == st.st_size
    with pytest.raises(EnvironmentProblem, match="too old.*3.9.9"):
        find_criu(binary, require_root=False)
    assert _calls(calls) == 2


def test_a_cache_file_others_may_write_is_not_believed(fake_criu) -> None:
    binary, calls = fake_criu
    find_criu(binary, require_root=False)
    version_cache_path().chmod(0o666)
    criu_mod._versions.clear()
    find_criu(binary, require_root=False)
    assert _calls(calls) == 2


def test_an_unreadable_cache_only_costs_a_probe(fake_criu) -> None:
    binary, calls = fake_criu
    version_cache_path().parent.mkdir(parents=True)
    version_cache_path().write_text("{not json")
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 1, 1)
    assert _calls(calls) == 1
    criu_mod._versions.clear()
    assert find_criu(binary, require_root=False).version == CriuVersion(4, 1, 1)
    assert _calls(calls) == 1  # rewritten with the answer
