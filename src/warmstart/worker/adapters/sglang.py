"""SGLang adapter: checkpoint an SGLang engine through its memory-occupation API.

SGLang's public API (engine built with ``enable_memory_saver=True``):

* ``Engine.release_memory_occupation(tags: list[str] | None = None)`` frees the
  GPU memory of the KV cache and weights (tags ``"kv_cache"``, ``"weights"``,
  ``"cuda_graph"``; all when ``None``) while keeping the virtual addresses, so
  captured CUDA graphs stay valid;
* ``Engine.resume_memory_occupation(tags: list[str] | None = None)`` maps it back.

Usage::

    engine = sglang.Engine(model_path=..., enable_memory_saver=True)
    from warmstart.worker.adapters.sglang import checkpoint_sglang
    checkpoint_sglang(engine, tags=["kv_cache"])   # no-op without SNAPSHOT_CONTROL_DIR

Releasing only ``kv_cache`` keeps the weights on the GPU (the snapshot then
carries them and the restore needs no reload); releasing everything gives the
smallest GPU image. Async variants (coroutines) are awaited too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from warmstart.worker.adapters._run import call
from warmstart.worker.checkpoint import Outcome, checkpoint_point

KNOWN_TAGS = frozenset({"kv_cache", "weights", "cuda_graph"})


class MemorySaverEngine(Protocol):
    def release_memory_occupation(self, tags: list[str] | None = None) -> Any: ...

    def resume_memory_occupation(self, tags: list[str] | None = None) -> Any: ...


def checkpoint_sglang(
    engine: MemorySaverEngine,
    *,
    tags: Sequence[str] | None = ("kv_cache",),
    timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Outcome:
    """Release ``tags`` (None = all), wait at the checkpoint point, resume them."""
    tag_list = None if tags is None else list(tags)
    if tag_list is not None:
        unknown = sorted(set(tag_list) - KNOWN_TAGS)
        if unknown:
            raise ValueError(f"unknown SGLang memory tags {unknown}; known: {sorted(KNOWN_TAGS)}")
    return checkpoint_point(
        release=lambda: call(engine.release_memory_occupation(tags=tag_list)),
        reacquire=lambda: call(engine.resume_memory_occupation(tags=tag_list)),
        timeout=timeout,
        labels={"engine": "sglang", **dict(labels or {})},
        **kwargs,
    )
