from __future__ import annotations

import json

import pytest
import torch

from warmstart.errors import NotFoundError, UsageError
from warmstart.serve.engine import Engine, EngineConfig, KvCacheTooLarge, ModelDirError, RequestError, SamplingParams
from warmstart.serve.modelmake import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def engine(model_dir):
    eng = Engine(EngineConfig(model_dir, device="cpu", kv_cache_gib=0.01, max_seq_len=128, max_num_seqs=4))
    eng.warmup()
    yield eng
    eng.close()


def reference_greedy(eng: Engine, prompt: list[int], n: int) -> list[int]:
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = eng.model(torch.tensor([seq])).logits[0, -1, : eng.vocab_limit]
        out.append(int(logits.argmax()))
        seq.append(out[-1])
    return out


def test_greedy_matches_uncached_reference(engine):
    assert engine.ready and engine.graph_status == "off (CPU)"
    for text in ["Hello world", "The quick brown fox jumps over the lazy dog"]:
        prompt = engine.encode(text)
        got = engine.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True))
        assert got.output_ids == reference_greedy(engine, prompt, 12)
        assert got.finish_reason == "length"


def test_concurrent_requests_are_batched_and_identical(engine):
    prompts = [engine.encode(t) for t in ["Hello world", "a", "Checkpoint and restore: freeze", "Paris"]]
    alone = [engine.generate(p, SamplingParams(max_tokens=8, ignore_eos=True)).output_ids for p in prompts]
    before = engine.stats["max_batch"]
    reqs = [engine.submit(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
    together = [r.wait(60).output_ids for r in reqs]
    assert together == alone
    assert engine.stats["max_batch"] >= 2 and engine.stats["max_batch"] >= before


def test_release_reacquire_keeps_address_and_output(engine):
    prompt = engine.encode("Hello world")
    first = engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True)).output_ids
    addr = engine.store.address
    engine.release_kv()
    assert not engine.store.region.is_mapped
    pending = engine.submit(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    assert not pending.done.wait(0.3)  # scheduling is paused while released
    engine.reacquire_kv()
    assert engine.store.address == addr and engine.store.region.is_mapped
    assert pending.wait(60).output_ids == first
    assert engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True)).output_ids == first


def test_sampling_is_seeded(engine):
    p = engine.encode("Hello")
    a = engine.generate(p, SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)).output_ids
    b = engine.generate(p, SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)).output_ids
    c = engine.generate(p, SamplingParams(max_tokens=10, temperature=1.0, seed=8, top_p=0.9, ignore_eos=True)).output_ids
    assert a == b and len(c) == 10 and a != c


def test_streaming_sink_and_stop(engine):
    prompt = engine.encode("Hello world")
    full = engine.generate(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    events = []
    engine.submit(prompt, SamplingParams(max_tokens=10, ignore_eos=True), sink=events.append).wait(60)
    assert "".join(e.text for e in events) == full.text
    assert events[-1].finish_reason == "length"
    stop = full.text[3:6]
    if stop.strip() and "\ufffd" not in stop:
        cut = engine.generate(prompt, SamplingParams(max_tokens=10, stop=[stop], ignore_eos=True))
        assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)


def test_request_validation(engine):
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(RequestError, match="max sequence length"):
        engine.submit([1] * 120, SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit([10**6], SamplingParams())


def test_model_dir_missing(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        Engine(EngineConfig(tmp_path / "absent", device="cpu"))


def test_model_dir_malformed(tmp_path, model_dir):
    with pytest.raises(ModelDirError, match="no config.json"):
        Engine(EngineConfig(tmp_path, device="cpu"))
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(ModelDirError, match="cannot load"):
        Engine(EngineConfig(bad, device="cpu"))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError):
        Engine(EngineConfig(bad, device="cpu"))


def test_kv_larger_than_free_memory(model_dir):
    with pytest.raises(KvCacheTooLarge, match="exceeds the .* GiB free"):
        Engine(EngineConfig(model_dir, device="cpu", kv_cache_gib=100_000))


def test_kv_too_small_for_one_sequence(model_dir):
    with pytest.raises(KvCacheTooLarge, match="cannot hold one sequence"):
        Engine(EngineConfig(model_dir, device="cpu", kv_cache_gib=1e-6, max_seq_len=1024))


def test_bad_device(model_dir):
    with pytest.raises(UsageError, match="unsupported device"):
        Engine(EngineConfig(model_dir, device="tpu"))
