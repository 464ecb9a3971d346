"""``warmstart serve --tensor-parallel N``: the reference worker as N rank processes.

The process the user starts is the **launcher**: it imports no torch, opens no
inet socket, and starts N ranks (``python -m warmstart.serve.tp``) as its
children, one GPU each (``cuda:N`` per rank from ``--gpus``, default 0..N-1) or
all on CPU with gloo. Rank 0 runs the scheduler and
serves HTTP; the others follow its forward passes (`warmstart.serve.tp_engine`).

With a control dir the ranks meet at the checkpoint point of
`warmstart.worker.distributed`: they tear their process group down and report
ready; the launcher writes ``ready-for-snapshot`` with its own pid (the root
of the tree to checkpoint) and, after a restore, hands the restore context to
every rank, which rebuild the group with a fresh rendezvous before phase 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

from warmstart import protocol
from warmstart.errors import UsageError, WarmstartError
from warmstart.worker.distributed import RankFailed, RankGroup, RankLauncher, die_with_parent
from warmstart.worker.preflight import apply_checkpoint_env

log = logging.getLogger("warmstart.serve.tp")

#: Set by the launcher for its ranks: "1" when a control dir asks for a checkpoint point.
CHECKPOINT_ENV = "WARMSTART_TP_CHECKPOINT"
#: ``all`` (default): every rank sees every GPU and uses ``cuda:N`` (``WARMSTART_TP_DEVICE``),
#: so a restore can move it onto another GPU; ``one``: each rank sees only its GPU
#: (``CUDA_VISIBLE_DEVICES``) -- restores onto other GPUs then fail (the target is invisible).
VISIBLE_ENV = "WARMSTART_TP_VISIBLE"
DEVICE_ENV = "WARMSTART_TP_DEVICE"


def _strip_tp(argv: list[str]) -> list[str]:
    """The launcher's argv without --tensor-parallel / --gpus (the ranks get the rest)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--tensor-parallel", "--gpus"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


def _gpu_list(args: argparse.Namespace, world: int) -> list[str] | None:
    """One GPU index per rank (indices into the launcher's visible GPUs); None on CPU."""
    if args.device == "cpu":
        return None
    if args.gpus:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    else:
        gpus = [str(i) for i in range(world)]
    if len(gpus) < world:
        raise UsageError(
            f"--tensor-parallel {world} needs {world} GPUs, {len(gpus)} given ({','.join(gpus) or 'none'})",
            hint="pass --gpus with one GPU index per rank, or --device cpu",
        )
    if not all(g.isdigit() for g in gpus):
        raise UsageError(f"--gpus {','.join(gpus)}: give GPU indices (e.g. 0,1), not UUIDs",
                         hint="indices count the GPUs this process sees (CUDA_VISIBLE_DEVICES)")
    if len(set(gpus[:world])) < world:
        raise UsageError(f"--gpus {','.join(gpus[:world])} names a GPU twice", hint="one GPU per rank")
    return gpus[:world]


def launch(args: argparse.Namespace, argv: list[str]) -> int:
    """The launcher's life: start ranks, the checkpoint point, supervise until rank 0 stops."""
    world = args.tensor_parallel
    if world < 2:
        raise UsageError(f"--tensor-parallel {world}: the launcher is for 2 or more ranks")
    control = args.control_dir or os.environ.get(protocol.CONTROL_DIR_ENV)
    if control:
        if not Path(control).is_dir():
            raise UsageError(f"control dir {control} is not a directory", hint="create it first")
        apply_checkpoint_env()  # inherited by the ranks, before anything initialises NCCL/Gloo
    gpus = _gpu_list(args, world)
    rank_argv = [sys.executable, "-m", "warmstart.serve.tp", *_strip_tp(argv)]

    visible = os.environ.get(VISIBLE_ENV, "all")
    if visible not in ("one", "all"):
        raise UsageError(f"{VISIBLE_ENV}={visible!r}", hint="use all (default) or one")

    def rank_env(rank: int) -> dict[str, str]:
        env = {CHECKPOINT_ENV: "1" if control else "0"}
        if gpus is not None and visible == "one":
            seen = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
            index = int(gpus[rank])
            env["CUDA_VISIBLE_DEVICES"] = seen[index] if index < len(seen) else gpus[rank]
        elif gpus is not None:
            env[DEVICE_ENV] = f"cuda:{gpus[rank]}"
        return env

    launcher = RankLauncher(world, lambda rank: rank_argv, rank_env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: launcher.terminate())
    launcher.start()
    try:
        if control:
            labels = launcher.wait_ready()
            labels["tensor_parallel"] = str(world)
            outcome = launcher.checkpoint_point(
                labels=labels, control_dir=control, timeout=args.checkpoint_timeout
            )
            launcher.wait_event("rebuilt", timeout=launcher.timeout_s)
            log.info("tensor-parallel worker rebuilt after %s (rendezvous ports %s)", outcome.value, launcher.ports)
        launcher.wait_event("serving", ranks=[0])
    except RankFailed:
        return 1  # fail() has printed the reason and stopped the ranks
    except BaseException:
        launcher.stop()
        raise
    return launcher.serve_forever()


