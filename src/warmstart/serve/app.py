"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI; run by uvicorn in phase 2).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with SSE
streaming), ``GET /v1/models``, ``/health``, ``/ready``, ``/metrics``.
Beyond OpenAI: ``return_token_ids: true`` adds ``token_ids`` to each choice.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field

from warmstart.serve.engine import Engine, Request, RequestError, SamplingParams, TokenEvent


class _Common(BaseModel):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False
    return_token_ids: bool = False

    def sampling(self, default_max: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Common):
    prompt: str | list[int]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("warmstart_requests", "Requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("warmstart_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generated_tokens = Counter("warmstart_generated_tokens", "Tokens generated", registry=r)
        self.latency = Histogram("warmstart_request_seconds", "End-to-end request latency", registry=r)
        self.ttft = Histogram("warmstart_time_to_first_token_seconds", "Time to first token", registry=r)
        self.kv_bytes = Gauge("warmstart_kv_cache_bytes", "Preallocated KV cache size", registry=r)
        self.restored = Gauge("warmstart_restored", "1 if this worker was restored from a snapshot", registry=r)
        self.ready = Gauge("warmstart_ready", "1 when the engine is warmed up and serving", registry=r)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def create_app(engine: Engine, *, restored: Callable[[], bool] = lambda: False, default_max_tokens: int = 16) -> FastAPI:
    app = FastAPI(title="warmstart serve", docs_url=None, redoc_url=None)
    metrics = Metrics()
    metrics.kv_bytes.set(engine.store.nbytes)
    app.state.engine = engine
    app.state.metrics = metrics

    def check_model(name: str | None) -> JSONResponse | None:
        if name is not None and name != engine.model_name:
            return _error(404, f"model {name!r} is not served here (serving {engine.model_name!r})", "not_found_error")
        return None

    def start(prompt_ids: list[int], params: SamplingParams) -> tuple[Request, asyncio.Queue[TokenEvent]]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        req = engine.submit(prompt_ids, params, sink=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        return req, queue

    async def drain(req: Request, queue: asyncio.Queue[TokenEvent]) -> AsyncIterator[TokenEvent]:
        while True:
            ev = await queue.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def account(route: str, req: Request, t0: float) -> None:
        metrics.requests.labels(route, "error" if req.finish_reason == "error" else "ok").inc()
        metrics.prompt_tokens.inc(len(req.prompt_ids))
        metrics.generated_tokens.inc(len(req.output_ids))
        metrics.latency.observe(time.monotonic() - t0)
        if req.first_token_at is not None:
            metrics.ttft.observe(req.first_token_at - req.arrived)

    def usage(req: Request) -> dict[str, int]:
        p, c = len(req.prompt_ids), len(req.output_ids)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: dict[str, Any] | str) -> bytes:
        return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()

    async def run(route: str, body: _Common, prompt_ids: list[int], render: Callable[..., Any]) -> Any:
        t0 = time.monotonic()
        try:
            req, queue = start(prompt_ids, body.sampling(default_max_tokens))
        except RequestError as exc:
            metrics.requests.labels(route, "rejected").inc()
            return _error(400, str(exc))
        rid = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.stream:
            async for _ in drain(req, queue):
                pass
            account(route, req, t0)
            if req.finish_reason == "error":
                return _error(500, req.error or "generation failed", "server_error")
            return render(rid, created, req, None, final=True, ids=body.return_token_ids)

        async def events() -> AsyncIterator[bytes]:
            first = True
            async for ev in drain(req, queue):
                if ev.text or ev.finish_reason is not None or first or (body.return_token_ids and ev.token_id is not None):
                    yield sse(render(rid, created, req, ev, final=False, first=first, ids=body.return_token_ids))
                    first = False
            account(route, req, t0)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    def render_completion(rid: str, created: int, req: Request, ev: TokenEvent | None, *, final: bool, first: bool = False, ids: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if final:
            choice.update(text=req.text, finish_reason=req.finish_reason)
            if ids:
                choice["token_ids"] = list(req.output_ids)
            return {"id": rid, "object": "text_completion", "created": created, "model": engine.model_name,
                    "choices": [choice], "usage": usage(req)}
        assert ev is not None
        choice.update(text=ev.text, finish_reason=ev.finish_reason)
        if ids and ev.token_id is not None:
            choice["token_ids"] = [ev.token_id]
        out = {"id": rid, "object": "text_completion", "created": created, "model": engine.model_name, "choices": [choice]}
        if ev.finish_reason is not None:
            out["usage"] = usage(req)
        return out

    def render_chat(rid: str, created: int, req: Request, ev: TokenEvent | None, *, final: bool, first: bool = False, ids: bool = False) -> dict[str, Any]:
        if final:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": req.text},
                                      "finish_reason": req.finish_reason, "logprobs": None}
            if ids:
                choice["token_ids"] = list(req.output_ids)
            return {"id": rid, "object": "chat.completion", "created": created, "model": engine.model_name,
                    "choices": [choice], "usage": usage(req)}
        assert ev is not None
        delta: dict[str, Any] = {"content": ev.text}
        if first:
            delta["role"] = "assistant"
        out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.model_name,
               "choices": [{"index": 0, "delta": delta, "finish_reason": ev.finish_reason, "logprobs": None}]}
        if ev.finish_reason is not None:
            out["usage"] = usage(req)
        return out

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        if (bad := check_model(body.model)) is not None:
            return bad
        if isinstance(body.prompt, str):
            prompt_ids = engine.encode(body.prompt)
        else:
            prompt_ids = list(body.prompt)
        return await run("completions", body, prompt_ids, render_completion)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        if (bad := check_model(body.model)) is not None:
            return bad
        try:
            prompt_ids = engine.chat_prompt([m.model_dump() for m in body.messages])
        except RequestError as exc:
            return _error(400, str(exc))
        return await run("chat", body, prompt_ids, render_chat)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "warmstart", "max_model_len": engine.max_len}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = {"ready": engine.ready, "restored": restored(), "model": engine.model_name,
                "device": str(engine.device), "cuda_graphs": engine.graph_status,
                "startup": engine.startup}
        if hasattr(engine, "parallel_info"):  # tensor-parallel engines (warmstart.serve.tp_engine)
            body["tensor_parallel"] = engine.parallel_info()
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        metrics.restored.set(1 if restored() else 0)
        metrics.ready.set(1 if engine.ready else 0)
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(RequestError)
    async def bad_request(_: HttpRequest, exc: RequestError) -> JSONResponse:
        return _error(400, str(exc))

    return app
