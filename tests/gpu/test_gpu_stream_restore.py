"""GPU: a CUDA process restored while its snapshot streams from a remote store.

The driver's checkpointed device memory lives in private anonymous pages, so
it arrives with the page images while CRIU and the page server work; the GPU
state is restored only after the last chunk is in and verified. Run on a GPU
machine as root: ``bash scripts/gpu-test.sh tests/gpu/test_gpu_stream_restore.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from _support import Tree

from warmstart.host.process import kill_tree
from warmstart.snapshot.checkpoint import checkpoint
from warmstart.snapshot.restore import RestoreRequest
from warmstart.store.local import LocalStore

torch = pytest.importorskip("torch")
pytest.importorskip("blake3", reason="needs the 'store' extra (blake3)")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.criu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


def test_cuda_process_restores_while_its_pages_stream_in(tmp_path: Path, file_url: str) -> None:
    from test_gpu_snapshot import start, verify_equal

    from warmstart.snapshot.streaming import restore_streaming
    from warmstart.store.remote import RemoteStore
    from warmstart.store.signing import TrustPolicy

    tree = start(tmp_path / "w", 2.0)
    assert verify_equal(tree)
    node_a = LocalStore(tmp_path / "node-a")
    taken = checkpoint(tree.pid, store=node_a, name="gpu")
    assert len(taken.manifest.gpus) == 1
    tree.popen.wait(timeout=30)
    remote = RemoteStore.open(file_url, jobs=8)
    remote.push(node_a, "gpu")
    node_b = LocalStore(tmp_path / "node-b")
    streamed = restore_streaming(
        remote, "gpu", local=node_b, request=RestoreRequest(parallel_pages=True),
        trust=TrustPolicy([]), limit_rate=1e9,
    )  # fmt: skip
    print(streamed.report(), [(p.name, p.seconds, p.bytes) for p in streamed.result.timer.phases])
    back = Tree(tree.state, None, streamed.result.pid)
    try:
        back.wait_progress(60)
        assert verify_equal(back)
    finally:
        kill_tree(streamed.result.pid)
    ev = streamed.events
    assert streamed.overlapped and streamed.stats.overlapped_bytes > 0
    assert ev.index("fetch-complete") < ev.index("phase gpu-restore")
    assert node_b.manifest("gpu").snapshot_id == taken.manifest.snapshot_id
