"""Benchmark: which diffusers ``UNet2DModel`` size the MNIST base model can afford on this machine, measured in ONE
run: the time of one training step (Adam, batch 128) in float32 and under bfloat16 autocast, and of one forward pass
of 256 images (sampling), for the candidate image sizes and channel widths.

    python scripts/bench_mnist_unet.py                        # -> outputs/bench/mnist_unet.json
    python scripts/bench_mnist_unet.py --device cuda --paper  # the paper-scale net alone on a GPU -> mnist_unet_cuda.json

Read: ``ratio_*`` is each candidate's time over the CI choice's (16x16, channels (16, 32)) in the same run; the CI
scale needs pretraining (4000 steps) in minutes and sampling of thousands of images (the SNIS reference), the paper
scale (28x28) is for a GPU. Each time is the minimum over repetitions after a warm-up (a shared machine only ever
adds time). On a GPU each timed call ends with ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from iif.base_models.unet import build_unet

CANDIDATES = [  # (image size, block_out_channels, layers_per_block)
    (16, (16, 32), 1),  # the CI choice
    (16, (32, 64), 1),
    (28, (16, 32, 32), 1),
    (28, (32, 64, 64), 1),
    (28, (32, 64, 64), 2),  # the paper-scale choice
]


def _best(fn, device: torch.device, reps: int = 4) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def bench(size: int, channels, layers: int, device: torch.device, batch: int = 128) -> dict:
    torch.manual_seed(0)
    net = build_unet((1, size, size), channels, layers, 8).to(device)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, t = torch.randn(batch, 1, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
    reps = 4 if device.type == "cpu" else 50

    def step(bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = (net(x, t).sample.float() - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    xs, ts = torch.randn(256, 1, size, size, device=device), torch.full((256,), 500, device=device)

    def forward(bf16: bool):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            net(xs, ts)

    return {"size": size, "channels": list(channels), "layers_per_block": layers,
            "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            **{name: _best(fn, device, reps) for name, fn in [
                ("train_step_s_fp32", lambda: step(False)), ("train_step_s_bf16", lambda: step(True)),
                ("forward256_s_fp32", lambda: forward(False)), ("forward256_s_bf16", lambda: forward(True))]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--paper", action="store_true", help="only the paper-scale net and the CI choice")
    args = parser.parse_args()
    device = torch.device(args.device)
    candidates = [CANDIDATES[0], CANDIDATES[-1]] if args.paper else CANDIDATES
    rows = [bench(*c, device=device) for c in candidates]
    ref = rows[0]
    for r in rows:
        for k in ("train_step_s_fp32", "forward256_s_fp32"):
            r[f"ratio_{k}"] = r[k] / ref[k]
    out = Path("outputs/bench/mnist_unet.json" if device.type == "cpu" else f"outputs/bench/mnist_unet_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    out.write_text(json.dumps({"device": str(device), "gpu": gpu, "threads": torch.get_num_threads(),
                               "cpus": os.cpu_count(), "rows": rows}, indent=1))
    print(f"{'size':>4} {'channels':>14} {'L':>2} {'params':>7} {'step fp32':>10} {'step bf16':>10} "
          f"{'fwd256 fp32':>12} {'fwd256 bf16':>12} {'step ratio':>10}")
    for r in rows:
        print(f"{r['size']:>4} {str(r['channels']):>14} {r['layers_per_block']:>2} {r['params_m']:>6.2f}M "
              f"{r['train_step_s_fp32']:>10.3f} {r['train_step_s_bf16']:>10.3f} {r['forward256_s_fp32']:>12.3f} "
              f"{r['forward256_s_bf16']:>12.3f} {r['ratio_train_step_s_fp32']:>10.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
