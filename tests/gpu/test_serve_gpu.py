"""GPU parts of the reference worker: KV cache in a VMM ReservedRegion, CUDA-graph decode,
release/re-map at the same virtual address with identical greedy output.

Run on the GPU machine:  PYTHONPATH=src python -m pytest tests/gpu/test_serve_gpu.py -q -m gpu
Needs warmstart.gpu.vmm (the gpu helper's ReservedRegion) merged.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from warmstart.serve.modelmake import make_model

    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    pytest.importorskip("warmstart.gpu.vmm")
    from warmstart.serve.engine import Engine, EngineConfig

    eng = Engine(EngineConfig(model_dir, device="cuda", kv_cache_gib=0.25, max_seq_len=256, max_num_seqs=4))
    eng.warmup()
    yield eng
    eng.close()


def greedy(eng, text: str, n: int = 16) -> list[int]:
    from warmstart.serve.engine import SamplingParams

    return eng.generate(eng.encode(text), SamplingParams(max_tokens=n, ignore_eos=True)).output_ids


def test_kv_cache_lives_in_a_reserved_region(engine):
    from warmstart.gpu.vmm import ReservedRegion

    assert isinstance(engine.store.region, ReservedRegion)
    assert engine.store.tensor.device.type == "cuda" and engine.store.tensor.dtype == torch.bfloat16
    assert engine.store.address == engine.store.region.address


def test_decode_is_cuda_graph_captured(engine):
    assert engine.graph_status.startswith("captured"), engine.graph_status


def test_graph_decode_matches_eager(engine, model_dir):
    from warmstart.serve.engine import Engine, EngineConfig

    eager = Engine(EngineConfig(model_dir, device="cuda", kv_cache_gib=0.25, max_seq_len=256, max_num_seqs=4,
                                cuda_graphs=False))
    eager.warmup()
    try:
        assert eager.graph_status == "off (disabled)"
        for text in ["Hello world", "The quick brown fox"]:
            assert greedy(engine, text) == greedy(eager, text)
    finally:
        eager.close()


def test_release_frees_memory_and_remaps_at_same_address(engine):
    before = greedy(engine, "Hello world")
    addr = engine.store.address
    torch.cuda.synchronize()
    free0, _ = torch.cuda.mem_get_info()
    engine.release_kv()
    free1, _ = torch.cuda.mem_get_info()
    assert not engine.store.region.is_mapped
    assert free1 - free0 >= engine.store.nbytes * 0.9  # physical memory really went back
    engine.reacquire_kv()
    assert engine.store.region.is_mapped and engine.store.address == addr
    after = greedy(engine, "Hello world")  # replays the graph captured before the release
    assert after == before
    assert engine.graph_status.startswith("captured")


def test_kv_larger_than_free_gpu_memory(model_dir):
    from warmstart.serve.engine import Engine, EngineConfig, KvCacheTooLarge

    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(KvCacheTooLarge, match="exceeds"):
        Engine(EngineConfig(model_dir, device="cuda", kv_cache_gib=free / 2**30 * 2))


def test_qwen3_shape_serves_on_gpu(tmp_path):
    """The Qwen3-0.6B shape: load in bf16, graph-captured decode, release/re-map, same output."""
    pytest.importorskip("warmstart.gpu.vmm")
    from warmstart.serve.engine import Engine, EngineConfig
    from warmstart.serve.modelmake import make_model

    d = make_model("qwen3-0.6b", tmp_path / "q")
    eng = Engine(EngineConfig(d, device="cuda", kv_cache_gib=2, max_seq_len=2048, max_num_seqs=8))
    eng.warmup()
    try:
        assert eng.graph_status.startswith("captured"), eng.graph_status
        before = greedy(eng, "Hello world", 32)
        eng.release_kv()
        eng.reacquire_kv()
        assert greedy(eng, "Hello world", 32) == before
    finally:
        eng.close()
