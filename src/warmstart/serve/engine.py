"""A small real inference engine over transformers with a preallocated KV cache.

* loads a local safetensors causal-LM directory (bf16 on GPU, fp32 on CPU);
* preallocates its KV cache (``kv_cache_gib`` or a fraction of free memory) in
  a releasable region (`warmstart.serve.kvcache`), ``max_num_seqs`` sequences
  of ``max_seq_len`` tokens;
* a scheduler thread batches concurrent requests (static batching: requests
  that arrive while a batch runs form the next one), prompts left-aligned per
  row with per-row positions and an explicit 4-D mask;
* greedy (``temperature=0``) and seeded sampled decoding (top-p);
* warm-up before ready; on GPU the decode step is captured as a CUDA graph over
  static buffers (falls back to eager, with the reason in ``graph_status``).
  ``torch.compile`` is not used.

Greedy decoding is deterministic: the same request on the same device gives
the same tokens, before and after a checkpoint/restore.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from warmstart.errors import NotFoundError, UsageError, WarmstartError
from warmstart.serve.kvcache import KVStore, RegionCache, allocate_region

log = logging.getLogger("warmstart.serve.engine")
GIB = 1 << 30


class KvCacheTooLarge(UsageError):
    """The requested KV cache does not fit in free memory."""


class ModelDirError(UsageError):
    """The model directory is missing or not a loadable causal LM."""


class RequestError(ValueError):
    """A request the engine cannot serve (the API turns it into HTTP 400)."""


@dataclass
class EngineConfig:
    model_dir: str | Path
    device: str = "auto"
    kv_cache_gib: float | None = None
    kv_cache_fraction: float = 0.5
    max_seq_len: int | None = None
    max_num_seqs: int = 8
    cuda_graphs: bool = True
    batch_wait_s: float = 0.005
    served_name: str | None = None
    #: socket of the node's GPU memory service: map the weights from it instead of loading them
    #: ("auto": the default socket of the engine's device, see `warmstart.gms.server.default_socket`)
    weights_from_gms: str | None = None


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class TokenEvent:
    token_id: int | None  # None on the final event
    text: str  # text delta
    finish_reason: str | None = None  # "stop" | "length" | "error" on the final event


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[TokenEvent], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    _gen: torch.Generator | None = None

    def wait(self, timeout: float | None = None) -> Request:
        if not self.done.wait(timeout):
            raise TimeoutError("generation timed out")
        return self


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unsupported device {name!r}", hint="use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r} requested but CUDA is not available", hint="use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise UsageError(f"unsupported device {name!r}", hint="use cpu, cuda or cuda:N")
    return dev


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise NotFoundError(f"model directory {path} does not exist", hint="make one with `warmstart model make`")
    if not path.is_dir():
        raise ModelDirError(f"{path} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"{path} has no config.json", hint="point --model at a transformers model directory")
    if not any(path.glob("*.safetensors")):
        raise ModelDirError(f"{path} has no *.safetensors weights", hint="save the model with safe_serialization=True")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ModelDirError(f"{path} has no tokenizer (tokenizer.json / tokenizer_config.json)")


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = _pick_device(config.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        path = Path(config.model_dir).expanduser().resolve()
        _check_model_dir(path)
        self.model_dir = path
        self.model_name = config.served_name or path.name
        t0 = time.perf_counter()
        #: weights mapped from the GPU memory service (None: loaded in-process)
        self.weights: Any = None
        self.tokenizer, self.model = self._load(path)
        #: Seconds spent in each start-up step (reported by /ready and bench/coldstart.py).
        self.startup: dict[str, float] = {"weights_load_s": time.perf_counter() - t0}
        self.vocab_limit = min(len(self.tokenizer), self.model.config.get_text_config().vocab_size)
        self.eos_ids = self._eos_ids()
        t0 = time.perf_counter()
        self.store = self._allocate_kv()
        self.startup["kv_alloc_s"] = time.perf_counter() - t0
        self.cache = RegionCache(self.store)
        self.max_seqs = self.store.shape[2]
        self.max_len = self.store.shape[4]
        self._make_buffers()
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_logits: torch.Tensor | None = None
        self.graph_status = "not attempted"
        self._cond = threading.Condition()
        self._pending: list[Request] = []
        self._paused = False
        self._busy = False
        self._closed = False
        self.ready = False
        self.stats = {"requests": 0, "generated_tokens": 0, "prompt_tokens": 0, "batches": 0, "max_batch": 0}
        self._thread: threading.Thread | None = None

    # ---- loading -------------------------------------------------------------------------

    def _load(self, path: Path) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise ModelDirError(f"cannot load the tokenizer from {path}: {_first_line(exc)}") from None
        try:
            model = self._load_model(path)
        except WarmstartError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelDirError(
                f"cannot load a causal LM from {path}: {_first_line(exc)}",
                hint="the directory needs a transformers causal-LM config.json and matching safetensors",
            ) from None
        model.to(self.device).eval()
        model.requires_grad_(False)
        return tokenizer, model

    def _load_model(self, path: Path) -> Any:
        if self.config.weights_from_gms:
            return self._map_from_gms(path)
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            str(path), dtype=self.dtype, local_files_only=True, attn_implementation="sdpa"
        )

    def _map_from_gms(self, path: Path) -> Any:
        """Build the model with its parameters aliasing weights mapped from the service."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from warmstart.gms.client import GmsWeights
        from warmstart.gms.server import default_socket

        sock = self.config.weights_from_gms or "auto"
        if sock == "auto":
            sock = default_socket(self.device.index or 0 if self.device.type == "cuda" else "cpu")
        weights = GmsWeights(
            sock, path, device=self.device.index if self.device.type == "cuda" else None,
            kind="cuda" if self.device.type == "cuda" else "memfd",
        )  # fmt: skip
        t0 = time.perf_counter()
        weights.attach()
        try:
            weights.wait()
            floats = {t.dtype for t in weights.tensors.values() if t.is_floating_point()}
            if len(floats) != 1:
                raise ModelDirError(f"{path} mixes floating dtypes {sorted(map(str, floats))}; "
                                    "weights from the memory service are used as stored")  # fmt: skip
            self.dtype = floats.pop()
            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            with _parameters_on_meta():
                model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, attn_implementation="sdpa")
            model.load_state_dict(weights.tensors, strict=False, assign=True)
            model.tie_weights()
            if (path / "generation_config.json").is_file():  # from_pretrained reads it too (EOS ids)
                from transformers import GenerationConfig

                model.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
            missing = [n for n, p in model.named_parameters() if p.is_meta]
            if missing:
                raise ModelDirError(f"the weights in {path} lack {', '.join(missing[:3])}")
        except BaseException:
            weights.close()
            raise
        self.weights = weights
        log.info("weights mapped from the memory service at %s in %.2f s (%s)", sock,
                 time.perf_counter() - t0, weights.layout_hash)  # fmt: skip
        return model

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = getattr(self.model, "generation_config", None)
        for src in (getattr(gen, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(x) for x in src)
        return ids

    def _allocate_kv(self) -> KVStore:
        cfg = self.model.config.get_text_config()
        layers = cfg.num_hidden_layers
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        max_pos = getattr(cfg, "max_position_embeddings", None) or 4096
        max_len = self.config.max_seq_len or min(max_pos, 4096)
        if max_len < 2:
            raise UsageError(f"--max-seq-len {max_len} is too small")
        if max_len > max_pos:
            raise UsageError(f"--max-seq-len {max_len} exceeds the model's {max_pos} positions")
        per_seq = KVStore.bytes_per_token(layers, kv_heads, head_dim, self.dtype) * max_len
        free = free_memory_bytes(self.device)
        if self.config.kv_cache_gib is not None:
            if self.config.kv_cache_gib <= 0:
                raise UsageError(f"--kv-cache-gib must be positive, got {self.config.kv_cache_gib}")
            budget = int(self.config.kv_cache_gib * GIB)
            if budget > free:
                raise KvCacheTooLarge(
                    f"KV cache of {self.config.kv_cache_gib:g} GiB exceeds the {free / GIB:.2f} GiB "
                    f"free on {self.device}",
                    hint="lower --kv-cache-gib (or --max-num-seqs / --max-seq-len)",
                )
        else:
            if not 0 < self.config.kv_cache_fraction <= 0.95:
                raise UsageError("--kv-cache-fraction must be in (0, 0.95]")
            budget = int(free * self.config.kv_cache_fraction)
        seqs = min(self.config.max_num_seqs, budget // per_seq)
        if seqs < 1:
            raise KvCacheTooLarge(
                f"a KV cache of {budget / GIB:.3f} GiB cannot hold one sequence of {max_len} tokens "
                f"(needs {per_seq / GIB:.3f} GiB)",
                hint="raise --kv-cache-gib or lower --max-seq-len",
            )
        nbytes = seqs * per_seq
        try:
            region = allocate_region(nbytes, self.device)
        except (MemoryError, RuntimeError, OSError) as exc:
            raise KvCacheTooLarge(f"cannot allocate a {nbytes / GIB:.2f} GiB KV cache: {_first_line(exc)}") from None
        store = KVStore(
            region, layers=layers, max_seqs=seqs, kv_heads=kv_heads, max_len=max_len, head_dim=head_dim, dtype=self.dtype
        )
        log.info(
            "KV cache: %.3f GiB at %#x, %d seqs x %d tokens (%d layers, %d kv heads, dim %d)",
            nbytes / GIB, store.address, seqs, max_len, layers, kv_heads, head_dim,
        )
        return store

    def _make_buffers(self) -> None:
        b, s, dev = self.max_seqs, self.max_len, self.device
        self._min = torch.finfo(self.dtype).min
        self._dec_ids = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._dec_pos = torch.zeros((b, 1), dtype=torch.long, device=dev)
        self._dec_wpos = torch.zeros((1,), dtype=torch.long, device=dev)
        self._dec_mask = torch.full((b, 1, 1, s), self._min, dtype=self.dtype, device=dev)
        self._cols = torch.arange(s, device=dev)
        import inspect

        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "past_key_values" if "past_key_values" in params else "cache"

    # ---- forward passes ------------------------------------------------------------------

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, *, last_only: bool) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True}
        if last_only:
            kwargs["logits_to_keep"] = 1
        out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, **kwargs)
        return out.logits[:, -1, :]

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[int], int]:
        n, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((n, width), dtype=torch.long)
        pos = torch.zeros((n, width), dtype=torch.long)
        starts = []
        for i, p in enumerate(prompts):
            s = width - len(p)
            starts.append(s)
            ids[i, s:] = torch.tensor(p, dtype=torch.long)
            pos[i, s:] = torch.arange(len(p))
        ids, pos = ids.to(self.device), pos.to(self.device)
        start_t = torch.tensor(starts, device=self.device)
        q = torch.arange(width, device=self.device)
        allowed = (self._cols[None, None, :] >= start_t[:, None, None]) & (self._cols[None, None, :] <= q[None, :, None])
        mask = torch.where(allowed, 0.0, self._min).to(self.dtype).unsqueeze(1)
        self.cache.write_pos = torch.arange(width, device=self.device)
        logits = self._forward(ids, pos, mask, last_only=True)
        # decode mask rows: each row sees its own prompt columns
        self._dec_mask.fill_(self._min)
        self._dec_mask[:, 0, 0, 0] = 0.0  # idle rows attend to column 0 only (no NaN)
        for i, s in enumerate(starts):
            self._dec_mask[i, 0, 0, :] = self._min
            self._dec_mask[i, 0, 0, s:width] = 0.0
        return logits, [len(p) for p in prompts], width

    def _decode_eager(self, n: int) -> torch.Tensor:
        self.cache.write_pos = self._dec_wpos
        return self._forward(self._dec_ids[:n], self._dec_pos[:n], self._dec_mask[:n], last_only=False)

    @torch.inference_mode()
    def _decode(self, n: int) -> torch.Tensor:
        if self._graph is not None:
            self._graph.replay()
            assert self._graph_logits is not None
            return self._graph_logits[:n]
        return self._decode_eager(n)

    def _capture_graph(self) -> None:
        if self.device.type != "cuda":
            self.graph_status = "off (CPU)"
            return
        if not self.config.cuda_graphs:
            self.graph_status = "off (disabled)"
            return
        b = self.max_seqs
        self._dec_ids.zero_()
        self._dec_pos.zero_()
        self._dec_wpos.zero_()
        self._dec_mask.fill_(self._min)
        self._dec_mask[:, 0, 0, 0] = 0.0
        try:
            with torch.inference_mode():
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._decode_eager(b)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._decode_eager(b)
            torch.cuda.synchronize(self.device)
            self._graph, self._graph_logits = graph, logits
            self.graph_status = f"captured (decode, batch {b})"
        except Exception as exc:  # noqa: BLE001 - any capture failure means eager
            self._graph = None
            self.graph_status = f"off (capture failed: {_first_line(exc)})"
            log.warning("CUDA graph capture failed, decoding eagerly: %s", _first_line(exc))

    # ---- sampling ------------------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, reqs: list[Request]) -> list[int]:
        logits = logits[:, : self.vocab_limit]
        greedy = torch.argmax(logits, dim=-1).tolist()
        out: list[int] = []
        for i, req in enumerate(reqs):
            p = req.params
            if p.temperature <= 0:
                out.append(int(greedy[i]))
                continue
            row = logits[i].float().cpu() / p.temperature
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_p, idx = torch.sort(probs, descending=True)
                keep = torch.cumsum(sorted_p, 0) - sorted_p < p.top_p
                sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
                choice = idx[torch.multinomial(sorted_p, 1, generator=req._gen)]
            else:
                choice = torch.multinomial(probs, 1, generator=req._gen)
            out.append(int(choice.item()))
        return out

    # ---- batch loop ----------------------------------------------------------------------

    def _emit(self, req: Request, token: int | None, finish: str | None) -> None:
        delta = ""
        if token is not None:
            req.output_ids.append(token)
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
            if req.params.ignore_eos or token not in self.eos_ids:
                text = self.tokenizer.decode(
                    [t for t in req.output_ids if t not in self.eos_ids], skip_special_tokens=True
                )
                for stop in req.params.stop:
                    cut = text.find(stop)
                    if stop and cut >= 0:
                        text, finish = text[:cut], "stop"
                # hold back a partial UTF-8 sequence until its last byte arrives
                if finish is None and text.endswith("\ufffd"):
                    text = req.text
                delta = text[len(req.text) :] if text.startswith(req.text) else ""
                req.text = text if text.startswith(req.text) else req.text + delta
        if finish is not None:
            req.finish_reason = finish
        if req.sink is not None and (delta or token is not None or finish):
            try:
                req.sink(TokenEvent(token, delta, finish))
            except Exception:  # noqa: BLE001 - a broken consumer must not kill the batch
                log.exception("token sink failed")
        if finish is not None:
            req.done.set()

    def _run_batch(self, reqs: list[Request]) -> None:
        n = len(reqs)
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], n)
        logits, lengths, width = self._prefill([r.prompt_ids for r in reqs])
        active = [True] * n
        col = width
        while True:
            tokens = self._choose(logits, reqs)
            for i, req in enumerate(reqs):
                if not active[i]:
                    continue
                tok = tokens[i]
                finish = None
                if tok in self.eos_ids and not req.params.ignore_eos:
                    finish = "stop"
                elif len(req.output_ids) + 1 >= req.params.max_tokens or col + 1 > self.max_len:
                    finish = "length"
                self._emit(req, tok, finish)
                if req.finish_reason is not None:
                    active[i] = False
                self.stats["generated_tokens"] += 1
            if not any(active) or col >= self.max_len:
                break
            self._dec_ids[:n, 0] = torch.tensor(tokens, device=self.device)
            self._dec_pos[:n, 0] = torch.tensor([lengths[i] + col - width for i in range(n)], device=self.device)
            self._dec_wpos.fill_(col)
            self._dec_mask[:n, 0, 0, col] = 0.0
            logits = self._decode(n)
            col += 1
        for i, req in enumerate(reqs):
            if not req.done.is_set():
                self._emit(req, None, "length")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._pending):
                    self._cond.wait()
                if self._closed:
                    return
            time.sleep(self.config.batch_wait_s)  # let concurrent arrivals join the batch
            with self._cond:
                if self._paused or not self._pending:
                    continue
                batch = self._pending[: self.max_seqs]
                del self._pending[: len(batch)]
                self._busy = True
            try:
                self._run_batch(batch)
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("batch failed")
                for req in batch:
                    if not req.done.is_set():
                        req.error = _first_line(exc)
                        self._emit(req, None, "error")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    # ---- public API ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="warmstart-scheduler", daemon=True)
            self._thread.start()

    def warmup(self) -> None:
        """Run the real paths once (prefill, decode, sampling), capture the decode graph."""
        self.start()
        prompt = self.encode("warm up the engine")[: self.max_len // 2] or [0]
        steps = max(1, min(4, self.max_len - len(prompt) - 1))
        self.generate(prompt, SamplingParams(max_tokens=steps, ignore_eos=True))
        with self._cond:  # graph capture runs with the scheduler idle
            self._paused = True
            while self._busy:
                self._cond.wait()
        try:
            self._capture_graph()
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()
        self.generate(prompt, SamplingParams(max_tokens=steps, temperature=0.8, seed=0, ignore_eos=True))
        self.forget_warmup()
        self.ready = True
        log.info("warm-up done; CUDA graphs: %s", self.graph_status)

    def forget_warmup(self) -> None:
        """Leave no trace of warm-up requests: an empty KV cache, zeroed counters."""
        with self._cond:
            while self._busy or self._pending:
                self._cond.wait(0.01)
        self.store.tensor.zero_()
        self.stats.update(requests=0, generated_tokens=0, prompt_tokens=0, batches=0, max_batch=0)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001
            raise RequestError(f"cannot apply the chat template: {_first_line(exc)}") from None
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[TokenEvent], None] | None = None) -> Request:
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        if params.max_tokens < 1:
            raise RequestError("max_tokens must be at least 1")
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the engine's max sequence length {self.max_len}"
            )
        if any(not 0 <= t < self.vocab_limit for t in prompt_ids):
            raise RequestError("prompt contains token ids outside the vocabulary")
        if not 0 < params.top_p <= 1:
            raise RequestError("top_p must be in (0, 1]")
        req = Request(list(prompt_ids), params, sink)
        if params.temperature > 0:
            req._gen = torch.Generator().manual_seed(
                params.seed if params.seed is not None else int(torch.seed() % (1 << 62))
            )
        with self._cond:
            if self._closed:
                raise RequestError("the engine is shut down")
            self._pending.append(req)
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += len(prompt_ids)
            self._cond.notify_all()
        return req

    def generate(self, prompt_ids: list[int], params: SamplingParams, timeout: float | None = 600) -> Request:
        return self.submit(prompt_ids, params).wait(timeout)

    def release_kv(self) -> None:
        """Wait for the running batch, pause scheduling, free the KV cache's physical memory."""
        with self._cond:
            self._paused = True
            while self._busy:
                self._cond.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.store.release()
        if self.weights is not None:
            self.weights.detach()  # unmapped and released: the snapshot holds no weights
        log.info("KV cache released (%.3f GiB, VA %#x kept)", self.store.nbytes / GIB, self.store.address)
        if self.device.type == "cuda":
            self._release_cached_blocks()

    def _release_cached_blocks(self) -> None:
        """Give torch's cached, unused device blocks back to the driver.

        Whatever the caching allocator keeps from warm-up (prefill activations
        of the largest batch) would otherwise be checkpointed by the driver,
        written to the snapshot and restored byte for byte. The captured decode
        graph keeps its own pool, which this leaves alone; later allocations
        come back on demand.
        """
        reserved = torch.cuda.memory_reserved(self.device)
        torch.cuda.empty_cache()
        log.info(
            "torch device memory at the checkpoint point: %.3f GiB allocated, %.3f GiB cached before, %.3f GiB after",
            torch.cuda.memory_allocated(self.device) / GIB,
            reserved / GIB,
            torch.cuda.memory_reserved(self.device) / GIB,
        )

    def reacquire_kv(self) -> None:
        if self.weights is not None:
            self.weights.attach()  # the service streams in whatever it lacks meanwhile
        self.store.reacquire()
        if self.weights is not None:
            self.weights.wait()  # refuses weights of another layout hash
        if self.store.address != self.cache.store.tensor.data_ptr():  # pragma: no cover - defensive
            raise RuntimeError("KV cache came back at a different address")
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        log.info("KV cache re-mapped at %#x", self.store.address)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for req in pending:
            req.error = "engine shut down"
            self._emit(req, None, "error")
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.weights is not None:
            self.weights.close()


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create modules' parameters on the meta device (buffers stay real), so a model can
    be built without memory for weights that are assigned afterwards."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
