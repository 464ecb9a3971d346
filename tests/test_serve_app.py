from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from warmstart.serve.app import create_app
from warmstart.serve.engine import Engine, EngineConfig, SamplingParams
from warmstart.serve.modelmake import make_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    d = make_model("tiny", tmp_path_factory.mktemp("m") / "tiny")
    eng = Engine(EngineConfig(d, device="cpu", kv_cache_gib=0.01, max_seq_len=128, max_num_seqs=4))
    eng.warmup()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, restored=lambda: True)) as c:
        yield c


def test_completion_matches_engine_greedy(client, engine):
    want = engine.generate(engine.encode("Hello world"), SamplingParams(max_tokens=8, ignore_eos=True))
    r = client.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 8, "temperature": 0,
                                             "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["choices"][0]["token_ids"] == want.output_ids
    assert body["choices"][0]["text"] == want.text
    assert body["usage"] == {"prompt_tokens": len(want.prompt_ids), "completion_tokens": 8,
                             "total_tokens": len(want.prompt_ids) + 8}


def sse_events(text: str) -> list:
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_chat_streaming_equals_non_streaming(client):
    req = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/chat/completions", json=req).json()
    assert full["object"] == "chat.completion"
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_completion_streaming(client):
    req = {"prompt": "The quick", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    full = client.post("/v1/completions", json=req).json()["choices"][0]
    with client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        events = sse_events(r.read().decode())[:-1]
    ids = [t for e in events for t in e["choices"][0].get("token_ids", [])]
    assert ids == full["token_ids"]
    assert "".join(e["choices"][0]["text"] for e in events) == full["text"]


def test_models_health_ready_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["restored"] is True
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
    metrics = client.get("/metrics").text
    assert 'warmstart_requests_total{route="completions",status="ok"}' in metrics
    assert "warmstart_restored 1.0" in metrics and "warmstart_kv_cache_bytes" in metrics


def test_bad_requests(client):
    assert client.post("/v1/completions", json={"prompt": "x", "model": "other"}).status_code == 404
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 500})
    assert r.status_code == 400 and "max sequence length" in r.json()["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": ""}).status_code == 400
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 422
