"""Child process for the GPU checkpoint tests: holds CUDA tensors and a
ReservedRegion, answers one command per stdin line with one stdout line."""

from __future__ import annotations

import argparse
import hashlib
import sys

import torch

from warmstart.gpu.vmm import ReservedRegion


def digest(t: torch.Tensor) -> str:
    torch.cuda.synchronize()
    raw = t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(raw).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--region-mib", type=int, default=64)
    args = ap.parse_args()

    gen = torch.Generator(device="cuda").manual_seed(1234)
    x = torch.randn(args.mib * (1 << 20) // 4, device="cuda", generator=gen)
    region = ReservedRegion(args.region_mib << 20, torch.cuda.current_device())
    region.as_tensor(torch.int32).copy_(
        torch.arange(region.size // 4, device="cuda", dtype=torch.int32)
    )
    torch.cuda.synchronize()
    print("ready", flush=True)

    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "sum":
            out = digest(x)
        elif cmd == "compute":  # new GPU work after restore
            m = x[: 1 << 20].view(1024, 1024)
            out = f"{float((m @ m).abs().sum().item()):.6e}"
        elif cmd == "vsum":
            out = digest(region.as_tensor())
        elif cmd == "expect":  # region holds the int32 pattern k, k+1, ...
            t = region.as_tensor(torch.int32)
            want = torch.arange(t.numel(), device="cuda", dtype=torch.int32) + int(rest[0])
            out = "ok" if bool(torch.equal(t, want)) else "mismatch"
        elif cmd == "fill":
            t = region.as_tensor(torch.int32)
            t.copy_(torch.arange(t.numel(), device="cuda", dtype=torch.int32) + int(rest[0]))
            torch.cuda.synchronize()
            out = "ok"
        elif cmd == "release":
            region.release()
            out = "ok"
        elif cmd == "map":
            region.map()
            out = hex(region.address)
        elif cmd == "addr":
            out = hex(region.address)
        elif cmd == "quit":
            region.close()
            print("bye", flush=True)
            return
        else:
            out = f"unknown {cmd}"
        print(out, flush=True)


if __name__ == "__main__":
    main()
