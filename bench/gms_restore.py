"""Weights in the GPU memory service vs inside the snapshot, on one GPU, in one run.

Measures, for one model (``--config qwen3-0.6b`` or a Qwen3-32B-shaped model with
as many layers as fit ``--gib``):

* pinned host-to-device copy bandwidth (torch, 1 GiB, the best of 5);
* the service's weight streaming rate (first fill, files in the page cache, and
  with ``--drop-caches`` again from a dropped page cache), and with
  ``--parked`` its copy-back rate from its pinned host memory tier;
* snapshot size with weights in the service vs in-process;
* restore -> first token: service with resident weights, service streaming the
  weights (evicted, page cache dropped with ``--drop-caches``), service with
  the weights parked in pinned host memory (``--parked``), the full
  snapshot (weights in-process) restored by warmstart and by the naive
  pipeline (bare ``criu restore`` + the driver's restore and unlock, then the
  worker told it runs again), and a cold start of the in-process worker.

Run as root on the GPU machine (about 4 minutes with the defaults on an H100):

    . scripts/device-env.sh && python3 bench/gms_restore.py --gib 8 --out /tmp/gms.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coldstart import first_token as coldstart_first_token
from coldstart import free_port, http_client
from naive import bare_restore, hand_over

PROMPT = {"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}
#: Qwen3-32B's shape per layer; the layer count is chosen from --gib
BIG = dict(hidden_size=5120, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
           intermediate_size=25600)  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_big(out: Path, gib: float) -> Path:
    """A Qwen3-32B-shaped model of about ``gib`` GiB: the 0.6B tokenizer, random bf16 weights."""
    import torch
    from safetensors.torch import save_file

    from warmstart.serve.modelmake import make_model

    from warmstart.serve.modelmake import CONFIGS

    make_model("tiny", out)  # for its tokenizer and config; the weights are replaced
    cfg = json.loads((out / "config.json").read_text())
    shape = {k: v for k, v in CONFIGS["qwen3-0.6b"].items() if k != "torch_dtype"}
    cfg.update(shape, dtype="bfloat16")
    vocab = cfg["vocab_size"]
    h, inter = BIG["hidden_size"], BIG["intermediate_size"]
    q, kv = BIG["num_attention_heads"] * BIG["head_dim"], BIG["num_key_value_heads"] * BIG["head_dim"]
    per_layer = 2 * (h * q + 2 * h * kv + q * h + 3 * h * inter)
    layers = max(1, round((gib * 2**30 - 2 * vocab * h) / per_layer))
    cfg.update(BIG, num_hidden_layers=layers)
    cfg.pop("layer_types", None)  # per-layer list of the tiny config; recomputed from the count
    cfg["max_window_layers"] = layers
    for f in out.glob("*.safetensors"):
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(shape, device=dev, generator=gen, dtype=torch.bfloat16) * 0.02).cpu()

    index: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rnd(vocab, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}  # noqa: E501
    n = 0

    def flush() -> None:
        nonlocal shard, n
        if shard:
            n += 1
            name = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard = {}

    for i in range(layers):
        p = f"model.layers.{i}."
        shard.update({
            p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
            p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
            p + "self_attn.q_norm.weight": torch.ones(BIG["head_dim"], dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(BIG["head_dim"], dtype=torch.bfloat16),
            p + "mlp.gate_proj.weight": rnd(inter, h), p + "mlp.up_proj.weight": rnd(inter, h),
            p + "mlp.down_proj.weight": rnd(h, inter),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        })  # fmt: skip
        if i % 4 == 3:
            flush()
    flush()
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": index}))  # fmt: skip
    return out


def h2d_bandwidth() -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8).pin_memory()
    dst = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    best = 0.0
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        best = max(best, src.numel() / (time.perf_counter() - t0) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return best


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def first_token(port: int, t0: float, timeout: float = 900) -> float:
    """Seconds from t0 to the first one-token completion of the worker on ``port``."""
    return coldstart_first_token(port, t0, {}, timeout, PROMPT)[1]


DEVICE = "cuda"


def worker_cmd(model: Path, kv: float, port: int, gms: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "warmstart", "serve", "--model", str(model), "--device", DEVICE,
           "--kv-cache-gib", str(kv), "--max-seq-len", "512", "--port", str(port)]  # fmt: skip
    return cmd + (["--weights-from-gms", str(gms)] if gms else [])


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)


def snapshot_and_restores(model: Path, work: Path, name: str, kv: float, gms: Path | None,
                          restores: list[str], on_restore) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from warmstart import protocol
    from warmstart.snapshot.checkpoint import CheckpointOptions, checkpoint
    from warmstart.snapshot.restore import RestoreRequest, restore
    from warmstart.store.local import LocalStore

    cdir = work / f"control-{name}"
    cdir.mkdir()
    wlog = open(work / f"{name}.log", "ab")
    t0 = time.perf_counter()
    p = subprocess.Popen(worker_cmd(model, kv, 0, gms), stdout=wlog, stderr=subprocess.STDOUT,
                         env={**os.environ, protocol.CONTROL_DIR_ENV: str(cdir)}, start_new_session=True)  # fmt: skip
    ready = cdir / protocol.READY_FOR_SNAPSHOT
    while not ready.exists():
        if p.poll() is not None:
            raise SystemExit(f"{name} worker exited; see {work / (name + '.log')}")
        time.sleep(0.05)
    out: dict[str, float] = {"to_checkpoint_point_s": time.perf_counter() - t0}
    info = protocol.read_model(ready, protocol.ReadyInfo)
    store = LocalStore(work / "store")
    t1 = time.perf_counter()
    taken = checkpoint(p.pid, store=store, name=name,
                       options=CheckpointOptions(labels={"checkpoint_id": info.checkpoint_id or "", **info.labels}))
    p.wait()
    out["checkpoint_s"] = time.perf_counter() - t1
    out["snapshot_bytes"] = taken.manifest.total_bytes
    out["gpu_state_bytes"] = sum(g.device_memory_bytes for g in taken.manifest.gpus)
    for label in restores:
        on_restore(label)
        for stale in (protocol.RESTORE_COMPLETE, protocol.RESTORE_CONTEXT):  # of the previous restore
            (cdir / stale).unlink(missing_ok=True)
        port = free_port()
        env = {"WARMSTART_PORT": str(port)}
        if trace := os.environ.get("GMS_BENCH_TRACE"):  # page-server traces (bench/fill_trace.py)
            os.environ["WARMSTART_PAGES_TRACE"] = f"{trace}/{name}-{label}.json"
        t2 = time.perf_counter()
        if label == "bare":  # the naive pipeline on the same snapshot
            _, pid = bare_restore(store, name, DEVICE == "cuda")
            hand_over(store, name, cdir, env)
            out[f"{label}_restore_call_s"] = time.perf_counter() - t2
        else:
            r = restore(name, store=store, request=RestoreRequest(control_dir=cdir, env=env))
            out[f"{label}_restore_call_s"] = time.perf_counter() - t2
            out[f"{label}_phases"] = {ph.name.strip(): round(ph.seconds, 3) for ph in r.timer.phases}  # type: ignore[assignment]
            log(f"{name} {label}: restore phases {out[f'{label}_phases']}")
            pid = r.pid
        out[f"{label}_first_token_s"] = first_token(port, t2)
        kill(pid)
        log(f"{name} {label}: restore -> first token {out[f'{label}_first_token_s']:.2f} s")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="big", help="qwen3-0.6b, or big (Qwen3-32B-shaped, sized by --gib)")
    ap.add_argument("--gib", type=float, default=8.0, help="weights size for --config big")
    ap.add_argument("--model", type=Path, default=None, help="use this model directory instead of making one")
    ap.add_argument("--kv-gib", type=float, default=1.0)
    ap.add_argument("--drop-caches", action="store_true", help="also measure streaming from a dropped page cache")
    ap.add_argument("--parked", action="store_true",
                    help="also restore with the weights parked in the service's pinned host memory")
    ap.add_argument("--skip-inprocess", action="store_true", help="skip the full snapshot and the cold start")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--trace", type=Path, default=None, help="write each restore's page-server trace here")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to smoke-test this script (memfd service)")
    args = ap.parse_args()
    http_client()  # made before anything is timed
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        os.environ["GMS_BENCH_TRACE"] = str(args.trace)
    global DEVICE
    DEVICE = args.device

    work = args.work or Path(tempfile.mkdtemp(prefix="gms-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, object] = {"config": args.config, "gib": args.gib}
    t = time.perf_counter()
    if args.model:
        model = args.model
    elif args.config == "big":
        model = make_big(work / "model", args.gib)
    else:
        from warmstart.serve.modelmake import make_model

        model = make_model(args.config, work / "model")
    from warmstart.gms.layout import read_layout

    weights = read_layout(model).total_bytes
    res["weights_bytes"] = weights
    log(f"model {model}: {weights / 1e9:.2f} GB of weights (made in {time.perf_counter() - t:.1f} s)")
    res["h2d_pinned_gb_s"] = h2d_bandwidth() if DEVICE == "cuda" else None
    log(f"pinned host->device: {res['h2d_pinned_gb_s']} GB/s")

    from warmstart.gms.client import evict, status

    sock = work / "gms.sock"
    where = ["--gpu", "0"] if DEVICE == "cuda" else ["--memfd"]
    svc = subprocess.Popen([sys.executable, "-m", "warmstart", "gms", "serve", *where, "--socket", str(sock)],
                           stdout=subprocess.DEVNULL, stderr=open(work / "gms.log", "ab"), start_new_session=True)  # fmt: skip
    try:
        while not sock.exists():
            if svc.poll() is not None:
                raise SystemExit(f"the service exited; see {work / 'gms.log'}")
            time.sleep(0.05)

        def fill_rate() -> float:
            entries = [e for e in status(str(sock)).entries if e.state == "ready"]
            return entries[-1].fill_gb_per_s or 0.0 if entries else 0.0

        def gms_restore(label: str) -> None:
            if label == "resident":
                res["first_fill_gb_s"] = fill_rate()  # the cold start's fill, files in the page cache
            if label == "parked":
                # the streamed restore's fill, then the weights parked in the service's pinned host memory
                res["stream_gb_s_page_cache" if not args.drop_caches else "stream_gb_s_dropped_cache"] = fill_rate()
                deadline = time.monotonic() + 60
                while not evict(str(sock), timeout=600, keep_host=True):  # pins and copies the weights
                    if time.monotonic() > deadline:
                        raise SystemExit("the service kept the weights in use")
                    time.sleep(0.05)
            if label == "streamed":
                # restore with nothing resident: the service streams while CRIU restores
                deadline = time.monotonic() + 60
                while not evict(str(sock)):
                    if time.monotonic() > deadline:
                        raise SystemExit("the service kept the weights in use")
                    time.sleep(0.05)
                if args.drop_caches:
                    drop_caches()

        labels = ["resident", "streamed"] + (["parked"] if args.parked else [])
        r = snapshot_and_restores(model, work, "gms", args.kv_gib, sock, labels, gms_restore)
        res["gms"] = r
        if args.parked:
            res["unpark_gb_s"] = fill_rate()
            log(f"unparked from pinned host memory at {fill_rate():.1f} GB/s")
        else:
            res["stream_gb_s_page_cache" if not args.drop_caches else "stream_gb_s_dropped_cache"] = fill_rate()
        stream = res.get("stream_gb_s_dropped_cache") or res.get("stream_gb_s_page_cache") or 0.0
        log(f"gms snapshot {r['snapshot_bytes'] / 1e9:.2f} GB; streaming {stream:.1f} GB/s")
        evict(str(sock))
    finally:
        svc.terminate()
        svc.wait(60)

    if not args.skip_inprocess:
        res["inprocess"] = snapshot_and_restores(model, work, "inproc", args.kv_gib, None, ["full", "bare"],
                                                 lambda _l: None)  # fmt: skip
        port = free_port()
        t0 = time.perf_counter()
        p = subprocess.Popen(worker_cmd(model, args.kv_gib, port, None), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            res["cold_first_token_s"] = first_token(port, t0)
        finally:
            kill(p.pid)
        log(f"cold start -> first token {res['cold_first_token_s']:.2f} s")

    g = res["gms"]
    summary = {
        "weights_gb": weights / 1e9,
        "snapshot_gb_gms": g["snapshot_bytes"] / 1e9,  # type: ignore[index]
        "gms_resident_first_token_s": g["resident_first_token_s"],  # type: ignore[index]
        "gms_streamed_first_token_s": g["streamed_first_token_s"],  # type: ignore[index]
        "h2d_pinned_gb_s": res["h2d_pinned_gb_s"],
    }
    stream = res.get("stream_gb_s_dropped_cache") or res.get("stream_gb_s_page_cache")
    summary["stream_gb_s"] = stream
    if res["h2d_pinned_gb_s"]:
        summary["stream_vs_h2d"] = (stream or 0) / res["h2d_pinned_gb_s"]  # type: ignore[operator]
    if args.parked:
        summary["gms_parked_first_token_s"] = g["parked_first_token_s"]  # type: ignore[index]
        summary["unpark_gb_s"] = res["unpark_gb_s"]
        if res["h2d_pinned_gb_s"]:
            summary["unpark_vs_h2d"] = res["unpark_gb_s"] / res["h2d_pinned_gb_s"]  # type: ignore[operator]
    if "inprocess" in res:
        i = res["inprocess"]
        summary["snapshot_gb_inprocess"] = i["snapshot_bytes"] / 1e9  # type: ignore[index]
        summary["full_first_token_s"] = i["full_first_token_s"]  # type: ignore[index]
        summary["naive_first_token_s"] = i["bare_first_token_s"]  # type: ignore[index]
        summary["cold_first_token_s"] = res["cold_first_token_s"]
        summary["speedup_resident_vs_naive"] = i["bare_first_token_s"] / g["resident_first_token_s"]  # type: ignore[index,operator]
        summary["speedup_resident_vs_full"] = i["full_first_token_s"] / g["resident_first_token_s"]  # type: ignore[index,operator]
        summary["speedup_resident_vs_cold"] = res["cold_first_token_s"] / g["resident_first_token_s"]  # type: ignore[index,operator]
    res["summary"] = summary
    text = json.dumps(res, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