# ---- one rank -----------------------------------------------------------------------------------


def _rank_device(name: str) -> str:
    import torch

    if name == "cpu":
        return "cpu"
    if name == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        name = "cuda"
    if name.startswith("cuda"):
        mine = os.environ.get(DEVICE_ENV)
        if mine:
            torch.cuda.set_device(torch.device(mine))
            return mine
        return "cuda:0"  # this rank's one visible GPU
    raise UsageError(f"unsupported device {name!r} for tensor parallelism", hint="use auto, cpu or cuda")


def rank_main(argv: list[str]) -> int:
    from warmstart.serve.__main__ import build_parser

    args = build_parser().parse_args(argv)
    rank = os.environ.get("WARMSTART_TP_RANK", "?")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    die_with_parent()
    # ^C (and a SIGTERM to the whole process group) is for the launcher: it stops rank 0, and
    # rank 0 stops the others through the group. Rank 0's phase 2 handles SIGTERM itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if rank != "0":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    group: RankGroup | None = None
    try:
        device = _rank_device(args.device)
        group = RankGroup.from_env(backend="nccl" if device.startswith("cuda") else "gloo", device=device)
        return _run_rank(group, args, device)
    except WarmstartError as exc:
        _report_failure(group, str(exc))
        print(f"error: rank {rank}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - one line to the launcher, the traceback to the log
        log.exception("rank %s failed", rank)
        _report_failure(group, f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}")
        return 1


def _report_failure(group: RankGroup | None, message: str) -> None:
    if group is None:
        return
    try:
        group.report("error", message=message)
    except OSError:
        pass


def _run_rank(group: RankGroup, args: argparse.Namespace, device: str) -> int:
    from warmstart.serve.engine import EngineConfig
    from warmstart.serve.main import prepare_http, run_http
    from warmstart.serve.tp_engine import TPEngine

    # Weights load before the first rendezvous: transformers' from_pretrained keeps a reference
    # to an initialised process group (seen with transformers 5.24), and with it the group's
    # sockets, which would make the rank uncheckpointable.
    engine = TPEngine(
        EngineConfig(model_dir=args.model, device=device, kv_cache_gib=args.kv_cache_gib,
                     kv_cache_fraction=args.kv_cache_fraction, max_seq_len=args.max_seq_len,
                     max_num_seqs=args.max_num_seqs, cuda_graphs=not args.no_cuda_graphs,
                     served_name=args.served_name),
        rank=group.rank, world_size=group.world_size,
    )
    t0 = time.perf_counter()
    group.rendezvous()
    engine.startup["rendezvous_s"] = time.perf_counter() - t0
    engine.tp_group = group  # type: ignore[attr-defined]  # for /ready
    group.on_restore(lambda resume: engine.follow_gpu_map(resume.gpu_map))
    checkpoint = os.environ.get(CHECKPOINT_ENV) == "1"
    try:
        if engine.leader:
            t0 = time.perf_counter()
            engine.warmup()
            engine.startup["warmup_s"] = time.perf_counter() - t0
        elif engine.follow() == "stop":
            return 0
        # the leader imports and builds its HTTP app now, so a restored rank listens at once
        app = prepare_http(engine, restored=lambda: group.restored, warm=False) if engine.leader else None
        if checkpoint:
            engine.quiesce()
            group.checkpoint_point(
                release=engine.release_memory,
                reacquire=engine.reacquire_memory,
                rebuilt=engine.rebuilt,
                labels={
                    "engine": "warmstart.serve",
                    "model": engine.model_name,
                    "model_dir": str(engine.model_dir),
                    "device": str(engine.device),
                    "kv_cache_bytes": str(engine.store.nbytes),
                    "cuda_graphs": engine.graph_status,
                },
            )
            engine.startup["rebuild_s"] = group.rebuild_s
        if not engine.leader:
            engine.follow()  # until the leader says stop
            return 0
        group.report("serving")
        run_http(engine, host=args.host, port=args.port, register_dir=args.register_dir,
                 log_level=args.log_level, restored=lambda: group.restored, app=app)
        return 0
    finally:
        engine.close()  # the leader tells the followers to stop
        _destroy_group()


def _destroy_group() -> None:
    """Leave a gloo group before exiting. An NCCL group is left to ``os._exit``: on 2 x H200,
    destroying it at shutdown (and the interpreter's own teardown) hung rank 0."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "gloo":
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - exiting anyway
            log.warning("destroying the process group failed: %s", exc)


if __name__ == "__main__":
    code = rank_main(sys.argv[1:])
    # Skip interpreter teardown: CUDA/NCCL destructors at exit can hang a rank that is done.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    logging.shutdown()
    os._exit(code)
