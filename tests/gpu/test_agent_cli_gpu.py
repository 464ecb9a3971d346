"""GPU: a CUDA process tree checkpointed and restored by the node agent, driven by the main
CLI (`warmstart checkpoint --pid --agent`, `warmstart restore --agent`).

Run on a GPU machine as root: bash scripts/gpu-test.sh tests/gpu/test_agent_cli_gpu.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _agent import SRC, Agent
from _support import Tree
from test_gpu_snapshot import start, verify_equal

from warmstart.host.process import kill_tree

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.criu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "warmstart", *args, "--json"], capture_output=True,
                          text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_cuda_tree_through_the_agent(tmp_path: Path) -> None:
    agent = Agent(tmp_path, tmp_path / "runc")
    agent.start()
    tree = start(tmp_path / "w", 2.0)
    try:
        assert verify_equal(tree)
        report = cli("checkpoint", "--pid", str(tree.pid), "--name", "gpu-agent",
                     "--agent", str(agent.socket))
        print(report["timings"])
        assert len(report["gpus"]) == 1 and report["gpus"][0]["device_memory_bytes"] >= 2 << 30
        assert {"gpu-lock", "gpu-checkpoint"} <= {p["name"] for p in report["timings"]}
        tree.popen.wait(timeout=60)
        at = tree.status()["counter"]
        restored = cli("restore", "gpu-agent", "--agent", str(agent.socket))
        print(restored["timings"])
        assert "gpu-restore" in {p["name"] for p in restored["timings"]}
        back = Tree(tree.state, None, restored["pid"])
        try:
            assert back.wait_progress(120)["counter"] > at
            assert verify_equal(back)
        finally:
            kill_tree(restored["pid"])
    finally:
        if tree.alive():
            tree.kill()
        agent.stop()
