"""GPU: a containerised PyTorch worker checkpointed by the node agent and restored into a
placeholder container, with runc, CRIU and the CUDA checkpoint API (issue 5).

The container runs the host's own Python and torch from a read-only bind of /usr (and of
any other directory on ``sys.path``), with the host's NVIDIA devices created in it and
allowed by its device cgroup, as the NVIDIA container toolkit would set it up.

Run on a GPU machine as root, with runc on PATH (scripts/bundle-criu.sh carries it):
bash scripts/gpu-test.sh tests/gpu/test_gpu_container.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from _containers import host_containers, nvidia_devices
from _support import Tree, wait_for
from test_gpu_snapshot import verify_equal

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.criu,
    pytest.mark.runc,
    pytest.mark.root,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]

WORKLOAD = Path(__file__).resolve().parents[1] / "workloads" / "cuda_tree.py"


def _ns(pid: int, ns: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{ns}").st_ino


def test_containerised_cuda_worker_restores_into_a_placeholder(tmp_path: Path) -> None:
    devices = nvidia_devices()
    assert devices, "no /dev/nvidia* device nodes"
    with host_containers(tmp_path, image="gpu-image", devices=devices) as box:
        orig = box.run("gpu-orig", ["/bin/sh", "-c", "mkdir -p /data/state && exec "
                                    f"{sys.executable} {WORKLOAD} /data/state 1"])
        worker = Tree(orig.rootfs / "data/state", None, orig.pid)
        wait_for(worker.started, 240, what="the containerised CUDA worker to start")

        op = box.agent.run({"type": "checkpoint", "container_id": "gpu-orig", "snapshot": "gpu-c"},
                           timeout=600)
        assert op["state"] == "succeeded", (op["error"], op["hint"], op["logs"][-5:])
        gpus = op["result"]["gpus"]
        assert len(gpus) == 1 and gpus[0]["device_memory_bytes"] >= 1 << 30, gpus
        assert {"gpu-lock", "gpu-checkpoint", "dump"} <= set(op["result"]["timings"])
        at_dump = Tree(orig.upper / "data/state", None, 0).counter()
        assert orig.status() == "stopped"

        ph = box.placeholder("gpu-ph")
        op = box.agent.run({"type": "restore", "container_id": "gpu-ph", "snapshot": "gpu-c"},
                           timeout=600)
        assert op["state"] == "succeeded", (op["error"], op["hint"], op["logs"][-5:])
        assert "gpu-restore" in op["result"]["timings"]
        pid = op["result"]["pid"]

        back = Tree(ph.rootfs / "data/state", None, pid)
        assert back.wait_progress(120)["counter"] > at_dump
        assert verify_equal(back)  # device memory bit-identical to the pattern
        assert not (ph.rootfs / "data/cold").exists()
        for ns in ("net", "uts", "ipc", "cgroup"):
            assert _ns(pid, ns) == _ns(ph.pid, ns), ns
        assert Path(f"/proc/{pid}/cgroup").read_text() == Path(f"/proc/{ph.pid}/cgroup").read_text()
