"""The research analyses (``shallowmark analyze molrg|loco-edit|jacobian-rank|reproducibility``) and
``shallowmark edit`` (a LOCO edit of one image)."""

from __future__ import annotations

from pathlib import Path

from shallowmark.cli._common import log, need, print_report
from shallowmark.errors import ShallowmarkError


def register(sub) -> None:
    an = sub.add_parser("analyze", help="the research analyses; each writes report.md, report.json and PNGs")
    an.add_argument("analysis", choices=["molrg", "loco-edit", "jacobian-rank", "reproducibility", "regimes",
                                         "jacobian-energy", "fmnist-watermark", "loco-masked", "molrg-training"],
                    help="molrg: MoLRG posterior mean, DAE = PCA, phase transition; loco-edit: edits along the top "
                         "singular vectors of the posterior-mean Jacobian and their locality; jacobian-rank: rank "
                         "ratio of the posterior-mean Jacobian across t and the automatic t* of Shallow Diffuse; "
                         "reproducibility: RP score between tiny-ldm models from the same noise and GL score "
                         "(copies of the training set); regimes: RP and GL against the training-set size N on "
                         "Fashion-MNIST, two models per N, with the empirical optimum as the memorization limit; "
                         "jacobian-energy: the Jacobian's rank by the 99 %%-energy rule, exact on the Fashion-MNIST "
                         "model, randomized on tiny-ldm at full size; fmnist-watermark: Shallow Diffuse in pixel "
                         "space on the generalizing Fashion-MNIST model, fidelity and detection against generated "
                         "and real negatives under pixel attacks; loco-masked: LOCO edit with a mask and the "
                         "null-space projection on the Fashion-MNIST model and tiny-ldm, and its locality, change "
                         "outside the mask, homogeneity/transfer, linearity and composability; molrg-training: the "
                         "MoLRG N-vs-r transition with sampled noise (K = 1, 2) and an MLP trained by denoising "
                         "score matching (subspace error, distance to the exact score, generalization against N)")
    an.add_argument("--out", help="output folder (default docs/analysis/<analysis>)")
    an.add_argument("--quick", action="store_true", help="a small run that finishes in seconds")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--tol", type=float, help="jacobian-rank: σ_i counts when σ_i > tol·σ_max, in (0, 1) (default 0.01)")
    an.add_argument("--margin", type=float, help="jacobian-rank: t* rule margin in [0, 1) (default 0.1)")
    an.add_argument("--sscd", metavar="FILE", help="reproducibility: a local SSCD TorchScript file for the similarity "
                                                   "(default: the documented thumbnail stand-in)")
    an.add_argument("--models", metavar="DIRS", help="reproducibility: comma-separated tiny-ldm folders to compare "
                                                     "with the shipped model and its variants")
    fm = "regimes, jacobian-energy, fmnist-watermark, loco-masked"
    an.add_argument("--data", metavar="DIR", help=f"{fm}: folder of the Fashion-MNIST IDX files (default "
                                                  "/usr/share/datasets/fashion-mnist, Debian's dataset-fashion-mnist)")
    an.add_argument("--cache", metavar="DIR", help=f"{fm}: trained models (default ~/.cache/shallowmark/analysis/fmnist)")
    an.set_defaults(func=_cmd_analyze)

    ed = sub.add_parser("edit", help="LOCO edit of one image with tiny-ldm: x_t + λ v_i along a top singular vector "
                                     "of the posterior-mean Jacobian, then DDIM to 0; prints the edit's locality")
    ed.add_argument("--image", required=True,
                    help="PNG/JPEG file (other sizes are resized and centre-cropped to 256²)")
    ed.add_argument("--t", type=float, default=0.5, help="noise level as a fraction of T, in (0, 1) (default 0.5)")
    ed.add_argument("--index", type=int, default=0, help="singular vector v_i to edit along, 0 = largest (default 0)")
    ed.add_argument("--lambda", dest="lam", type=float, default=0.05,
                    help="edit strength λ as a fraction of ‖x_t‖, either sign (default 0.05)")
    ed.add_argument("--rank", type=int, default=8,
                    help="singular vectors to compute; --index must be below it (default 8)")
    ed.add_argument("--iters", type=int, default=10, help="subspace iterations (default 10)")
    ed.add_argument("--steps", type=int, default=50, help="DDIM steps of the full grid (default 50)")
    ed.add_argument("--mass", type=float, default=0.5,
                    help="the region u_i highlights holds this share of Σ|u_i|² (default 0.5); locality is the share "
                         "of the pixel change inside it")
    ed.add_argument("--seed", type=int, default=0, help="seed of the subspace iteration's start")
    ed.add_argument("--model", help="tiny-ldm folder (default: the embedded one)")
    ed.add_argument("--base", help="also write the unedited (λ = 0) reconstruction here")
    region = ed.add_mutually_exclusive_group()
    region.add_argument("--mask", metavar="FILE",
                        help="masked LOCO edit of the white region of this image (grey or RGB, pixels brighter than "
                             "127; the input's own size or 256²): v_i of the masked Jacobian, projected off the "
                             "outside's top --null-rank directions; prints the change outside the mask")
    region.add_argument("--rect", metavar="TOP,LEFT,HEIGHT,WIDTH",
                        help="the same with a rectangle, in pixels of the input image")
    ed.add_argument("--null-rank", type=int, default=8,
                    help="with --mask/--rect: directions of the outside's Jacobian projected out (0: none; default 8)")
    ed.add_argument("--out", required=True, help="output PNG")
    ed.set_defaults(func=_cmd_edit)


