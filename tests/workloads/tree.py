"""A process tree that exercises what a checkpoint must carry.

Usage: python tree.py STATE_DIR MEM_MIB [ZERO_MIB [SCATTER_RUNS]]

The root holds a counter, MEM_MIB of patterned memory, ZERO_MIB of memory
written with zeros (present pages, as a GPU checkpoint's host copy has) with
one data byte every 3 MiB and, in its first 4 MiB, in every other 64 KiB,
SCATTER_RUNS short runs of written pages (1 to 8
pages each, every 64 KiB, untouched pages between them: the many small runs of
a real worker's heap), a file it appends to,
a thread with its own counter, a pipe to a child (which appends what it reads
to its own file), a unix socket pair, a memfd, a deleted-but-open file and an
flock. Every tick it writes ``status.json`` atomically. Touching ``verify``
in STATE_DIR makes it hash its memory, memfd and deleted file into the status.
"""

import fcntl
import hashlib
import json
import mmap
import os
import socket
import subprocess
import sys
import threading
import time

state = sys.argv[1]
mem_mib = int(sys.argv[2])
zero_mib = int(sys.argv[3]) if len(sys.argv) > 3 else 0
scatter_runs = int(sys.argv[4]) if len(sys.argv) > 4 else 0

pattern = bytes(range(256)) * 4096  # 1 MiB
memory = bytearray(pattern * mem_mib)
for i in range(0, len(memory), 4096):  # make every page distinct
    memory[i : i + 8] = i.to_bytes(8, "little")

zeros = bytearray(zero_mib << 20)
for i in range(0, len(zeros), 4096):  # present pages that hold zeros, not the shared zero page
    zeros[i] = 1
    zeros[i] = 0
for i in range(12345, len(zeros), 3 << 20):
    zeros[i] = 0x5A
for i in range((64 << 10) + 77, min(len(zeros), 4 << 20), 128 << 10):  # data and holes in turn, 64 KiB each
    zeros[i] = 0xA5

scattered = mmap.mmap(-1, max(scatter_runs, 1) << 16, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(scatter_runs):
    run = (i % 8 + 1) << 12
    scattered[i << 16 : (i << 16) + run] = (i.to_bytes(4, "little") * (run // 4))

log = open(os.path.join(state, "counter.log"), "a", buffering=1)
lockf = open(os.path.join(state, "lockfile"), "w")
fcntl.flock(lockf, fcntl.LOCK_EX)

memfd = os.memfd_create("warmstart-test")
os.write(memfd, b"memfd-payload-" * 1000)

deleted_path = os.path.join(state, "deleted.bin")
deleted = open(deleted_path, "w+b")
deleted.write(b"deleted-payload-" * 5000)
deleted.flush()
os.unlink(deleted_path)

left, right = socket.socketpair()

child = subprocess.Popen(
    [sys.executable, "-c",
     "import sys\nout=open(sys.argv[1],'a',buffering=1)\n"
     "for line in sys.stdin: out.write(line)",
     os.path.join(state, "child.log")],
    stdin=subprocess.PIPE, text=True, bufsize=1,
)  # fmt: skip

thread_counter = 0


def spin() -> None:
    global thread_counter
    while True:
        thread_counter += 1
        time.sleep(0.01)


threading.Thread(target=spin, daemon=True).start()


def digest() -> dict:
    os.lseek(memfd, 0, 0)
    deleted.seek(0)
    return {
        "memory": hashlib.sha256(memory).hexdigest(),
        "zeros": hashlib.sha256(zeros).hexdigest(),
        "scattered": hashlib.sha256(scattered).hexdigest(),
        "memfd": hashlib.sha256(os.read(memfd, 1 << 20)).hexdigest(),
        "deleted": hashlib.sha256(deleted.read()).hexdigest(),
    }


# One fd kept open and rewritten in place: no file ever appears or vanishes
# between checkpoint and restore (readers retry on a torn read).
status_fd = os.open(os.path.join(state, "status.json"), os.O_RDWR | os.O_CREAT, 0o644)
counter = 0
digests = digest()
while True:
    counter += 1
    log.write(f"{counter}\n")
    child.stdin.write(f"{counter}\n")
    left.send(counter.to_bytes(8, "little"))
    echoed = int.from_bytes(right.recv(8), "little")
    verify = os.path.join(state, "verify")
    if os.path.exists(verify):
        os.unlink(verify)
        digests = digest()
    status = {
        "pid": os.getpid(),
        "counter": counter,
        "echoed": echoed,
        "thread_counter": thread_counter,
        "child_pid": child.pid,
        "child_alive": child.poll() is None,
        "digests": digests,
        "time": time.time(),
    }
    os.pwrite(status_fd, json.dumps(status).encode().ljust(4096), 0)
    time.sleep(0.02)
