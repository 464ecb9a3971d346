"""Rendering for people (rich) and machines (``--json``)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from warmstart.snapshot.manifest import PhaseTiming

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def emit_json(data: Any) -> None:
    def default(o: Any) -> Any:
        if isinstance(o, BaseModel):
            return o.model_dump(mode="json")
        return str(o)

    sys.stdout.write(json.dumps(data, indent=2, default=default) + "\n")


def human_bytes(n: int | None) -> str:
    if n is None:
        return ""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


def rate(nbytes: int | None, seconds: float) -> str:
    if not nbytes or seconds <= 0:
        return ""
    return f"{nbytes / seconds / 1e9:.2f}"


def timing_table(
    title: str,
    phases: Sequence[PhaseTiming],
    total: float,
    ceilings: Mapping[str, float] | None = None,
) -> Table:
    """Per-phase seconds, bytes and GB/s; with ``ceilings`` (phase -> GB/s this
    machine can reach, from ``warmstart doctor --bandwidth``) a column for them."""
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("GB/s", justify="right")
    if ceilings:
        table.add_column("ceiling GB/s", justify="right")
    for p in phases:
        style = "dim" if p.name.startswith(" ") else None
        row = [p.name, f"{p.seconds:.3f}", human_bytes(p.bytes), rate(p.bytes, p.seconds)]
        if ceilings:
            limit = ceilings.get(p.name.strip())
            row.append(f"{limit:.1f}" if limit else "")
        table.add_row(*row, style=style)
    table.add_section()
    table.add_row("total", f"{total:.3f}", "", "", *([""] if ceilings else []))
    return table


@contextmanager
def progress(enabled: bool, what: str) -> Iterator[Any]:
    """A spinner whose text follows the current phase; silent when not enabled."""
    if not enabled or not err_console.is_terminal:
        yield lambda _name: None
        return
    with err_console.status(what) as status:
        yield lambda name: status.update(f"{what}: {name.strip()}")
