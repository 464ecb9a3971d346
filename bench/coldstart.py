"""Cold start vs restore of the reference worker, to first token, in one run.

For each KV cache size: (1) cold — start ``warmstart serve``, wait for /ready,
time the first greedy completion; (2) warm — ``warmstart run --checkpoint-as``
(cold start to the checkpoint point, snapshot), restore onto a new port, wait
for /ready, time the first completion. Reports seconds per phase, the
cold/restore ratio, snapshot size per KV size, and whether both completions
are identical. Run as root:

    python bench/coldstart.py --model DIR --device cuda --kv-gib 1 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPT = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_client: httpx.Client | None = None


def http_client() -> httpx.Client:
    """One client for every probe, made before anything is timed: a client of its own per
    probe (``httpx.get``) spent milliseconds building an SSL context inside the timing,
    which a load balancer's long-lived client does not."""
    global _client
    if _client is None:
        _client = httpx.Client(timeout=300)
    return _client


def first_token(
    port: int, t0: float, startup: dict[str, float], timeout: float = 600, prompt: dict | None = None
) -> tuple[float, float, str]:
    """(seconds to /ready, seconds to the first completion, its text), from t0.

    ``startup`` receives the worker's own start-up phases from /ready.
    """
    client = http_client()
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"worker on {port} never became ready")
        time.sleep(0.002)
    ready = time.perf_counter() - t0
    r = client.post(f"http://127.0.0.1:{port}/v1/completions", json=prompt or PROMPT, timeout=300).json()
    took = time.perf_counter() - t0
    startup.clear()
    startup.update(client.get(f"http://127.0.0.1:{port}/ready", timeout=5).json().get("startup", {}))
    return ready, took, r["choices"][0]["text"]


def serve_cmd(model: str, device: str, kv: float, port: int) -> list[str]:
    return [sys.executable, "-m", "warmstart", "serve", "--model", model, "--device", device,
            "--kv-cache-gib", str(kv), "--port", str(port)]  # fmt: skip


def cold(model: str, device: str, kv: float) -> dict[str, float | str]:
    port = free_port()
    t0 = time.perf_counter()
    p = subprocess.Popen(serve_cmd(model, device, kv, port), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    startup: dict[str, float] = {}
    try:
        ready, ttft, text = first_token(port, t0, startup)
    finally:
        p.kill()
        p.wait()
    known = sum(startup.values())
    return {**startup, "phase2_and_rest_s": ready - known, "ready_s": ready,
            "first_token_only_s": ttft - ready, "first_token_s": ttft, "text": text}  # fmt: skip


def warm(model: str, device: str, kv: float, store: Path) -> dict[str, float | str]:
    port, new_port = free_port(), free_port()
    name = f"bench-kv{kv:g}".replace(".", "_")
    out = subprocess.run(
        [sys.executable, "-m", "warmstart", "run", "--checkpoint-as", name, "--store", str(store),
         "--env", f"WARMSTART_PORT={new_port}", "--json", "--", *serve_cmd(model, device, kv, port)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    t_restored = time.perf_counter()
    run = json.loads(out.stdout)
    try:
        ready, ttft, text = first_token(new_port, t_restored, {})
    finally:
        subprocess.run(["kill", "-9", str(run["pid"])], check=False)
    phases = {p["name"].strip(): p["seconds"] for p in run["restore"]}
    return {
        "cold_to_checkpoint_point_s": run["cold_to_checkpoint_point_s"],
        "snapshot_bytes": run["snapshot_bytes"],
        "restore_s": run["restore_s"],
        "criu_restore_s": phases.get("criu-restore", 0.0),
        "gpu_restore_s": phases.get("gpu-restore", 0.0),
        "restored_to_ready_s": ready,
        "first_token_only_s": ttft - ready,
        "restore_to_first_token_s": run["restore_s"] + ttft,
        "text": text,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--kv-gib", type=float, nargs="+", default=[1.0])
    args = ap.parse_args()
    http_client()  # made before anything is timed
    rows = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as d:
        for kv in args.kv_gib:
            c = cold(args.model, args.device, kv)
            w = warm(args.model, args.device, kv, Path(d) / "store")
            rows.append({"kv_gib": kv, "cold": c, "warm": w,
                         "ratio": c["first_token_s"] / w["restore_to_first_token_s"],
                         "same_output": c["text"] == w["text"]})  # fmt: skip
    print(json.dumps(rows, indent=2))
    for r in rows:
        c, w = r["cold"], r["warm"]
        cold_phases = ["imports_s", "weights_load_s", "kv_alloc_s", "warmup_s", "phase2_and_rest_s",
                       "first_token_only_s"]  # fmt: skip
        warm_phases = ["criu_restore_s", "gpu_restore_s", "restored_to_ready_s", "first_token_only_s"]
        print(f"KV {r['kv_gib']:g} GiB  cold: " + ", ".join(f"{k[:-2]} {c.get(k, 0):.2f}" for k in cold_phases))
        print(f"KV {r['kv_gib']:g} GiB  restore: " + ", ".join(f"{k[:-2]} {w.get(k, 0):.2f}" for k in warm_phases))
    print(f"{'KV GiB':>6} {'cold→1st tok':>12} {'restore→1st tok':>15} {'ratio':>6} "
          f"{'criu':>6} {'gpu':>6} {'snapshot GB':>11} {'same':>5}")  # fmt: skip
    for r in rows:
        c, w = r["cold"], r["warm"]
        print(f"{r['kv_gib']:>6g} {c['first_token_s']:>12.2f} {w['restore_to_first_token_s']:>15.2f} "
              f"{r['ratio']:>6.1f} {w['criu_restore_s']:>6.2f} {w['gpu_restore_s']:>6.2f} "
              f"{w['snapshot_bytes'] / 1e9:>11.2f} {str(r['same_output']):>5}")  # fmt: skip


if __name__ == "__main__":
    main()
