"""Benchmark: the memory options of the text-to-image bases at Stable Diffusion 1.5's real size, measured in one run
of this script (CPU here; ``--device cuda`` on a GPU, where the figure is ``torch.cuda.max_memory_allocated``).

    python scripts/bench_sd_memory.py                       # -> outputs/bench/sd_memory.json
    python scripts/bench_sd_memory.py --device cuda --latent 64 --batch 4

SD 1.5's weights cannot be downloaded here, so the script writes a local folder in the diffusers layout holding a
**random-weight UNet of SD 1.5's exact architecture** (``UNet2DConditionModel`` with SD 1.5's config: 860 M
parameters, cross-attention width 768), a one-layer CLIP text encoder of width 768 and a tiny VAE (neither is on the
measured path), and loads it through ``base_model.pretrained=<folder>``: the real loading code. Memory does not
depend on the weights' values.

Each (configuration, measurement) runs in a fresh subprocess (hidden flag ``--_child``): the model is built, the
peak counter reset, the step run once, and ``increase = peak after - resident before`` (MB; CPU: VmHWM after
``/proc/self/clear_refs``; no warm-up: memory a warm-up freed would stay in the process and hide the peak). The
two measurements:

* ``train``: one IIF-LoRA loss step (``cfg_in_loss=false``: the frozen UNet without a graph, the adapted UNet with
  one, backward) on ``batch`` latents: the activations a LoRA update keeps, which gradient checkpointing trades
  for recomputation;
* ``sample``: one CFG evaluation of the base on ``batch`` latents without a graph (the doubled batch, or two passes
  with ``cfg_chunk``).

Read the ratios against ``fp32``: ``bf16`` halves weights and activations, ``checkpointing`` cuts the training
activations, ``cfg_chunk`` halves the sampling activations.
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

CONFIGS = {  # name: base-model options
    "fp32": {"dtype": "float32"},
    "bf16": {"dtype": "bfloat16"},
    "bf16+checkpointing": {"dtype": "bfloat16", "gradient_checkpointing": True},
    "bf16+checkpointing+cfg_chunk": {"dtype": "bfloat16", "gradient_checkpointing": True, "cfg_chunk": True},
}


def write_sd15_shaped(folder: Path) -> None:
    """A diffusers folder: SD 1.5's UNet architecture (random weights), a width-768 one-layer CLIP text encoder with
    the suite's tiny tokenizer, a tiny VAE, SD 1.5's scheduler config."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from iif.base_models.stable_diffusion import SD_SCHEDULE, tiny_tokenizer

    if (folder / "done").exists():
        return
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD 1.5's config
    unet.save_pretrained(folder / "unet")
    del unet
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  norm_num_groups=32, sample_size=16).save_pretrained(folder / "vae")
    tok = tiny_tokenizer()
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=1024, num_hidden_layers=1,
                                 num_attention_heads=12, max_position_embeddings=tok.model_max_length,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)).save_pretrained(folder / "text_encoder")
    tok.save_pretrained(folder / "tokenizer")
    DDPMScheduler(**SD_SCHEDULE).save_pretrained(folder / "scheduler")
    (folder / "done").write_text("ok")


def peak_mb() -> float:
    from iif.probes import peak_mem_mb

    return peak_mem_mb()


def resident_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2 ** 20
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def child(spec: dict) -> dict:
    from iif.base_models.stable_diffusion import StableDiffusionBase
    from iif.guidance.lora import LoRAGuidance
    from iif.probes import reset_peak_mem

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    base = StableDiffusionBase(spec["folder"], ["a cat"], guidance_scale=7.5, latent_size=spec["latent"],
                               **CONFIGS[spec["config"]]).place(device)
    guidance = LoRAGuidance(base, rank=4).to(device)
    with torch.no_grad():  # weights read lazily from the file (a float32 load maps it) become resident now
        for p in base.parameters():
            p.data = p.data.clone()
    build_s = time.perf_counter() - t0
    params = [p for p in guidance.parameters() if p.requires_grad]
    b = spec["batch"]
    x0 = torch.randn(b, *base.sample_shape, device=device)
    cond = torch.zeros(b, dtype=torch.long, device=device)
    t = torch.full((b,), 0.5, device=device)

    def train_step():
        eps = torch.randn_like(x0)
        a, s = (c.float().view(-1, 1, 1, 1) for c in (base.schedule.alpha(t.double()), base.schedule.sigma(t.double())))
        xt = a * x0 + s * eps
        with base.conditional_only():
            with torch.no_grad():
                e0 = base.eps(xt, t, cond)
            h = guidance(xt, t, None, cond)
        loss = ((eps - e0 + s * h) ** 2).sum()
        grads = torch.autograd.grad(loss, params)
        return float(loss), grads

    def sample_step():
        with torch.no_grad():
            return base.eps(x0, t, cond)

    out = {"config": spec["config"], "build_s": build_s}
    name = spec["step"]
    step = {"train": train_step, "sample": sample_step}[name]
    if device.type == "cuda":
        torch.cuda.synchronize()
    before = resident_mb(device)
    reset_peak_mem()
    t1 = time.perf_counter()
    result = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    out[f"{name}_s"] = time.perf_counter() - t1
    out[f"{name}_increase_mb"] = peak_mb() - before
    out[f"{name}_resident_before_mb"] = before
    del result
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--latent", type=int, default=64, help="latent size (64: 512 px images)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--configs", nargs="*", default=list(CONFIGS))
    p.add_argument("--folder", default="outputs/bench/sd15_shaped", help="where the random SD-1.5-shaped model goes")
    p.add_argument("--out", default="outputs/bench/sd_memory.json")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return
    folder = Path(args.folder)
    write_sd15_shaped(folder)
    rows = []
    for config in args.configs:
        row = {}
        for step in ("train", "sample"):
            spec = {"device": args.device, "latent": args.latent, "batch": args.batch, "config": config,
                    "folder": str(folder), "step": step}
            proc = subprocess.run([sys.executable, __file__, "--_child", json.dumps(spec)], capture_output=True,
                                  text=True, check=True)
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows.append(row)
        print(f"{config:32s} train +{row['train_increase_mb']:8.0f} MB ({row['train_s']:.1f} s)   "
              f"sample +{row['sample_increase_mb']:8.0f} MB ({row['sample_s']:.1f} s)   "
              f"resident {row['train_resident_before_mb']:.0f} MB", flush=True)
    ref = rows[0]
    for row in rows:
        row["train_ratio"] = row["train_increase_mb"] / ref["train_increase_mb"]
        row["sample_ratio"] = row["sample_increase_mb"] / ref["sample_increase_mb"]
        row["resident_ratio"] = row["train_resident_before_mb"] / ref["train_resident_before_mb"]
    print(f"\nratios against {ref['config']} (one run): " + "; ".join(
        f"{r['config']}: train {r['train_ratio']:.2f}, sample {r['sample_ratio']:.2f}, resident {r['resident_ratio']:.2f}"
        for r in rows[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "latent": args.latent, "batch": args.batch,
                               "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
