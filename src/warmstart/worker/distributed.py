"""Multi-process (tensor-parallel) workers: tear communicators down at the checkpoint, rebuild after.

CRIU cannot dump TCP connections, and the CUDA checkpoint API hangs on live
NCCL communicators, so a rank group is made checkpointable from the inside:

* every rank is a child of one **launcher** process (`RankLauncher`), so the
  worker is one process tree that warmstart dumps at once. Launcher and ranks
  talk over a unix socketpair each (CRIU restores those); the launcher never
  opens an inet socket;
* at the checkpoint point every rank (`RankGroup.checkpoint_point`) runs the
  engine's ``quiesce`` (stop issuing collectives, drop CUDA graphs that
  captured them), meets the others in a barrier, destroys the process group
  *and* its TCPStore, frees its KV memory, checks that it holds no inet socket
  any more and reports ``ready`` to the launcher. Only when every rank is ready
  does the launcher reach its own `checkpoint_point` (which writes
  ``ready-for-snapshot`` with the launcher's pid: the root of the tree);
* after a restore the launcher hands the restore context (env, GPU map) to
  every rank; each rank applies the env (identity, rendezvous address/port),
  maps its KV memory back, and the group re-forms with a **fresh rendezvous**:
  rank 0 opens a new TCPStore (``WARMSTART_TP_PORT`` from the context, or a
  free port that is never the previous one) under a new random prefix, and the
  launcher relays its address to the other ranks. A restored group therefore
  never talks to the process that was checkpointed (or to its other copies);
* the launcher watches its ranks the whole time: a rank that dies (or reports
  an error) brings the whole worker down -- the other ranks are killed and the
  launcher exits 1 with one line saying which rank failed and when.

Rank-side functions import torch lazily; the launcher never imports it.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from warmstart import protocol
from warmstart.errors import UsageError, WarmstartError
from warmstart.worker.checkpoint import Coordinator, Outcome
from warmstart.worker.preflight import NotCheckpointable, check_checkpointable, inet_sockets

log = logging.getLogger("warmstart.worker.distributed")

RANK_ENV = "WARMSTART_TP_RANK"
WORLD_ENV = "WARMSTART_TP_WORLD_SIZE"
CHANNEL_FD_ENV = "WARMSTART_TP_FD"
#: Rendezvous address and port; read again from the restore context's env after a restore.
ADDR_ENV = "WARMSTART_TP_ADDR"
PORT_ENV = "WARMSTART_TP_PORT"
#: Seconds a rank waits for its peers in a rendezvous (and the launcher for a rebuild).
TIMEOUT_ENV = "WARMSTART_TP_TIMEOUT"
DEFAULT_TIMEOUT_S = 120.0


class RankFailed(WarmstartError):
    """A rank of a multi-process worker died or failed; the worker stops."""


# ---- the launcher <-> rank channel ------------------------------------------------------------


class Channel:
    """Newline-delimited JSON messages over one end of a unix socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""

    @classmethod
    def from_fd(cls, fd: int) -> Channel:
        return cls(socket.socket(fileno=fd))

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, **message: Any) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def _pop(self) -> dict[str, Any] | None:
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            return None
        self._buf = rest
        return json.loads(line)

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next message; raises EOFError when the peer is gone, TimeoutError on expiry."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (msg := self._pop()) is None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                raise TimeoutError("no message within the timeout")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("peer closed the channel")
            self._buf += chunk
        return msg

    def close(self) -> None:
        self.sock.close()


# ---- rank side ----------------------------------------------------------------------------------


@dataclass
class Resume:
    """What the launcher tells every rank when the checkpoint point is over."""

    outcome: Outcome
    env: dict[str, str] = field(default_factory=dict)
    gpu_map: dict[str, str] = field(default_factory=dict)
    snapshot_name: str | None = None


