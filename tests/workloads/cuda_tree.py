"""A CUDA process (optionally with a CUDA child) holding a known device pattern.

Usage: python cuda_tree.py STATE_DIR GIB [--child]

Allocates GIB of int32 on the GPU filled with a pattern, keeps a counter in
device memory that it increments every tick, and writes status.json in place.
Touching ``verify`` makes it compare the whole buffer bit for bit with a
freshly generated pattern.
"""

import json
import os
import subprocess
import sys
import time

import torch

state, gib = sys.argv[1], float(sys.argv[2])
child_mode = "--child" in sys.argv
n = int(gib * (1 << 30)) // 4


CHUNK = 1 << 26  # elements: the int64 temporaries stay small next to the buffer


def pattern(start: int, end: int) -> torch.Tensor:
    return (torch.arange(start, end, device="cuda", dtype=torch.int64) * 2654435761 % 2147483647).to(torch.int32)


def matches(t: torch.Tensor) -> bool:
    return all(torch.equal(t[i : i + CHUNK], pattern(i, min(n, i + CHUNK))) for i in range(0, n, CHUNK))


# Allocated first and filled in chunks: a buffer carved out of a freed temporary's larger
# segment would pin that whole segment, and the process would hold about twice GIB.
big = torch.empty(n, dtype=torch.int32, device="cuda")
for i in range(0, n, CHUNK):
    big[i : i + CHUNK] = pattern(i, min(n, i + CHUNK))
torch.cuda.empty_cache()  # device memory is then GIB plus the context
counter = torch.zeros(1, dtype=torch.int64, device="cuda")
child = None
if child_mode:
    child_state = os.path.join(state, "child")
    os.makedirs(child_state, exist_ok=True)
    child = subprocess.Popen(
        [sys.executable, __file__, child_state, "0.25"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
status_fd = os.open(os.path.join(state, "status.json"), os.O_RDWR | os.O_CREAT, 0o644)
equal = None
while True:
    counter += 1
    verify = os.path.join(state, "verify")
    if os.path.exists(verify):
        os.unlink(verify)
        equal = matches(big)
        torch.cuda.empty_cache()
    status = {
        "pid": os.getpid(),
        "counter": int(counter.item()),
        "equal": equal,
        "child_pid": child.pid if child else None,
        "device_bytes": big.numel() * 4,
        "reserved_bytes": torch.cuda.memory_reserved(),
    }
    os.pwrite(status_fd, json.dumps(status).encode().ljust(4096), 0)
    time.sleep(0.02)
