"""Make the pretrained networks of an artifact's scale and copy them into the package (``iif/weights/``), so that a
user of that scale skips pretraining. Each shipped entry keeps its cache name (``<name>-<hash>``: the hash of its
configuration) and a ``meta.json`` that records the command, the seed and the library versions that made it.

    python scripts/ship_weights.py table1 --scale ci          # pretrains (or loads from IIF_CACHE), then copies
    python scripts/ship_weights.py table1 --scale paper -- device=cuda   # the paper scale's, pretrained on a GPU

The networks are trained as ``iif-reproduce ARTIFACT --scale SCALE --prepare-only`` would, with the shipped entries
switched off (``shipped=false``), so the copy is what this configuration trains, never an older shipped copy. The
shipped total is capped at 20 MB.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

LIMIT_MB = 20.0
SWITCHES = ["base_model.pretrain.shipped", "reward.pretrain.shipped"]  # set false: train, never copy a shipped entry


def pretrained_paths(spec, scale: str, extra: list[str]) -> tuple[list[Path], list[str]]:
    """Pretrain (or load from the cache) every network the artifact's runs share at ``scale``, per setting, with the
    shipped entries switched off; returns their cached weights files (``<cache>/<name>-<hash>/weights.pt``, each
    once) and the switches used."""
    from omegaconf import OmegaConf

    from iif import device as devices
    from iif.build import build
    from iif.config import compose
    from iif.specs import run_overrides, settings_of

    paths: list[Path] = []
    off: list[str] = []
    for overrides in settings_of(spec).values():
        common = [*run_overrides(spec, scale, [*overrides, *extra]), "logger=none"]
        cfg, _ = compose(common)
        off = [f"{key}=false" for key in SWITCHES if OmegaConf.select(cfg, key) is not None]
        cfg, _ = compose([*common, *off])
        comp = build(cfg, devices.resolve(cfg.get("device", "cpu")))  # `-- device=cuda`: pretrain on a GPU
        comp.base.prepare()
        comp.reward.prepare()
        for part in (comp.base, getattr(comp.reward, "inner", comp.reward)):
            path = part.cache_path() if hasattr(part, "cache_path") else None
            if path is not None and Path(path) not in paths:
                paths.append(Path(path))
    return paths, off


def ship(paths: list[Path], dest: Path, made_by: dict) -> list[Path]:
    """Copy each cached entry's ``weights.pt`` and ``meta.json`` (with ``made_by`` added) to ``dest/<entry>/``;
    refuses (nothing written) if the shipped total would exceed :data:`LIMIT_MB`."""
    size = sum(p.stat().st_size for p in paths) / 2**20
    if size > LIMIT_MB:
        raise SystemExit(f"ship_weights: error: {size:.1f} MB of weights is over the {LIMIT_MB:.0f} MB a package may "
                         "carry; ship a smaller scale")
    out = []
    for weights in paths:
        entry = dest / weights.parent.name
        entry.mkdir(parents=True, exist_ok=True)
        meta = json.loads((weights.parent / "meta.json").read_text())
        meta["made_by"] = made_by
        (entry / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.copyfile(weights, entry / "weights.pt.tmp")
        os.replace(entry / "weights.pt.tmp", entry / "weights.pt")  # last and atomic: a half copy is never found
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ship_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", help="folder name under experiments/, e.g. table1")
    p.add_argument("--scale", default="ci")
    p.add_argument("--dest", default=None, help="default: the package's weights folder (iif/weights)")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args, extra = p.parse_args(argv[:cut]), argv[cut + 1:]
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")  # pretraining progress

    import diffusers
    import torch

    from iif.pretrain import SHIPPED
    from iif.specs import load_spec

    spec = load_spec(args.artifact)
    if args.scale not in spec.scales:
        p.error(f"unknown scale '{args.scale}'; the spec has {list(spec.scales)}")
    paths, off = pretrained_paths(spec, args.scale, extra)
    command = " ".join(["python scripts/ship_weights.py", args.artifact, "--scale", args.scale,
                        *(["--", *extra] if extra else [])])
    made_by = {"command": command, "equivalent": f"iif-reproduce {args.artifact} --scale {args.scale} --prepare-only "
               f"-- {' '.join([*off, *extra])}", "torch": torch.__version__, "diffusers": diffusers.__version__}
    for entry in ship(paths, Path(args.dest) if args.dest else SHIPPED, made_by):
        print(f"shipped {entry} ({(entry / 'weights.pt').stat().st_size / 2**20:.2f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
