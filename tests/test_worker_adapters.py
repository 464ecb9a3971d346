"""The adapters against fakes that mirror the engines' public signatures:
vLLM ``LLM.sleep(level=1)`` / ``LLM.wake_up(tags=None)`` and ``AsyncLLM``'s
coroutine versions; SGLang ``Engine.release_memory_occupation(tags=None)`` /
``resume_memory_occupation(tags=None)``."""

from __future__ import annotations

import threading
import time

import pytest

from warmstart import protocol
from warmstart.worker import Outcome
from warmstart.worker.adapters.sglang import checkpoint_sglang
from warmstart.worker.adapters.vllm import checkpoint_vllm, register


class FakeLLM:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.sleeping = False

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))
        self.sleeping = True

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.calls.append(("wake_up", tags))
        self.sleeping = False


class FakeAsyncLLM(FakeLLM):
    async def sleep(self, level: int = 1) -> None:  # type: ignore[override]
        FakeLLM.sleep(self, level)

    async def wake_up(self, tags: list[str] | None = None) -> None:  # type: ignore[override]
        FakeLLM.wake_up(self, tags)


class FakeSglang:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        self.calls.append(("resume", tags))


def answer_failed(cdir):
    def run():
        while not (cdir / protocol.READY_FOR_SNAPSHOT).exists():
            time.sleep(0.01)
        info = protocol.read_model(cdir / protocol.READY_FOR_SNAPSHOT, protocol.ReadyInfo)
        answer_failed.labels = info.labels
        protocol.signal_file(cdir, protocol.SNAPSHOT_FAILED)

    threading.Thread(target=run, daemon=True).start()


@pytest.mark.parametrize("cls", [FakeLLM, FakeAsyncLLM])
def test_vllm_sleeps_and_wakes(tmp_path, cls):
    llm = cls()
    answer_failed(tmp_path)
    out = checkpoint_vllm(llm, level=1, control_dir=tmp_path, poll_interval=0.01)
    assert out is Outcome.SNAPSHOT_FAILED
    assert llm.calls == [("sleep", 1), ("wake_up", None)] and not llm.sleeping
    assert answer_failed.labels["engine"] == "vllm"


def test_vllm_bad_level():
    with pytest.raises(ValueError, match="level"):
        checkpoint_vllm(FakeLLM(), level=3)


def test_vllm_plugin_applies_env(monkeypatch, tmp_path):
    monkeypatch.delenv("NCCL_CUMEM_ENABLE", raising=False)
    monkeypatch.delenv(protocol.CONTROL_DIR_ENV, raising=False)
    register()
    import os

    assert "NCCL_CUMEM_ENABLE" not in os.environ
    monkeypatch.setenv(protocol.CONTROL_DIR_ENV, str(tmp_path))
    register()
    assert os.environ["NCCL_CUMEM_ENABLE"] == "0"
    monkeypatch.delenv("NCCL_CUMEM_ENABLE")


def test_sglang_release_resume(tmp_path):
    eng = FakeSglang()
    answer_failed(tmp_path)
    out = checkpoint_sglang(eng, tags=["kv_cache"], control_dir=tmp_path, poll_interval=0.01)
    assert out is Outcome.SNAPSHOT_FAILED
    assert eng.calls == [("release", ["kv_cache"]), ("resume", ["kv_cache"])]


def test_sglang_unknown_tag():
    with pytest.raises(ValueError, match="unknown SGLang memory tags"):
        checkpoint_sglang(FakeSglang(), tags=["kv"])


def test_adapters_noop_without_control_dir(monkeypatch):
    monkeypatch.delenv(protocol.CONTROL_DIR_ENV, raising=False)
    llm, eng = FakeLLM(), FakeSglang()
    assert checkpoint_vllm(llm) is Outcome.NOT_REQUESTED and llm.calls == []
    assert checkpoint_sglang(eng) is Outcome.NOT_REQUESTED and eng.calls == []