# -- one function per analysis: each runs it and returns the folder it wrote ------------------------
def _molrg(args) -> str:
    from shallowmark.research.molrg_theory import run_molrg_analysis

    out = args.out or "docs/analysis/molrg"
    run_molrg_analysis(out, quick=args.quick, seed=args.seed)
    return out


def _loco_edit(args) -> str:
    from shallowmark.research.loco_edit import run_loco_edit_analysis

    out = args.out or "docs/analysis/loco-edit"
    run_loco_edit_analysis(out, quick=args.quick, seed=args.seed, command=args.invocation, log=log)
    return out


def _jacobian_rank(args) -> str:
    from shallowmark.research import jacobian_rank

    out = args.out or "docs/analysis/jacobian-rank"
    jacobian_rank.run_jacobian_rank_analysis(
        out, quick=args.quick, seed=args.seed, command=args.invocation, log=log,
        tol=jacobian_rank.DEFAULT_TOL if args.tol is None else args.tol,
        margin=jacobian_rank.DEFAULT_MARGIN if args.margin is None else args.margin)
    return out


def _reproducibility(args) -> str:
    from shallowmark.research.reproducibility import run_reproducibility_analysis

    out = args.out or "docs/analysis/reproducibility"
    run_reproducibility_analysis(out, quick=args.quick, seed=args.seed, sscd=args.sscd, command=args.invocation,
                                 extra_models=[m for m in (args.models or "").split(",") if m])
    return out


def _regimes(args) -> str:
    from shallowmark.research.regimes import RegimesConfig, run_regimes_analysis

    out = args.out or "docs/analysis/regimes"
    kw = dict(data_dir=args.data, cache_dir=args.cache, seed=args.seed)
    config = RegimesConfig.quick(**kw) if args.quick else RegimesConfig(**kw)
    run_regimes_analysis(out, config, command=args.invocation, log=log)
    return out


def _fmnist_config(args, cls):
    """The config of a Fashion-MNIST analysis from --quick, --data, --cache and --seed (``cls`` and
    its ``quick`` both take ``regimes=`` and ``seed=``)."""
    from shallowmark.research.regimes import RegimesConfig

    regimes = (RegimesConfig.quick if args.quick else RegimesConfig)(data_dir=args.data, cache_dir=args.cache)
    return (cls.quick if args.quick else cls)(regimes=regimes, seed=args.seed)


def _fmnist_analysis(module: str, config: str, run: str):
    """The runner of a Fashion-MNIST analysis: ``run`` of ``shallowmark.research.<module>`` with the
    ``config`` class built by :func:`_fmnist_config`, into docs/analysis/<name> by default."""
    def runner(args) -> str:
        import importlib

        mod = importlib.import_module(f"shallowmark.research.{module}")
        out = args.out or f"docs/analysis/{args.analysis}"
        getattr(mod, run)(out, _fmnist_config(args, getattr(mod, config)), command=args.invocation, log=log)
        return out
    return runner


def _molrg_training(args) -> str:
    from shallowmark.research.molrg_training import MolrgTrainingConfig, run_molrg_training_analysis

    out = args.out or "docs/analysis/molrg-training"
    config = (MolrgTrainingConfig.quick if args.quick else MolrgTrainingConfig)(seed=args.seed)
    run_molrg_training_analysis(out, config, command=args.invocation, log=log)
    return out


_ANALYSES = {"molrg": _molrg, "loco-edit": _loco_edit, "jacobian-rank": _jacobian_rank,
             "reproducibility": _reproducibility, "regimes": _regimes, "molrg-training": _molrg_training,
             "jacobian-energy": _fmnist_analysis("jacobian_energy", "JacobianEnergyConfig", "run_jacobian_energy_analysis"),
             "fmnist-watermark": _fmnist_analysis("fmnist_watermark", "FmnistWatermarkConfig",
                                                  "run_fmnist_watermark_analysis"),
             "loco-masked": _fmnist_analysis("loco_masked", "LocoMaskedConfig", "run_loco_masked_analysis")}


def _cmd_analyze(args) -> int:
    need("core", "analyze")
    print_report(_ANALYSES[args.analysis](args))
    return 0


def _cmd_edit(args) -> int:
    need("core", "edit")
    from PIL import Image

    from shallowmark.core.backends import load_backend
    from shallowmark.research import loco_edit

    # Every input check before the model loads: a typo costs nothing.
    loco_edit.check_t(args.t)
    loco_edit.check_lambda(args.lam)
    loco_edit.check_mass(args.mass)
    loco_edit.check_index(args.index, args.rank)
    for flag, path in (("--out", args.out), ("--base", args.base)):
        if path is not None and (Path(path).suffix.lower() != ".png" or not Path(path).resolve().parent.is_dir()):
            raise ShallowmarkError(f"{flag} must be a .png file in an existing folder; got {path}")
    image = loco_edit.read_image(args.image)
    mask = None
    if args.mask is not None:
        mask = loco_edit.mask_from_image(args.mask)
    elif args.rect is not None:
        mask = loco_edit.rect_mask_of(image.shape[:2], args.rect.split(","))
    backend = load_backend("tiny-ldm", **({"path": args.model} if args.model else {}))
    res = loco_edit.loco_edit_image(backend, image, t=args.t, index=args.index, lam=args.lam, rank=args.rank,
                                    iters=args.iters, num_steps=args.steps, mass=args.mass, seed=args.seed,
                                    mask=mask, null_rank=args.null_rank)
    Image.fromarray(res.image).save(args.out)
    if args.base:
        Image.fromarray(res.base).save(args.base)
    print(f"wrote {args.out}: {res.summary()}")
    return 0
