"""``python -m warmstart.serve --model DIR [...]``: the worker without the warmstart CLI."""

from __future__ import annotations

import argparse
import logging
import sys

from warmstart.errors import UsageError, WarmstartError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m warmstart.serve", description=__doc__)
    p.add_argument("--model", required=True, help="local transformers model directory (safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--kv-cache-gib", type=float, default=None)
    p.add_argument("--kv-cache-fraction", type=float, default=0.5, help="of free memory, without --kv-cache-gib")
    p.add_argument("--max-seq-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--served-name", default=None)
    p.add_argument("--control-dir", default=None, help="default: $SNAPSHOT_CONTROL_DIR")
    p.add_argument("--register-dir", default=None, help="FileRegistrar directory")
    p.add_argument("--checkpoint-timeout", type=float, default=None)
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--weights-from-gms", nargs="?", const="auto", default=None, metavar="SOCKET",
        help="map the weights from the node's GPU memory service (default socket: "
        "/run/warmstart/gms-<gpu>.sock, gms-cpu.sock on CPU) instead of loading them",
    )
    p.add_argument("--tensor-parallel", type=int, default=1, help="ranks (one GPU each); rank 0 serves HTTP")
    p.add_argument("--gpus", default=None, help="with --tensor-parallel: one GPU per rank, e.g. 0,1")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from warmstart.serve.main import serve

    try:
        if args.tensor_parallel != 1:
            if args.weights_from_gms:
                raise UsageError(
                    "--weights-from-gms does not work with --tensor-parallel yet",
                    hint="drop one of them (docs/gms.md, docs/multi-gpu.md)",
                )
            from warmstart.serve.tp import launch

            return launch(args, list(sys.argv[1:] if argv is None else argv))
        serve(
            args.model,
            host=args.host,
            port=args.port,
            kv_cache_gib=args.kv_cache_gib,
            device=args.device,
            control_dir=args.control_dir,
            kv_cache_fraction=args.kv_cache_fraction,
            max_seq_len=args.max_seq_len,
            max_num_seqs=args.max_num_seqs,
            cuda_graphs=not args.no_cuda_graphs,
            served_name=args.served_name,
            register_dir=args.register_dir,
            checkpoint_timeout=args.checkpoint_timeout,
            log_level=args.log_level,
            weights_from_gms=args.weights_from_gms,
        )
    except WarmstartError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
