"""The ``shallowmark`` command line.

The SDK must stay importable without torch, so every subcommand that needs the model stack
imports it lazily, and a missing extra is reported with the pip command that installs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shallowmark.errors import MissingDependencyError, ShallowmarkError


def _need(extra: str, feature: str):
    """Import guard for subcommands that need an optional extra."""
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(feature, extra, e)


# -- train-default ---------------------------------------------------------------------------------
def _cmd_train_default(args) -> int:
    _need("core", "train-default")
    from shallowmark.core.train_default import TrainConfig, train_default

    photos = {}
    if args.photos:
        import numpy as np
        from PIL import Image

        for p in sorted(Path(args.photos).iterdir()):
            if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
                photos[p.stem] = np.asarray(Image.open(p).convert("RGB"))
        if not photos:
            raise ShallowmarkError(f"no .png/.jpg photos found in {args.photos}")
    cfg = TrainConfig(out_dir=args.out, device=args.device, budget_s=args.budget, seed=args.seed,
                      vae_batch=args.vae_batch, vae_crop=args.vae_crop, unet_batch=args.unet_batch,
                      unet_lr=args.unet_lr, pool=args.pool, bf16=args.bf16, photos=photos,
                      vae_share=args.vae_share, vae_from=args.vae_from)
    if args.device.startswith("cuda"):
        import torch

        torch.backends.cudnn.benchmark = True
    record = train_default(cfg, log=lambda m: print(m, flush=True))
    print(json.dumps({k: record[k] for k in ("vae_steps", "unet_steps", "seconds", "final", "device_name")}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shallowmark", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train-default", help="retrain the embedded tiny-ldm model from the bundled photos")
    t.add_argument("--out", required=True, help="output folder (diffusers format: vae/, unet/, scheduler/)")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    t.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds for both stages")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--vae-batch", type=int, default=8)
    t.add_argument("--vae-crop", type=int, default=128)
    t.add_argument("--unet-batch", type=int, default=32)
    t.add_argument("--unet-lr", type=float, default=4e-4)
    t.add_argument("--pool", type=int, default=1024, help="distinct 256² crops drawn up front")
    t.add_argument("--vae-share", type=float, default=0.4, help="fraction of the budget for the autoencoder")
    t.add_argument("--vae-from", help="reuse this trained autoencoder folder (skips stage 1)")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    t.add_argument("--photos", help="folder of photos to train on instead of the bundled ones")
    t.set_defaults(func=_cmd_train_default)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ShallowmarkError as e:
        print(f"shallowmark: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
