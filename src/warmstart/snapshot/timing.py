"""Per-phase timings of an operation."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from warmstart.snapshot.manifest import PhaseTiming

#: Called with a phase name when it starts (for progress displays).
PhaseListener = Callable[[str], None]


@dataclass
class Timer:
    listener: PhaseListener | None = None
    phases: list[PhaseTiming] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def phase(self, name: str, nbytes: int | None = None) -> Iterator[None]:
        if self.listener:
            self.listener(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0, nbytes)

    def add(self, name: str, seconds: float, nbytes: int | None = None) -> None:
        self.phases.append(PhaseTiming(name=name, seconds=round(seconds, 6), bytes=nbytes))

    def set_bytes(self, name: str, nbytes: int) -> None:
        self.phases = [
            p.model_copy(update={"bytes": nbytes}) if p.name == name else p for p in self.phases
        ]

    ended: float | None = None

    def stop(self) -> None:
        """The operation is over: :attr:`total` stops growing (a later call moves the end)."""
        self.ended = time.perf_counter()

    @property
    def total(self) -> float:
        """Seconds from the start to :meth:`stop` (until then, to now)."""
        return (self.ended or time.perf_counter()) - self.started
