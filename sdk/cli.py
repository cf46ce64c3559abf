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


# -- models ----------------------------------------------------------------------------------------
def _cmd_models(args) -> int:
    _need("core", "models")
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


# -- bench-core ------------------------------------------------------------------------------------
def _cmd_bench_core(args) -> int:
    _need("core", "bench-core")
    from shallowmark.core.backends import load_backend
    from shallowmark.core.backends.tiny_ldm import DEFAULT_PATH
    from shallowmark.core.foundation_report import measure, write_reports

    model_dir = Path(args.model) if args.model else DEFAULT_PATH
    backend = load_backend("tiny-ldm", path=model_dir)
    res = measure(backend, quick=args.quick)
    card_dir = None if args.no_card else model_dir
    write_reports(res, Path(args.out), card_dir, "shallowmark " + " ".join(sys.argv[1:]) if args.argv is None
                  else "shallowmark " + " ".join(args.argv))
    print(Path(args.out, "report.md").read_text())
    return 0


# -- bench-methods ---------------------------------------------------------------------------------
def _cmd_bench_methods(args) -> int:
    _need("bench", "bench-methods")
    from shallowmark.attacks.methods_report import run

    cmd = "shallowmark bench-methods " + " ".join(sys.argv[2:])
    run(Path(args.out), n_null=args.n_null, n_ident=args.n_ident, n_fidelity=args.n_fidelity,
        n_nullspace=args.n_nullspace, log=lambda m: print(m, flush=True), command=cmd.strip())
    print(Path(args.out, "report.md").read_text())
    return 0


# -- analyze ---------------------------------------------------------------------------------------
def _cmd_analyze(args) -> int:
    _need("core", "analyze")
    if args.analysis == "molrg":
        from shallowmark.core.molrg_theory import run_molrg_analysis

        out = args.out or "docs/analysis/molrg"
        run_molrg_analysis(out, quick=args.quick, seed=args.seed)
    print(Path(out, "report.md").read_text())
    return 0


# -- demo ------------------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    _need("core", "demo")
    from shallowmark.core.demo import run_demo

    return run_demo(Path(args.out))


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

    m = sub.add_parser("models", help="list the diffusion backends")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_cmd_models)

    b = sub.add_parser("bench-core", help="measure tiny-ldm and DDIM; write a report and the model card")
    b.add_argument("--out", default="docs/benchmarks/core")
    b.add_argument("--model", help="tiny-ldm folder (default: the embedded one)")
    b.add_argument("--quick", action="store_true", help="fewer repeats and batches (for tests)")
    b.add_argument("--no-card", action="store_true", help="do not rewrite the model card")
    b.set_defaults(func=_cmd_bench_core, argv=None)

    bm = sub.add_parser("bench-methods", help="every watermark method on tiny-ldm, clean images; writes a report")
    bm.add_argument("--out", default="docs/benchmarks/methods")
    bm.add_argument("--n-null", type=int, default=200, help="unwatermarked images for the FPR check")
    bm.add_argument("--n-ident", type=int, default=32, help="watermarked images (one key each) per method")
    bm.add_argument("--n-fidelity", type=int, default=8)
    bm.add_argument("--n-nullspace", type=int, default=4)
    bm.set_defaults(func=_cmd_bench_methods)

    an = sub.add_parser("analyze", help="the research analyses; each writes report.md, report.json and PNGs")
    an.add_argument("analysis", choices=["molrg"], help="molrg: MoLRG posterior mean, DAE = PCA, phase transition")
    an.add_argument("--out", help="output folder (default docs/analysis/<analysis>)")
    an.add_argument("--quick", action="store_true", help="a small run that finishes in seconds")
    an.add_argument("--seed", type=int, default=0)
    an.set_defaults(func=_cmd_analyze)

    d = sub.add_parser("demo", help="the newcomer's tour on the embedded model")
    d.add_argument("--out", default="demo-out")
    d.set_defaults(func=_cmd_demo)
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
