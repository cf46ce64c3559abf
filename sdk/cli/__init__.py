"""The ``shallowmark`` command line.

The SDK must stay importable without torch, so every subcommand that needs the model stack
imports it lazily, and a missing extra is reported with the pip command that installs it.
"""

from __future__ import annotations

import argparse
import shlex
import json
import sys
from pathlib import Path

from shallowmark.errors import MissingDependencyError, ShallowmarkError


def _need(extra: str, feature: str):
    """Import guard for subcommands that need an optional extra."""
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        if extra == "server":
            import grpc_health  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(feature, extra, e)


# -- train-default ---------------------------------------------------------------------------------
def _cmd_train_default(args) -> int:
    _need("core", "train-default")
    from shallowmark.research.train_default import TrainConfig, train_default

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
                      vae_share=args.vae_share, vae_from=args.vae_from, unet_steps=args.unet_steps)
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
    from shallowmark.research.foundation_report import measure, write_reports

    model_dir = Path(args.model) if args.model else DEFAULT_PATH
    backend = load_backend("tiny-ldm", path=model_dir)
    res = measure(backend, quick=args.quick)
    card_dir = None if args.no_card else model_dir
    write_reports(res, Path(args.out), card_dir, args.invocation)
    print(Path(args.out, "report.md").read_text())
    return 0


# -- bench-methods ---------------------------------------------------------------------------------
def _cmd_bench_methods(args) -> int:
    _need("bench", "bench-methods")
    from shallowmark.attacks.methods_report import run

    run(Path(args.out), n_null=args.n_null, n_ident=args.n_ident, n_fidelity=args.n_fidelity,
        n_nullspace=args.n_nullspace, log=lambda m: print(m, flush=True), command=args.invocation)
    print(Path(args.out, "report.md").read_text())
    return 0


def _cmd_bench_key_scan(args) -> int:
    _need("bench", "bench-key-scan")
    from shallowmark.attacks import key_scan

    kw = dict(candidates=key_scan.DEFAULT_CANDIDATES[:2], n=2, attacks=("clean", "jpeg"), n_user=1) if args.quick else {}
    key_scan.run(Path(args.out), **{"n": args.n, **kw}, log=lambda m: print(m, flush=True), command=args.invocation)
    print(Path(args.out, "report.md").read_text())
    return 0


