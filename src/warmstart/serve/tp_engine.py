"""The reference engine split over a tensor-parallel rank group.

Rank 0 (the *leader*) is an ordinary `Engine`: scheduler, sampling, HTTP.
Every forward pass it runs is first announced to the other ranks (the
*followers*) by a broadcast header and its inputs, so all ranks run the same
sharded forward (`warmstart.serve.tp_shard`) and meet in the same all-reduces:

* ``PREFILL n width`` + the prompts -> every rank runs ``Engine._prefill``;
* ``DECODE n`` + the decode buffers (ids, positions, write column, mask),
  broadcast into the followers' static buffers -> every rank runs
  ``Engine._decode`` (the CUDA graph replay on GPU);
* ``CAPTURE`` -> every rank captures its decode graph (with the all-reduces);
* ``QUIESCE`` -> followers leave their loop for the checkpoint point;
* ``STOP`` -> followers exit.

Each rank holds its own KV cache for its KV heads (``--kv-cache-gib`` is per
rank). Sampling happens on the leader only; chosen tokens reach the followers
as the next decode's ids.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from warmstart.serve.engine import Engine, EngineConfig
from warmstart.serve.kvcache import KVStore
from warmstart.serve.tp_shard import shard_model

log = logging.getLogger("warmstart.serve.tp")

PREFILL, DECODE, CAPTURE, QUIESCE, STOP = 1, 2, 3, 4, 5
_NAMES = {PREFILL: "prefill", DECODE: "decode", CAPTURE: "capture", QUIESCE: "quiesce", STOP: "stop"}


class TPEngine(Engine):
    def __init__(self, config: EngineConfig, *, rank: int, world_size: int) -> None:
        self.tp_rank = rank
        self.tp_size = world_size
        self.local_heads: dict[str, int] = {}
        super().__init__(config)
        #: This rank's GPU (``GPU-...`` UUID); after a restore onto other GPUs, the mapped one.
        self.gpu_uuid: str | None = None
        if self.device.type == "cuda":
            from warmstart.gpu.driver import normalize_uuid

            self.gpu_uuid = normalize_uuid(str(torch.cuda.get_device_properties(self.device).uuid))

    @property
    def leader(self) -> bool:
        return self.tp_rank == 0

    # ---- construction: load the whole model, keep this rank's shard -------------------------

    def _load(self, path: Path) -> tuple[Any, Any]:
        tokenizer, model = super()._load(path)
        self.local_heads = shard_model(model, self.tp_rank, self.tp_size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return tokenizer, model

    def _allocate_kv(self) -> KVStore:
        cfg = self.model.config.get_text_config()
        heads = cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        with _patched(cfg, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
                      num_attention_heads=heads // self.tp_size, num_key_value_heads=kv_heads // self.tp_size):
            return super()._allocate_kv()

    # ---- the leader announces every forward ----------------------------------------------------

    def _announce(self, op: int, a: int = 0, b: int = 0) -> None:
        import torch.distributed as dist

        header = torch.tensor([op, a, b], dtype=torch.long, device=self.device)
        dist.broadcast(header, 0)

    @torch.inference_mode()
    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, list[int], int]:
        if self.leader:
            import torch.distributed as dist

            n, width = len(prompts), max(len(p) for p in prompts)
            packed = torch.zeros((n, width + 1), dtype=torch.long)
            for i, p in enumerate(prompts):
                packed[i, 0] = len(p)
                packed[i, 1 : len(p) + 1] = torch.tensor(p, dtype=torch.long)
            self._announce(PREFILL, n, width)
            dist.broadcast(packed.to(self.device), 0)
        return super()._prefill(prompts)

    def _decode_buffers(self) -> list[torch.Tensor]:
        return [self._dec_ids, self._dec_pos, self._dec_wpos, self._dec_mask]

    @torch.inference_mode()
    def _decode(self, n: int) -> torch.Tensor:
        if self.leader:
            import torch.distributed as dist

            self._announce(DECODE, n)
            for buf in self._decode_buffers():
                dist.broadcast(buf, 0)
        return super()._decode(n)

    def _capture_graph(self) -> None:
        if self.leader and self.device.type == "cuda" and self.config.cuda_graphs:
            self._announce(CAPTURE)
        super()._capture_graph()

    # ---- followers ---------------------------------------------------------------------------

    def follow(self) -> str:
        """Run the leader's forward passes until it says ``quiesce`` or ``stop``; returns which."""
        import torch.distributed as dist

        assert not self.leader
        with torch.inference_mode():
            while True:
                header = torch.empty(3, dtype=torch.long, device=self.device)
                dist.broadcast(header, 0)
                op, a, b = (int(x) for x in header.tolist())
                if op == PREFILL:
                    packed = torch.empty((a, b + 1), dtype=torch.long, device=self.device)
                    dist.broadcast(packed, 0)
                    rows = packed.cpu().tolist()
                    Engine._prefill(self, [row[1 : row[0] + 1] for row in rows])
                elif op == DECODE:
                    for buf in self._decode_buffers():
                        dist.broadcast(buf, 0)
                    Engine._decode(self, a)
                elif op == CAPTURE:
                    Engine._capture_graph(self)
                elif op in (QUIESCE, STOP):
                    return _NAMES[op]
                else:
                    raise RuntimeError(f"rank {self.tp_rank}: unknown op {op} from the leader")

    # ---- the checkpoint point ----------------------------------------------------------------

    def quiesce(self) -> None:
        """Stop issuing collectives (leader: pause the scheduler, release the followers), drop graphs."""
        if self.leader:
            with self._cond:
                self._paused = True
                while self._busy:
                    self._cond.wait()
            self._announce(QUIESCE)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.drop_graph()

    def drop_graph(self) -> None:
        """Forget the decode graph: it captured all-reduces on a communicator about to go away."""
        self._graph = None
        self._graph_logits = None
        if self.graph_status.startswith("captured"):
            self.graph_status = "dropped for the checkpoint"
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def release_memory(self) -> None:
        self.store.release()

    def reacquire_memory(self) -> None:
        self.store.reacquire()

    def follow_gpu_map(self, gpu_map: dict[str, str]) -> None:
        """After a restore: the GPU this rank now runs on, by the restorer's map."""
        if self.gpu_uuid is not None and gpu_map:
            new = gpu_map.get(self.gpu_uuid, self.gpu_uuid)
            if new != self.gpu_uuid:
                log.info("rank %d moved from %s to %s", self.tp_rank, self.gpu_uuid, new)
            self.gpu_uuid = new

    def rebuilt(self) -> None:
        """The group is back: re-capture graphs (leader leads), then let the scheduler run."""
        if not self.leader:
            return  # the follower captures when the leader's CAPTURE arrives in follow()
        self._capture_graph()
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        super().close()
        if self.leader:
            import torch.distributed as dist

            if dist.is_initialized():
                try:
                    self._announce(STOP)
                except Exception as exc:  # noqa: BLE001 - the followers may be gone already
                    log.warning("could not tell the followers to stop: %s", exc)

    def parallel_info(self) -> dict[str, Any]:
        """For /ready: the group's size, this rank's heads, every rendezvous and the last GPU map."""
        info: dict[str, Any] = {"size": self.tp_size, "rank": self.tp_rank, **self.local_heads,
                                "gpu_uuid": self.gpu_uuid}
        group = getattr(self, "tp_group", None)
        if group is not None:
            info["rendezvous"] = [{k: r[k] for k in ("generation", "addr", "port")} for r in group.rendezvous_log]
            if group.resume_info is not None:
                info["gpu_map"] = group.resume_info.gpu_map
        return info


@contextmanager
def _patched(obj: Any, **values: Any) -> Iterator[None]:
    missing = object()
    old = {k: getattr(obj, k, missing) for k in values}
    for k, v in values.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is missing:
                delattr(obj, k)
            else:
                setattr(obj, k, v)