def _timeout_s(environ: Mapping[str, str] | None = None) -> float:
    raw = (os.environ if environ is None else environ).get(TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


class RankGroup:
    """One rank's view of the group: rendezvous, teardown, the checkpoint point.

    ``backend`` is ``"gloo"`` (CPU) or ``"nccl"`` (GPU); ``device`` is the
    torch device the rank computes on (NCCL needs it for its barrier).
    """

    def __init__(self, rank: int, world_size: int, channel: Channel, *, backend: str = "gloo",
                 device: Any = None, timeout_s: float | None = None) -> None:
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in a group of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.channel = channel
        self.backend = backend
        self.device = device
        self.timeout_s = timeout_s if timeout_s is not None else _timeout_s()
        #: One entry per rendezvous: {"generation", "addr", "port", "prefix"}.
        self.rendezvous_log: list[dict[str, Any]] = []
        self.restored = False
        self.resume_info: Resume | None = None
        #: Seconds from the launcher's resume to the rebuilt group (KV back, rendezvous, graphs).
        self.rebuild_s = 0.0
        self._store: Any = None
        self._callbacks: list[Callable[[Resume], None]] = []

    @classmethod
    def from_env(cls, *, backend: str = "gloo", device: Any = None) -> RankGroup:
        try:
            rank, world, fd = int(os.environ[RANK_ENV]), int(os.environ[WORLD_ENV]), int(os.environ[CHANNEL_FD_ENV])
        except (KeyError, ValueError):
            raise UsageError(
                f"this process is not a rank ({RANK_ENV}, {WORLD_ENV}, {CHANNEL_FD_ENV} unset)",
                hint="ranks are started by RankLauncher (warmstart serve --tensor-parallel N)",
            ) from None
        return cls(rank, world, Channel.from_fd(fd), backend=backend, device=device)

    def on_restore(self, callback: Callable[[Resume], None]) -> Callable[[Resume], None]:
        self._callbacks.append(callback)
        return callback

    @property
    def connected(self) -> bool:
        import torch.distributed as dist

        return dist.is_initialized()

    # -- rendezvous ------------------------------------------------------------------------------

    def rendezvous(self) -> dict[str, Any]:
        """Form the process group with a brand-new TCPStore (rank 0 hosts it)."""
        import datetime as dt

        import torch
        import torch.distributed as dist

        timeout = dt.timedelta(seconds=self.timeout_s)
        previous = self.rendezvous_log[-1]["port"] if self.rendezvous_log else None
        if self.rank == 0:
            addr = os.environ.get(ADDR_ENV) or "127.0.0.1"
            wanted = int(os.environ.get(PORT_ENV) or 0)
            store = dist.TCPStore(addr, wanted, self.world_size, True, timeout=timeout, wait_for_workers=False)
            while not wanted and store.port == previous:  # never the port of the group that was checkpointed
                store = dist.TCPStore(addr, 0, self.world_size, True, timeout=timeout, wait_for_workers=False)
            info = {"generation": len(self.rendezvous_log) + 1, "addr": addr, "port": int(store.port),
                    "prefix": uuid.uuid4().hex}
            self.channel.send(event="store", **info)
        else:
            msg = self._expect("rendezvous", self.timeout_s)
            info = {k: msg[k] for k in ("generation", "addr", "port", "prefix")}
            store = dist.TCPStore(info["addr"], info["port"], self.world_size, False, timeout=timeout)
        self._store = store
        prefixed = dist.PrefixStore(info["prefix"], store)
        kwargs: dict[str, Any] = {}
        if self.backend == "nccl" and self.device is not None:
            kwargs["device_id"] = torch.device(self.device)
        dist.init_process_group(self.backend, store=prefixed, rank=self.rank, world_size=self.world_size,
                                timeout=timeout, **kwargs)
        self.barrier()
        self.rendezvous_log.append(info)
        log.info("rank %d/%d joined rendezvous %d at %s:%d (%s)", self.rank, self.world_size,
                 info["generation"], info["addr"], info["port"], self.backend)
        return info

    def barrier(self) -> None:
        import torch
        import torch.distributed as dist

        if self.backend == "nccl":  # a tiny all-reduce on the rank's own GPU: no device guessing
            dist.all_reduce(torch.zeros(1, device=self.device))
            torch.cuda.synchronize(self.device)
        else:
            dist.barrier()

    def teardown(self, *, settle_s: float = 5.0) -> None:
        """Destroy the process group and the store; wait until no inet socket is left."""
        import gc

        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None
        gc.collect()
        deadline = time.monotonic() + settle_s
        while (left := inet_sockets()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if left:
            raise NotCheckpointable(
                f"rank {self.rank} still holds {len(left)} inet socket(s) after destroying its process "
                f"group ({'; '.join(left[:4])})",
                hint="something else in the rank opened a TCP socket before the checkpoint point",
            )

    # -- the checkpoint point --------------------------------------------------------------------

    def checkpoint_point(
        self,
        *,
        quiesce: Callable[[], None] | None = None,
        release: Callable[[], None] | None = None,
        reacquire: Callable[[], None] | None = None,
        rebuilt: Callable[[], None] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Resume:
        """Quiesce, tear down, report ready; then (after the launcher's answer) rebuild.

        ``quiesce`` must leave the rank issuing no collectives (and drop CUDA
        graphs that captured any); ``rebuilt`` runs once the new group is
        formed (re-capture graphs there). Every rank of the group calls this.
        """
        if quiesce is not None:
            quiesce()
        self.barrier()  # every rank is quiet before any communicator goes away
        self.teardown()
        if release is not None:
            release()
        check_checkpointable()
        self.channel.send(event="ready", rank=self.rank, pid=os.getpid(), labels=dict(labels or {}))
        msg = self._expect("resume", None)  # the snapshot may take as long as it takes
        t0 = time.perf_counter()
        resume = Resume(Outcome(msg["outcome"]), dict(msg.get("env") or {}), dict(msg.get("gpu_map") or {}),
                        msg.get("snapshot_name"))
        os.environ.update(resume.env)
        self.timeout_s = _timeout_s()  # the restore context may set WARMSTART_TP_TIMEOUT
        self.resume_info = resume
        if resume.outcome is Outcome.RESTORED:
            self.restored = True
        if reacquire is not None:
            reacquire()
        self.rendezvous()
        if rebuilt is not None:
            rebuilt()
        if self.restored:
            for callback in list(self._callbacks):
                callback(resume)
        self.rebuild_s = time.perf_counter() - t0
        self.channel.send(event="rebuilt", rank=self.rank, port=self.rendezvous_log[-1]["port"])
        return resume

    def report(self, event: str, **fields: Any) -> None:
        self.channel.send(event=event, rank=self.rank, **fields)

    def _expect(self, command: str, timeout: float | None) -> dict[str, Any]:
        try:
            msg = self.channel.recv(timeout)
        except EOFError:
            raise RankFailed(f"rank {self.rank}: the launcher is gone") from None
        except TimeoutError:
            raise RankFailed(f"rank {self.rank}: no {command!r} from the launcher within {timeout:g} s") from None
        if msg.get("cmd") == "abort":
            raise RankFailed(f"rank {self.rank}: aborted by the launcher ({msg.get('reason')})")
        if msg.get("cmd") != command:
            raise RankFailed(f"rank {self.rank}: expected {command!r} from the launcher, got {msg!r}")
        return msg


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent (the launcher) dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the parent died before the prctl
        os._exit(1)


# ---- launcher side ------------------------------------------------------------------------------


class Phase(enum.Enum):
    STARTING = "during start-up"
    CHECKPOINT = "while waiting at the checkpoint point"
    REBUILD = "during the rebuild after restore"
    SERVING = "while serving"
    STOPPING = "while stopping"


@dataclass
class _Rank:
    rank: int
    popen: subprocess.Popen[bytes]
    channel: Channel


class RankLauncher:
    """Starts ``world_size`` rank processes as its children and supervises them.

    ``argv(rank)`` and ``env(rank)`` give each rank's command line and extra
    environment (e.g. its ``CUDA_VISIBLE_DEVICES``). The launcher relays
    rank 0's rendezvous address to the other ranks and fails the whole worker
    when any rank fails.
    """

    def __init__(self, world_size: int, argv: Callable[[int], Sequence[str]],
                 env: Callable[[int], Mapping[str, str]] | None = None, *, timeout_s: float | None = None,
                 on_fail: Callable[[str], None] | None = None) -> None:
        if world_size < 1:
            raise UsageError(f"a rank group needs at least one rank, not {world_size}")
        self.world_size = world_size
        self._argv = argv
        self._env = env or (lambda rank: {})
        self.timeout_s = timeout_s if timeout_s is not None else _timeout_s()
        self.ranks: list[_Rank] = []
        self.phase = Phase.STARTING
        self.ports: list[int] = []
        #: The last message of each event, by rank (``resume`` forgets ``ready`` and ``rebuilt``).
        self.events: dict[str, dict[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self._failed = False
        self._stop_watch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._on_fail = on_fail or self._default_fail
        self._stop_requested = 0.0
        #: After SIGTERM, how long rank 0 gets to stop the group before every rank is killed.
        self.stop_grace_s = 30.0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        base = {k: v for k, v in os.environ.items() if k != protocol.CONTROL_DIR_ENV}
        for rank in range(self.world_size):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            env = {**base, **self._env(rank), RANK_ENV: str(rank), WORLD_ENV: str(self.world_size),
                   CHANNEL_FD_ENV: str(theirs.fileno())}
            popen = subprocess.Popen(list(self._argv(rank)), env=env, pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL)
            theirs.close()
            self.ranks.append(_Rank(rank, popen, Channel(mine)))
            log.info("started rank %d as pid %d", rank, popen.pid)
        self._watcher = threading.Thread(target=self._watch, name="warmstart-rank-watch", daemon=True)
        self._watcher.start()

    @property
    def pids(self) -> list[int]:
        return [r.popen.pid for r in self.ranks]

    def wait_ready(self, timeout: float | None = None) -> dict[str, str]:
        """Relay rendezvous until every rank reports ``ready``; rank 0's labels."""
        self.wait_event("ready", timeout=timeout)
        for r in self.ranks:  # the launcher checks too: a rank is checkpointable only without inet sockets
            check_checkpointable(r.popen.pid)
        return dict(self.events["ready"][0].get("labels") or {})

    def checkpoint_point(self, coordinator: Coordinator | None = None, *, labels: Mapping[str, str] | None = None,
                         **kwargs: Any) -> Outcome:
        """Every rank is ready: run the launcher's own checkpoint point, then resume the ranks."""
        coord = coordinator or Coordinator()
        self.phase = Phase.CHECKPOINT
        outcome = coord.checkpoint_point(labels=labels, exit_original=self._exit_original, **kwargs)
        context = coord.restore_context()
        self.resume(outcome, context)
        return outcome

    def resume(self, outcome: Outcome, context: protocol.RestoreContext | None = None) -> None:
        """Send every rank the outcome and the restore context (env, GPU map)."""
        self.phase = Phase.REBUILD if outcome is Outcome.RESTORED else Phase.STARTING
        self.timeout_s = _timeout_s()  # the restore context's env may have changed it
        for event in ("ready", "rebuilt"):
            self.events.pop(event, None)
        for r in self.ranks:
            self._send(r, cmd="resume", outcome=outcome.value,
                       env=context.env if context else {}, gpu_map=context.gpu_map if context else {},
                       snapshot_name=context.snapshot_name if context else None)

    def wait_event(self, event: str, ranks: Sequence[int] | None = None, timeout: float | None = None) -> list[dict[str, Any]]:
        """Relay rendezvous until each of ``ranks`` (default all) has reported ``event``."""
        want = list(range(self.world_size) if ranks is None else ranks)
        seen = self.events.setdefault(event, {})
        self._pump(lambda: [r for r in want if r not in seen], timeout, event)
        return [seen[r] for r in want]

    def serve_forever(self) -> int:
        """Until rank 0 exits: 0 when every rank stopped cleanly."""
        self.phase = Phase.SERVING
        leader = self.ranks[0].popen
        while (code := leader.poll()) is None:
            if self._stop_requested and time.monotonic() - self._stop_requested > self.stop_grace_s:
                log.warning("rank 0 did not stop within %g s of SIGTERM; killing the ranks", self.stop_grace_s)
                self.stop()
                return 1
            time.sleep(0.1)
        self.phase = Phase.STOPPING
        deadline = time.monotonic() + 30
        for r in self.ranks[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.popen.wait(max(0.1, deadline - time.monotonic()))
        self.stop()
        return 0 if code == 0 else 1

    def terminate(self) -> None:
        """Ask rank 0 to stop (it stops the others through the group)."""
        self.phase = Phase.STOPPING
        self._stop_requested = self._stop_requested or time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            self.ranks[0].popen.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """Kill every rank still running and reap it."""
        self._stop_watch.set()
        for r in self.ranks:
            if r.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    r.popen.kill()
        for r in self.ranks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.popen.wait(10)

    # -- failure handling --------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        with self._lock:
            if self._failed:
                return
            self._failed = True
        self.stop()
        self._on_fail(message)

    @staticmethod
    def _default_fail(message: str) -> None:
        print(f"error: {message}", file=sys.stderr, flush=True)
        logging.shutdown()
        os._exit(1)

    def _describe_exit(self, r: _Rank) -> str:
        code = r.popen.returncode
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        return f"rank {r.rank} (pid {r.popen.pid}) {how} {self.phase.value}"

    def _watch(self) -> None:
        while not self._stop_watch.wait(0.1):
            if self.phase is Phase.STOPPING:
                continue
            for r in self.ranks:
                code = r.popen.poll()
                if code is None:
                    continue
                if self.phase is Phase.SERVING and code == 0:
                    continue  # a clean stop (rank 0 stops the others); serve_forever takes it from here
                self.fail(f"{self._describe_exit(r)}; stopped the other ranks of the tensor-parallel worker")
                return

    def _exit_original(self) -> None:
        """The snapshot is taken and the original should exit: take the ranks down with us."""
        self.phase = Phase.STOPPING
        self.stop()
        logging.shutdown()
        os._exit(0)

    def _send(self, r: _Rank, **message: Any) -> None:
        try:
            r.channel.send(**message)
        except OSError:
            r.popen.poll()
            self.fail(f"{self._describe_exit(r)}; stopped the other ranks of the tensor-parallel worker")
            raise RankFailed(f"rank {r.rank} is gone") from None

    def _pump(self, missing: Callable[[], list[int]], timeout: float | None, what: str) -> None:
        """Handle rank messages until ``missing()`` is empty; a death or the timeout fails the worker."""
        deadline = None if timeout is None else time.monotonic() + timeout
        by_fd = {r.channel.fileno(): r for r in self.ranks}
        while slow := missing():
            if self._failed:
                raise RankFailed("the worker failed")
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                self.fail(f"rank(s) {', '.join(map(str, slow))} did not report {what!r} within {timeout:g} s "
                          f"{self.phase.value}; stopped the tensor-parallel worker")
                raise RankFailed(f"timed out waiting for {what}")
            readable, _, _ = select.select(list(by_fd), [], [], left)
            for fd in readable:
                r = by_fd[fd]
                try:
                    msg = r.channel.recv(0)
                except TimeoutError:
                    continue
                except (EOFError, OSError):
                    _wait_briefly(r.popen)  # its exit status makes the message
                    self.fail(f"{self._describe_exit(r)}; stopped the other ranks of the tensor-parallel worker")
                    raise RankFailed(f"rank {r.rank} is gone") from None
                while msg is not None:
                    self._handle(r, msg)
                    msg = r.channel._pop()

    def _handle(self, r: _Rank, msg: dict[str, Any]) -> None:
        event = msg.get("event")
        if event == "store":
            self.ports.append(int(msg["port"]))
            log.info("rendezvous %s at %s:%s", msg.get("generation"), msg.get("addr"), msg.get("port"))
            for other in self.ranks[1:]:
                self._send(other, cmd="rendezvous", **{k: msg[k] for k in ("generation", "addr", "port", "prefix")})
        elif event == "error":
            self.fail(f"rank {r.rank} failed {self.phase.value}: {msg.get('message')}; "
                      "stopped the other ranks of the tensor-parallel worker")
            raise RankFailed(str(msg.get("message")))
        if isinstance(event, str):
            self.events.setdefault(event, {})[r.rank] = msg


def _wait_briefly(popen: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(10)
