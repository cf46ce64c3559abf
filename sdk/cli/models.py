"""``shallowmark models`` (the diffusion backends) and ``shallowmark train-default`` (retrain the
embedded tiny-ldm)."""

from __future__ import annotations

import json
from pathlib import Path

from shallowmark.cli._common import log, need
from shallowmark.errors import ShallowmarkError


def register(sub) -> None:
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
    t.add_argument("--unet-steps", type=int, help="run exactly this many denoiser steps instead of filling the budget "
                                                  "(repeatable on a shared machine)")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    t.add_argument("--photos", help="folder of photos to train on instead of the bundled ones")
    t.set_defaults(func=_cmd_train_default)

    m = sub.add_parser("models", help="list the diffusion backends")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)


def _read_photos(folder) -> dict:
    """The .png/.jpg photos of ``folder`` as RGB arrays, by file stem."""
    import numpy as np
    from PIL import Image

    photos = {}
    for p in sorted(Path(folder).iterdir()):
        if p.suffix.lower() in (".png", ".jpg", ".jpeg"):
            photos[p.stem] = np.asarray(Image.open(p).convert("RGB"))
    if not photos:
        raise ShallowmarkError(f"no .png/.jpg photos found in {folder}")
    return photos


def _cmd_train_default(args) -> int:
    need("core", "train-default")
    from shallowmark.research.train_default import TrainConfig, train_default

    photos = _read_photos(args.photos) if args.photos else {}
    cfg = TrainConfig(out_dir=args.out, device=args.device, budget_s=args.budget, seed=args.seed,
                      vae_batch=args.vae_batch, vae_crop=args.vae_crop, unet_batch=args.unet_batch,
                      unet_lr=args.unet_lr, pool=args.pool, bf16=args.bf16, photos=photos,
                      vae_share=args.vae_share, vae_from=args.vae_from, unet_steps=args.unet_steps)
    if args.device.startswith("cuda"):
        import torch

        torch.backends.cudnn.benchmark = True
    record = train_default(cfg, log=log)
    print(json.dumps({k: record[k] for k in ("vae_steps", "unet_steps", "seconds", "final", "device_name")}))
    return 0


def _cmd_models(args) -> int:
    need("core", "models")
    from shallowmark.core.backends import DEFAULT_BACKEND, backend_names, load_backend

    rows = []
    for name in backend_names():
        if name == "stable-diffusion":  # needs a model folder or hub id: describe, don't load
            rows.append(dict(name=name, latent_shape="(4, H/8, W/8) of the pipeline", parameters="of the pipeline",
                             default=False, description="any diffusers StableDiffusionPipeline (folder or hub id), CFG"))
            continue
        info = load_backend(name).info()
        rows.append(dict(name=name, latent_shape=str(tuple(info.latent_shape)), parameters=info.parameters,
                         default=name == DEFAULT_BACKEND, description=info.description))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'name':<18}{'latent shape':<34}{'parameters':<18}{'default':<9}description")
    for r in rows:
        print(f"{r['name']:<18}{r['latent_shape']:<34}{str(r['parameters']):<18}{'yes' if r['default'] else '':<9}"
              f"{r['description']}")
    return 0
