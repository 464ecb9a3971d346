"""Facts about this host that decide whether a snapshot can restore here."""

from __future__ import annotations

import platform
import socket
from functools import cache
from pathlib import Path

from warmstart.snapshot.manifest import HostInfo

#: CPU features that code picks at start-up (PyTorch, BLAS, JITs): a snapshot
#: taken where one was present may execute it, so the target must have it too.
ISA_FLAGS = frozenset(
    {
        "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
        "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni",
        "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
        "asimd", "sve", "sve2",
    }
)  # fmt: skip


@cache
def _cpuinfo() -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or "unknown", ()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown", "", platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = tuple(sorted(value.split()))
    return model, flags


def current(criu_version: str) -> HostInfo:
    model, flags = _cpuinfo()
    return HostInfo(
        hostname=socket.gethostname(),
        kernel=platform.release(),
        arch=platform.machine(),
        cpu_model=model,
        cpu_flags=[f for f in flags if f in ISA_FLAGS],
        criu_version=criu_version,
    )
