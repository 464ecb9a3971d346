"""vLLM adapter: checkpoint a vLLM engine through its sleep mode.

vLLM's public sleep API (engine built with ``enable_sleep_mode=True``):

* ``LLM.sleep(level: int = 1)`` / ``LLM.wake_up(tags: list[str] | None = None)``
  (offline engine), and ``AsyncLLM.sleep(level)`` / ``AsyncLLM.wake_up(tags)``
  (coroutines, the OpenAI server's engine). Level 1 offloads the weights to
  host memory and discards the KV cache; ``wake_up()`` brings both back.

Usage, offline::

    llm = LLM(model, enable_sleep_mode=True)
    from warmstart.worker.adapters.vllm import checkpoint_vllm
    checkpoint_vllm(llm)                     # no-op without SNAPSHOT_CONTROL_DIR

or with an ``AsyncLLM`` from a thread without a running event loop (the
coroutines are awaited with ``asyncio.run``). For ``vllm serve``, register
`register` as a general plugin so checkpoint mode's environment (NCCL on
loopback, no cuMem) is applied in every vLLM process before NCCL starts::

    [project.entry-points."vllm.general_plugins"]
    warmstart = "warmstart.worker.adapters.vllm:register"

Sleeping at level 1 before the snapshot keeps the GPU image small (weights go
to host memory, which CRIU dumps instead; KV is dropped).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from warmstart.worker.adapters._run import call
from warmstart.worker.checkpoint import Outcome, checkpoint_point
from warmstart.worker.preflight import apply_checkpoint_env


class SleepableEngine(Protocol):
    def sleep(self, level: int = 1) -> Any: ...

    def wake_up(self, tags: list[str] | None = None) -> Any: ...


def checkpoint_vllm(
    engine: SleepableEngine,
    *,
    level: int = 1,
    timeout: float | None = None,
    labels: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Outcome:
    """Sleep ``engine`` at ``level``, wait at the checkpoint point, wake it up."""
    if level not in (1, 2):
        raise ValueError(f"vLLM sleep level must be 1 or 2, got {level}")
    return checkpoint_point(
        release=lambda: call(engine.sleep(level=level)),
        reacquire=lambda: call(engine.wake_up()),
        timeout=timeout,
        labels={"engine": "vllm", **dict(labels or {})},
        **kwargs,
    )


def register() -> None:
    """``vllm.general_plugins`` entry point: vLLM calls it in each of its processes."""
    import os

    from warmstart.protocol import CONTROL_DIR_ENV

    if os.environ.get(CONTROL_DIR_ENV):
        apply_checkpoint_env()