# -- bench -----------------------------------------------------------------------------------------
def _cmd_bench(args) -> int:
    if args.server is None:  # server mode runs without torch: the server has the model
        _need("core", "bench")
    from shallowmark.attacks.bench import BenchConfig, parse_attacks, run_bench

    kw = {}
    if args.methods is not None:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.attacks is not None:
        kw["attacks"] = parse_attacks(args.attacks)
    for name in ("n", "seed", "batch", "target_fpr"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.keys is not None:
        kw["n_keys"] = args.keys
    if args.steps is not None:
        kw["num_steps"] = args.steps
    for name in ("model", "positives", "negatives"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    kw.update(out_dir=args.out, cache_dir=args.cache, server=args.server, command=args.invocation)
    config = BenchConfig.quick_config(**kw) if args.quick else BenchConfig(**kw)
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.server is None:
        run_bench(config, progress=not args.no_progress, log=log)
    else:
        from shallowmark.attacks.bench import validate_config

        validate_config(config)  # names and numbers first: a typo costs no connection
        with _client(args) as c:
            run_bench(config, progress=not args.no_progress, log=log, client=c)
    print(Path(args.out, "report.md").read_text())
    return 0


# -- analyze ---------------------------------------------------------------------------------------
def _cmd_analyze(args) -> int:
    _need("core", "analyze")
    if args.analysis == "molrg":
        from shallowmark.research.molrg_theory import run_molrg_analysis

        out = args.out or "docs/analysis/molrg"
        run_molrg_analysis(out, quick=args.quick, seed=args.seed)
    elif args.analysis == "loco-edit":
        from shallowmark.research.loco_edit import run_loco_edit_analysis

        out = args.out or "docs/analysis/loco-edit"
        run_loco_edit_analysis(out, quick=args.quick, seed=args.seed, command=args.invocation,
                               log=lambda m: print(m, flush=True))
    elif args.analysis == "jacobian-rank":
        from shallowmark.research import jacobian_rank

        out = args.out or "docs/analysis/jacobian-rank"
        jacobian_rank.run_jacobian_rank_analysis(
            out, quick=args.quick, seed=args.seed, command=args.invocation, log=lambda m: print(m, flush=True),
            tol=jacobian_rank.DEFAULT_TOL if args.tol is None else args.tol,
            margin=jacobian_rank.DEFAULT_MARGIN if args.margin is None else args.margin)
    elif args.analysis == "reproducibility":
        from shallowmark.research.reproducibility import run_reproducibility_analysis

        out = args.out or "docs/analysis/reproducibility"
        run_reproducibility_analysis(out, quick=args.quick, seed=args.seed, sscd=args.sscd, command=args.invocation,
                                     extra_models=[m for m in (args.models or "").split(",") if m])
    print(Path(out, "report.md").read_text())
    return 0


# -- edit ------------------------------------------------------------------------------------------
def _cmd_edit(args) -> int:
    _need("core", "edit")
    from PIL import Image

    from shallowmark.research import loco_edit
    from shallowmark.core.backends import load_backend

    # Every input check before the model loads: a typo costs nothing.
    loco_edit.check_t(args.t)
    loco_edit.check_lambda(args.lam)
    loco_edit.check_mass(args.mass)
    loco_edit.check_index(args.index, args.rank)
    for flag, path in (("--out", args.out), ("--base", args.base)):
        if path is not None and (Path(path).suffix.lower() != ".png" or not Path(path).resolve().parent.is_dir()):
            raise ShallowmarkError(f"{flag} must be a .png file in an existing folder; got {path}")
    image = loco_edit.read_image(args.image)
    backend = load_backend("tiny-ldm", **({"path": args.model} if args.model else {}))
    res = loco_edit.loco_edit_image(backend, image, t=args.t, index=args.index, lam=args.lam, rank=args.rank,
                                    iters=args.iters, num_steps=args.steps, mass=args.mass, seed=args.seed)
    Image.fromarray(res.image).save(args.out)
    if args.base:
        Image.fromarray(res.base).save(args.base)
    print(f"wrote {args.out}: {res.summary()}")
    return 0


# -- serve -----------------------------------------------------------------------------------------
def _cmd_serve(args) -> int:
    _need("server", "serve")
    import logging
    import secrets

    from shallowmark.server.app import serve
    from shallowmark.server.config import load_config

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = dict(host=args.host, port=args.port, device=args.device,
                     models=tuple(args.model) if args.model else None,
                     state_dir=Path(args.state_dir) if args.state_dir else None, ledger_url=args.ledger_url,
                     max_batch=args.max_batch, batching=False if args.no_batching else None)
    dev_token = None
    if args.config is None:
        # Development mode: loopback only, one fresh token per start, tiny-ldm unless --model says otherwise.
        dev_token = secrets.token_urlsafe(24)
        overrides["tokens"] = {dev_token: "dev"}
    cfg = load_config(args.config, **overrides)
    if args.config is None and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        raise ShallowmarkError("without --config the server listens on loopback only; write a config file "
                               "(tokens, TLS) to listen on other interfaces")

    def ready(app):
        print(f"shallowmark server on {app.address} ({'TLS' if cfg.tls else 'plaintext'}); "
              f"models {', '.join(cfg.models)} loading in the background", flush=True)
        if dev_token:
            print(f"development token (tenant 'dev'): {dev_token}\n"
                  f"  export SHALLOWMARK_TOKEN={dev_token}", flush=True)

    serve(cfg, on_ready=ready)
    return 0


# -- keys ------------------------------------------------------------------------------------------
def _passphrase(confirm: bool = False) -> str:
    import os

    env = os.environ.get("SHALLOWMARK_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise ShallowmarkError("no passphrase: set SHALLOWMARK_PASSPHRASE or run in a terminal to be asked")
    import getpass

    pw = getpass.getpass("keystore passphrase: ")
    if confirm and getpass.getpass("again: ") != pw:
        raise ShallowmarkError("the passphrases differ")
    return pw


def _cmd_keys(args) -> int:
    from shallowmark.keystore import Keystore

    path = Path(args.keystore)
    if args.keys_command == "new":
        if path.exists():
            ks = Keystore.open(path, _passphrase())
        else:
            ks = Keystore.create(path, _passphrase(confirm=True))
            print(f"created keystore {path}", file=sys.stderr)
        key = ks.rotate(label=args.label) if args.rotate else ks.new_key(label=args.label)
        print(key.key_id)
        return 0
    ks = Keystore.open(path, _passphrase())
    rows = ks.list()
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    print(f"{'key_id':<38}{'active':<8}{'retired':<9}{'created':<27}label")
    for r in rows:
        print(f"{r.key_id:<38}{'yes' if r.active else '':<8}{'yes' if r.retired else '':<9}{r.created:<27}{r.label}")
    return 0


# -- embed / verify (client side) ------------------------------------------------------------------
def _client(args):
    import os

    from shallowmark.client import Client

    return Client(args.server, token=args.token or os.environ.get("SHALLOWMARK_TOKEN"),
                  tls=True if args.tls else None, root_certificates=args.ca, client_cert=args.client_cert,
                  client_key=args.client_key, timeout=args.timeout)


def _connection_flags(p) -> None:
    """Token, TLS and timeout flags of every command that talks to a server (read by :func:`_client`)."""
    p.add_argument("--token", help="bearer token (default $SHALLOWMARK_TOKEN; prefer the variable: "
                                   "a flag shows in the process list)")
    p.add_argument("--tls", action="store_true", help="TLS with the system root certificates")
    p.add_argument("--ca", help="CA certificate (PEM) of the server; implies TLS")
    p.add_argument("--client-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--client-key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call, retries included")


def _cmd_embed(args) -> int:
    from shallowmark.keystore import Keystore

    ks = Keystore.open(args.keystore, _passphrase())
    key = ks.get(args.key) if args.key else ks.active()
    if args.image is None and args.seed is None:
        raise ShallowmarkError("give --seed N (with an optional --prompt) to generate, or --image FILE to watermark")
    if args.output and args.image is None:
        raise ShallowmarkError("--output applies to --image (a marked upload), not to --seed")
    with _client(args) as c:
        if args.image is not None:
            res = c.embed(key, method=args.method, model=args.model or "", image=Path(args.image), output=args.output)
        else:
            res = c.embed(key, method=args.method, model=args.model or "", seed=args.seed, prompt=args.prompt)
    res.save(args.out)
    info = dict(out=str(args.out), key_id=res.key_id, method=res.method, model=res.model,
                image_sha256=res.image_sha256, request_id=res.request_id, notes=list(res.notes))
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {args.out}: key {res.key_id}, {res.method} on {res.model}, sha256 {res.image_sha256}")
        for n in res.notes:
            print(f"  note: {n}")
    return 0


def _cmd_verify(args) -> int:
    from shallowmark.attestation import verify_attestation
    from shallowmark.keystore import Keystore

    ks = Keystore.open(args.keystore, _passphrase())
    methods = args.method or ["shallow-diffuse"]
    keys = [k.for_method(m) for k in ks.verification_keys() for m in methods]
    failed = 0
    with _client(args) as c:
        for f in args.files:
            try:
                data = Path(f).read_bytes()
                res = c.verify(data, keys, target_fpr=args.target_fpr, model=args.model or "")
                verify_attestation(res, args.trusted_key, image=data)
            except (OSError, ShallowmarkError) as e:
                failed += 1
                if args.json:
                    print(json.dumps({"file": f, "error": str(e)}), flush=True)
                else:
                    print(f"{f}: error: {e}", file=sys.stderr, flush=True)
                continue
            best = res.best
            if args.json:
                print(json.dumps({"file": f, "detected": res.detected, "key_id": res.identified_key_id,
                                  "p_value": best.p_value, "p_value_corrected": best.p_value_corrected,
                                  "method": best.method, "request_id": res.request_id, "attested": True}),
                      flush=True)
            elif res.detected:
                print(f"{f}: watermarked with {res.identified_key_id} ({best.method}, p={best.p_value:.3g}, "
                      f"corrected p={best.p_value_corrected:.3g})", flush=True)
            else:
                print(f"{f}: no watermark from these keys (best p={best.p_value_corrected:.3g} corrected, "
                      f"target FPR {res.target_fpr:g})", flush=True)
    return 2 if failed else 0


def _add_service_commands(sub) -> None:
    s = sub.add_parser("serve", help="run the gRPC server (needs the 'server' extra)")
    s.add_argument("--config", help="TOML config (tokens, TLS, models, limits); without it: development "
                                    "mode on loopback with a printed token")
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 50051; 0 picks a free one)")
    s.add_argument("--model", action="append", help="model to serve (repeatable; default tiny-ldm)")
    s.add_argument("--device", help="torch device, e.g. cuda")
    s.add_argument("--state-dir", help="folder for the default ledger and attestation key "
                                       "(default ~/.local/state/shallowmark)")
    s.add_argument("--ledger-url", help="where the ledger lives: sqlite:///path, a plain path, or "
                                        "postgresql://user@host:5432/dbname (password via PGPASSWORD or ~/.pgpass)")
    s.add_argument("--max-batch", type=int, help="most requests run together as one model batch (default 8)")
    s.add_argument("--no-batching", action="store_true",
                   help="run every request on its own (micro-batching of concurrent calls is on by default)")
    s.set_defaults(func=_cmd_serve)

    k = sub.add_parser("keys", help="manage a keystore (passphrase from SHALLOWMARK_PASSPHRASE or a prompt)")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kn = ksub.add_parser("new", help="add a key and make it active (creates the keystore if missing)")
    kn.add_argument("--keystore", required=True)
    kn.add_argument("--label", default="")
    kn.add_argument("--rotate", action="store_true", help="retire the previously active key")
    kl = ksub.add_parser("list", help="list keys (public metadata only)")
    kl.add_argument("--keystore", required=True)
    kl.add_argument("--json", action="store_true")
    k.set_defaults(func=_cmd_keys)

    def client_flags(p):
        import os

        p.add_argument("--server", default=os.environ.get("SHALLOWMARK_SERVER", "127.0.0.1:50051"),
                       help="server address host:port (default $SHALLOWMARK_SERVER or 127.0.0.1:50051)")
        p.add_argument("--keystore", required=True)
        _connection_flags(p)
        p.add_argument("--model", help="server model (default: the server's default)")

    e = sub.add_parser("embed", help="watermark an image through a server")
    client_flags(e)
    e.add_argument("--key", help="key_id to use (default: the keystore's active key)")
    e.add_argument("--method", default="shallow-diffuse")
    src = e.add_mutually_exclusive_group()
    src.add_argument("--seed", type=int, help="generate a new image from this seed")
    src.add_argument("--image", help="watermark this PNG/JPEG file (must be the model's size)")
    e.add_argument("--prompt", help="prompt for text-conditioned models (with --seed)")
    e.add_argument("--output", choices=("decode", "residual"),
                   help="with --image: 'residual' keeps your pixels and adds only the watermark's change "
                        "(higher fidelity); 'decode' returns the model's decoding (default: the server's setting)")
    e.add_argument("--out", required=True, help="output PNG")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_cmd_embed)

    v = sub.add_parser("verify", help="check images against every key in a keystore through a server")
    client_flags(v)
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--method", action="append", help="method(s) to check (repeatable; default shallow-diffuse)")
    v.add_argument("--target-fpr", type=float, default=0.01)
    v.add_argument("--trusted-key", help="the server's attestation public key (hex) to pin")
    v.add_argument("--json", action="store_true", help="one JSON object per image")
    v.set_defaults(func=_cmd_verify)


# -- loadtest --------------------------------------------------------------------------------------
def _cmd_loadtest(args) -> int:
    _need("server", "loadtest")
    from shallowmark.server.loadtest import LoadtestConfig, run_loadtest

    kw = {}
    if args.clients:
        try:
            kw["clients"] = tuple(int(c) for c in args.clients.split(",") if c.strip())
        except ValueError:
            raise ShallowmarkError(f"--clients takes comma-separated integers, e.g. 1,4,16; got {args.clients!r}")
        if not kw["clients"] or min(kw["clients"]) < 1:
            raise ShallowmarkError("--clients needs positive integers")
    if args.min_seconds is not None and not args.min_seconds >= 0:
        raise ShallowmarkError(f"--min-seconds needs a number >= 0; got {args.min_seconds}")
    for name in ("requests", "min_seconds", "steps", "max_batch", "max_wait_ms", "threads", "device"):
        if getattr(args, name) is not None:
            kw[{"requests": "requests_per_level", "steps": "num_steps"}.get(name, name)] = getattr(args, name)
    if args.threads is not None and args.threads < 1:
        raise ShallowmarkError("--threads needs a positive integer")
    cfg = LoadtestConfig.quick_config(**kw) if args.quick else LoadtestConfig(**kw)
    run_loadtest(args.out, cfg, command=args.invocation, log=lambda m: print(m, flush=True))
    print(Path(args.out, "report.md").read_text())
    return 0


# -- demo ------------------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    _need("server", "demo")
    from shallowmark.cli.demo import run_demo

    return run_demo(Path(args.out), num_steps=args.steps)


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
    t.add_argument("--unet-steps", type=int, help="run exactly this many denoiser steps instead of filling the budget "
                                                  "(repeatable on a shared machine)")
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
    b.set_defaults(func=_cmd_bench_core)

    bm = sub.add_parser("bench-methods", help="every watermark method on tiny-ldm, clean images; writes a report")
    bm.add_argument("--out", default="docs/benchmarks/methods")
    bm.add_argument("--n-null", type=int, default=200, help="unwatermarked images for the FPR check")
    bm.add_argument("--n-ident", type=int, default=32, help="watermarked images (one key each) per method")
    bm.add_argument("--n-fidelity", type=int, default=8)
    bm.add_argument("--n-nullspace", type=int, default=4)
    bm.set_defaults(func=_cmd_bench_methods)

    ks = sub.add_parser("bench-key-scan", help="Shallow Diffuse key placements side by side (fidelity vs robustness); "
                                               "writes a report")
    ks.add_argument("--out", default="docs/benchmarks/methods/key-scan")
    ks.add_argument("--n", type=int, default=16, help="generated images per candidate")
    ks.add_argument("--quick", action="store_true", help="2 candidates, 2 images, 1 photo, clean and JPEG: a smoke run")
    ks.set_defaults(func=_cmd_bench_key_scan)

    be = sub.add_parser("bench", help="robustness under attacks: AUC and TPR@1%%FPR per method and attack; "
                                      "writes report.json, report.md, roc.png")
    be.add_argument("--methods", help="comma-separated methods (default: all seven)")
    be.add_argument("--attacks", help="comma-separated attacks, name or name:strength, e.g. clean,jpeg,blur:3,regen "
                                      "(default: clean and every registered attack at its reference strength)")
    be.add_argument("--n", type=int, help="watermarked images per method and unwatermarked images (default 100)")
    be.add_argument("--seed", type=int, help="first seed (default 10000)")
    be.add_argument("--keys", type=int, help="test keys per method; image i carries key i mod keys (default 1)")
    be.add_argument("--steps", type=int, help="DDIM steps of the diffusion methods (default: theirs, 50); "
                                              "in-process only, a server's operator sets its steps")
    be.add_argument("--batch", type=int, help="images per model call; with --server, calls in flight at once "
                                              "(default 8)")
    be.add_argument("--target-fpr", type=float, help="target FPR of the verdicts (default 0.01)")
    be.add_argument("--out", default="bench-out", help="report folder")
    be.add_argument("--cache", help="cache folder for images and scores (default ~/.cache/shallowmark/bench); "
                                    "an interrupted run resumes from it")
    be.add_argument("--quick", action="store_true",
                    help="small grid: shallow-diffuse,tree-ring × clean,jpeg,blur, n=4, 10 steps (options still apply)")
    be.add_argument("--server", metavar="ADDR",
                    help="run through the SDK against a shallowmark server at ADDR (host:port), as an auditor without "
                         "model access: the server embeds with test keys and verifies, the attacks run here, the "
                         "unwatermarked images are crops of the bundled photos or --negatives; no torch needed. "
                         "Token from $SHALLOWMARK_TOKEN or --token; TLS with --tls/--ca/--client-cert/--client-key")
    _connection_flags(be)
    be.add_argument("--model", help="model: a backend in-process (default tiny-ldm), one of the server's models "
                                    "with --server (default tiny-ldm)")
    be.add_argument("--positives", choices=["generate", "upload"],
                    help="--server: watermarked images generated by the server from the seeds (default), or its "
                         "watermarked versions of the unwatermarked images for methods that can embed an upload")
    be.add_argument("--negatives", metavar="DIR",
                    help="--server: folder of PNG/JPEG unwatermarked images (the first --n by name, centre-cropped "
                         "to the model's size; default: crops of the photos bundled with scikit-image/-learn)")
    be.add_argument("--no-progress", action="store_true", help="no progress bar")
    be.set_defaults(func=_cmd_bench)

    an = sub.add_parser("analyze", help="the research analyses; each writes report.md, report.json and PNGs")
    an.add_argument("analysis", choices=["molrg", "loco-edit", "jacobian-rank", "reproducibility"],
                    help="molrg: MoLRG posterior mean, DAE = PCA, phase transition; loco-edit: edits along the top "
                         "singular vectors of the posterior-mean Jacobian and their locality; jacobian-rank: rank "
                         "ratio of the posterior-mean Jacobian across t and the automatic t* of Shallow Diffuse; "
                         "reproducibility: RP score between tiny-ldm models from the same noise and GL score "
                         "(copies of the training set)")
    an.add_argument("--out", help="output folder (default docs/analysis/<analysis>)")
    an.add_argument("--quick", action="store_true", help="a small run that finishes in seconds")
    an.add_argument("--seed", type=int, default=0)
    an.add_argument("--tol", type=float, help="jacobian-rank: σ_i counts when σ_i > tol·σ_max, in (0, 1) (default 0.01)")
    an.add_argument("--margin", type=float, help="jacobian-rank: t* rule margin in [0, 1) (default 0.1)")
    an.add_argument("--sscd", metavar="FILE", help="reproducibility: a local SSCD TorchScript file for the similarity "
                                                   "(default: the documented thumbnail stand-in)")
    an.add_argument("--models", metavar="DIRS", help="reproducibility: comma-separated tiny-ldm folders to compare "
                                                     "with the shipped model and its variants")
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
    ed.add_argument("--out", required=True, help="output PNG")
    ed.set_defaults(func=_cmd_edit)

    _add_service_commands(sub)

    lt = sub.add_parser("loadtest", help="Verify throughput and p50/p99 latency of a local server at 1, 4 and 16 "
                                         "clients, micro-batching on and off; writes report.md and report.json")
    lt.add_argument("--out", default="docs/benchmarks/service")
    lt.add_argument("--quick", action="store_true", help="smoke size (10 steps, few requests): checks, not numbers")
    lt.add_argument("--clients", help="comma-separated concurrent client counts (default 1,4,16)")
    lt.add_argument("--requests", type=int, help="requests per (clients, batching) row, at least (default 48)")
    lt.add_argument("--min-seconds", type=float, help="each row runs at least this long (default 10; --quick 0)")
    lt.add_argument("--steps", type=int, help="DDIM steps of shallow-diffuse (default 50; verify inverts 30%%)")
    lt.add_argument("--max-batch", type=int, help="server max batch (default 8)")
    lt.add_argument("--max-wait-ms", type=float, help="server max wait for a batch to fill (default 5)")
    lt.add_argument("--threads", type=int, help="torch threads for the run (default: torch's, set by OMP_NUM_THREADS)")
    lt.add_argument("--device", help="torch device (default cpu)")
    lt.set_defaults(func=_cmd_loadtest)

    d = sub.add_parser("demo", help="the newcomer's tour: a local server, keys, embed, attacks, verify")
    d.add_argument("--out", default="demo-out")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps of generation (verification inverts 30%%)")
    d.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # the command line as typed, for the reports to quote
    args.invocation = " ".join(["shallowmark", *(shlex.quote(a) for a in argv)])
    try:
        return int(args.func(args) or 0)
    except ShallowmarkError as e:
        print(f"shallowmark: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
