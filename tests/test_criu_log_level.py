"""CRIU's log level: configurable, and failures explained at every level."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from warmstart.errors import CriuError, UsageError
from warmstart.host.criu import DEFAULT_LOG_LEVEL, LOG_LEVEL_ENV, Criu, DumpOptions, find_criu, log_level_from_env


def test_the_log_level_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    assert log_level_from_env() == DEFAULT_LOG_LEVEL
    monkeypatch.setenv(LOG_LEVEL_ENV, "2")
    assert log_level_from_env() == 2
    monkeypatch.setenv(LOG_LEVEL_ENV, "loud")
    with pytest.raises(UsageError, match=f"{LOG_LEVEL_ENV}='loud' is not a CRIU log level"):
        log_level_from_env()


@pytest.mark.criu
@pytest.mark.parametrize("level", [1, 2, 4])
def test_a_failed_dump_is_explained_at_every_log_level(tmp_path: Path, level: int) -> None:
    base = find_criu()
    criu = Criu(base.path, base.version, log_level=level)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a PID that no longer exists
    log = tmp_path / "dump.log"
    (tmp_path / "images").mkdir()
    with pytest.raises(CriuError) as failure:
        criu.dump(gone.pid, tmp_path / "images", DumpOptions(), log=log)
    assert "process" in str(failure.value).lower()
    lines = log.read_text().count("\n")
    assert lines >= 1
    if level == 1:
        assert lines < 20  # errors only: the debug log of the same failure is far longer
