"""Host layer: drive CRIU to dump and restore process trees."""

from warmstart.host.criu import (
    Criu,
    CriuVersion,
    DumpOptions,
    RestoreOptions,
    find_criu,
)
from warmstart.host.stats import DumpStats, RestoreStats

__all__ = [
    "Criu",
    "CriuVersion",
    "DumpOptions",
    "DumpStats",
    "RestoreOptions",
    "RestoreStats",
    "find_criu",
]
