"""Fixtures for GPU tests: skip cleanly without torch+CUDA or a checkpoint-capable libcuda."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import warmstart

CHILD = Path(__file__).with_name("cuda_child.py")


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.fixture(scope="session")
def torch_cuda() -> None:
    if not _torch_cuda():
        pytest.skip("needs torch with a CUDA GPU")


@pytest.fixture(scope="session")
def cuda_driver(torch_cuda: None):  # type: ignore[no-untyped-def]
    from warmstart.errors import NoGpuDriver
    from warmstart.gpu.driver import load_driver

    try:
        return load_driver()
    except NoGpuDriver as exc:
        pytest.skip(str(exc))


class Child:
    """A python process holding CUDA tensors, driven by one-line commands."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ)
        src = str(Path(warmstart.__file__).resolve().parents[1])
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, bufsize=1,
        )
        self.pid = self.proc.pid
        first = self._line(timeout=180)
        assert first == "ready", first

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"child {self.pid} did not answer in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.pid} exited with {self.proc.wait()}")
        return line.strip()

    def ask(self, command: str, timeout: float = 120) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("quit", timeout=30)
            except (TimeoutError, RuntimeError, BrokenPipeError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def spawn_child(torch_cuda: None) -> Iterator[Callable[..., Child]]:
    """``spawn_child("--mib", "256")`` -> a running :class:`Child`; closed afterwards."""
    children: list[Child] = []

    def spawn(*args: str) -> Child:
        child = Child(*args)
        children.append(child)
        return child

    try:
        yield spawn
    finally:
        for child in children:
            child.close()


@pytest.fixture
def cuda_child(spawn_child: Callable[..., Child]) -> Child:
    return spawn_child("--mib", "256")
