"""Benchmark: the memory of decoding a round's latents through Stable Diffusion 1.5's VAE, with and without
``base_model.vae_slicing``, measured in one run of this script (CPU here; ``--device cuda`` on a GPU, where the
figure is ``torch.cuda.max_memory_allocated``).

    python scripts/bench_vae_decode.py                          # -> outputs/bench/vae_decode.json
    python scripts/bench_vae_decode.py --device cuda --dtype bfloat16 --batches 1 8 32

An IIF round decodes all its samples for the reward (32 at table2's paper scale) under ``no_grad``. The VAE here is
``AutoencoderKL`` with SD 1.5's architecture (channels 128-256-512-512, two layers a block: 84 M parameters) and
random weights (memory does not depend on their values), decoding 64x64 latents to 512 px. Each (batch, slicing) runs
in a fresh subprocess (hidden flag ``--_child``): ``increase = peak after - resident before`` in MB (CPU: VmHWM after
``/proc/self/clear_refs``). Read: without slicing the increase grows with the batch; with it, it stays at one image's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sd15_vae():
    """SD 1.5's VAE architecture (diffusers' ``AutoencoderKL`` config of ``stable-diffusion-v1-5``), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                         layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)


def child(spec: dict) -> dict:
    from bench_sd_memory import resident_mb

    from iif.probes import peak_mem_mb, reset_peak_mem

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    torch.manual_seed(0)
    vae = sd15_vae().to(device, dtype).eval()
    if spec["slicing"]:
        vae.enable_slicing()
    z = torch.randn(spec["batch"], 4, 64, 64, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = resident_mb(device)
    reset_peak_mem()
    t0 = time.perf_counter()
    with torch.no_grad():
        x = vae.decode(z).sample
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {**spec, "shape": list(x.shape), "decode_s": time.perf_counter() - t0,
            "increase_mb": peak_mem_mb() - before, "resident_before_mb": before,
            "params_m": sum(p.numel() for p in vae.parameters()) / 1e6}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 4])
    p.add_argument("--out", default="outputs/bench/vae_decode.json")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    rows = []
    for batch in args.batches:
        for slicing in ([False] if batch == 1 else [False, True]):
            spec = {"device": args.device, "dtype": args.dtype, "batch": batch, "slicing": slicing}
            proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True,
                                  text=True, check=True, cwd=Path(__file__).parent)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"batch {batch:3d} slicing {str(slicing):5s}: +{row['increase_mb']:7.0f} MB  "
                  f"({row['decode_s']:.1f} s, {row['params_m']:.0f} M parameters)", flush=True)
    one = rows[0]["increase_mb"]
    for row in rows:
        row["ratio_to_one_image"] = row["increase_mb"] / one
    print("ratios to one image's decode (one run): " + "; ".join(
        f"batch {r['batch']}{' sliced' if r['slicing'] else ''} {r['ratio_to_one_image']:.2f}" for r in rows[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
