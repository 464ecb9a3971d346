"""Call a maybe-async engine method from synchronous checkpoint code."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any


def call(result: Any) -> Any:
    """Wait for ``result`` if it is awaitable (no running loop here), else return it."""
    if inspect.isawaitable(result):
        async def _await() -> Any:
            return await result

        return asyncio.run(_await())
    return result
