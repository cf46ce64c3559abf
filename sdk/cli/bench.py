"""The benchmarks: ``bench-core`` (tiny-ldm and DDIM), ``bench-methods`` (every method on clean
images), ``bench-key-scan`` (Shallow Diffuse key placements), ``bench-sizes`` (uploads of other sizes), ``bench-calibration`` (verdicts on unwatermarked images), ``bench-photos`` (real photos through the service), ``bench-identify`` (a key family of up to 100 000) and ``bench`` (robustness under
attacks, in-process or through a server)."""

from __future__ import annotations

from pathlib import Path

from shallowmark.cli._common import connection_flags, log, make_client, need, print_report


def register(sub) -> None:
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

    sz = sub.add_parser("bench-sizes", help="Shallow Diffuse on uploads of other sizes (300x800 .. 1920x1080): "
                                            "fidelity, detection after platform pipelines, grid mappings compared")
    sz.add_argument("--out", default="docs/benchmarks/sizes")
    sz.set_defaults(func=_cmd_bench_sizes)

    ca = sub.add_parser("bench-calibration", help="how often a verdict fires on unwatermarked generations and real "
                                                  "photos at each target FPR, clean and under geometric attacks")
    ca.add_argument("--out", default="docs/benchmarks/calibration")
    ca.add_argument("--method", default="shallow-diffuse")
    ca.add_argument("--n-generated", type=int, default=250, help="unwatermarked generations (default 250)")
    ca.add_argument("--photo-sources", help="comma-separated photo sets (default: all; see fetch-photos)")
    ca.add_argument("--photos-per-source", type=int, help="at most this many photos of each set (default: all)")
    ca.add_argument("--attacks", default=",".join(("clean", "rotate:15", "crop-centre:0.75", "aspect:0.8")))
    ca.add_argument("--n-keys", type=int, default=20, help="keys each image is scored against (default 20; "
                                                             "the first is the benchmark's test key)")
    ca.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an option of the method, e.g. key_variants=1 (repeatable; JSON values)")
    ca.set_defaults(func=_cmd_bench_calibration)

    ph = sub.add_parser("bench-photos", help="real photos at their own sizes watermarked and verified through a "
                                             "real server: fidelity and detection after the platform pipelines")
    ph.add_argument("--out", default="docs/benchmarks/photos")
    ph.add_argument("--n", type=int, default=20, help="photos, spread evenly over the sources (default 20)")
    ph.add_argument("--sources", help="comma-separated photo sets (default: all fetched; see fetch-photos)")
    ph.add_argument("--cache", help="photo cache folder (default: the fetch-photos cache)")
    ph.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a Shallow Diffuse option for the server, e.g. key_variants=16 (repeatable; JSON values)")
    ph.set_defaults(func=_cmd_bench_photos)

    ident = sub.add_parser("bench-identify", help="identification across a key family of up to 100 000 members: "
                                                  "accuracy under attacks, false positives, Verify latency per size")
    ident.add_argument("--out", default="docs/benchmarks/identification")
    ident.add_argument("--n", type=int, default=100, help="watermarked generations (default 100)")
    ident.add_argument("--sizes", default="64,1000,10000,100000", help="family sizes searched (default 64,1000,10000,100000)")
    ident.add_argument("--attacks", default="clean,jpeg:50,jpeg,blur,noise,jitter")
    ident.add_argument("--n-negatives", type=int, default=100, help="unwatermarked generations (default 100)")
    ident.add_argument("--photos-per-source", type=int, default=25, help="photos of each set as negatives (default 25)")
    ident.add_argument("--method-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a Shallow Diffuse option, e.g. key_variants=1 (repeatable; JSON values)")
    ident.set_defaults(func=_cmd_bench_identify)

    _register_bench(sub)


def _register_bench(sub) -> None:
    be = sub.add_parser("bench", help="robustness under attacks: AUC and TPR@1%%FPR per method and attack; "
                                      "writes report.json, report.md, roc.png")
    be.add_argument("--methods", help="comma-separated methods (default: all seven)")
    be.add_argument("--attacks", help="comma-separated attacks, name or name:strength, e.g. clean,jpeg,blur:3,regen "
                                      "(default: clean and every registered attack at its reference strength)")
    be.add_argument("--method-attacks", action="append", metavar="METHODS=ATTACKS",
                    help="run these methods on only these of --attacks, e.g. tree-ring,ringid=clean,jpeg,blur "
                         "(repeatable; the other methods run every attack; the report marks the cells left out)")
    be.add_argument("--method-option", action="append", metavar="METHOD:KEY=VALUE",
                    help="a configuration option of one method, e.g. shallow-diffuse:key_variants=16 (repeatable; "
                         "VALUE is read as JSON, else as a string); in-process only. The report states it")
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
    be.add_argument("--executor", choices=("local", "dask"),
                    help="who verifies: this process (local, the default) or Dask workers (dask: a LocalCluster on "
                         "loopback, or the scheduler at --dask-address); same scores either way")
    be.add_argument("--workers", type=int, help="--executor dask without --dask-address: worker processes (default 2)")
    be.add_argument("--dask-address", metavar="ADDR", help="--executor dask: a running Dask scheduler (tcp://host:8786)")
    be.add_argument("--server", metavar="ADDR",
                    help="run through the SDK against a shallowmark server at ADDR (host:port), as an auditor without "
                         "model access: the server embeds with test keys and verifies, the attacks run here, the "
                         "unwatermarked images are crops of the bundled photos or --negatives; no torch needed. "
                         "Token from $SHALLOWMARK_TOKEN or --token; TLS with --tls/--ca/--client-cert/--client-key")
    connection_flags(be)
    be.add_argument("--model", help="model: a backend in-process (default tiny-ldm), one of the server's models "
                                    "with --server (default tiny-ldm)")
    be.add_argument("--positives", choices=["generate", "upload"],
                    help="--server: watermarked images generated by the server from the seeds (default), or its "
                         "watermarked versions of the unwatermarked images for methods that can embed an upload")
    be.add_argument("--negatives", metavar="DIR",
                    help="--server: folder of PNG/JPEG unwatermarked images (the first --n by name, sent at their "
                         "own sizes; default: crops of the photos bundled with scikit-image/-learn)")
    be.add_argument("--no-progress", action="store_true", help="no progress bar")
    be.set_defaults(func=_cmd_bench)


def _cmd_bench_core(args) -> int:
    need("core", "bench-core")
    from shallowmark.core.backends import load_backend
    from shallowmark.core.backends.tiny_ldm import DEFAULT_PATH
    from shallowmark.research.foundation_report import measure, write_reports

    model_dir = Path(args.model) if args.model else DEFAULT_PATH
    backend = load_backend("tiny-ldm", path=model_dir)
    res = measure(backend, quick=args.quick)
    card_dir = None if args.no_card else model_dir
    write_reports(res, Path(args.out), card_dir, args.invocation)
    print_report(args.out)
    return 0


def _cmd_bench_methods(args) -> int:
    need("bench", "bench-methods")
    from shallowmark.attacks.methods_report import run

    run(Path(args.out), n_null=args.n_null, n_ident=args.n_ident, n_fidelity=args.n_fidelity,
        n_nullspace=args.n_nullspace, log=log, command=args.invocation)
    print_report(args.out)
    return 0


def _cmd_bench_key_scan(args) -> int:
    need("bench", "bench-key-scan")
    from shallowmark.attacks import key_scan

    kw = dict(candidates=key_scan.DEFAULT_CANDIDATES[:2], n=2, attacks=("clean", "jpeg"), n_user=1) if args.quick else {}
    key_scan.run(Path(args.out), **{"n": args.n, **kw}, log=log, command=args.invocation)
    print_report(args.out)
    return 0


def _cmd_bench_calibration(args) -> int:
    need("server", "bench-calibration")
    from shallowmark.attacks.calibration import CalibrationConfig, run_calibration

    sources = tuple(args.photo_sources.split(",")) if args.photo_sources else None
    options = _method_options([f"{args.method}:{o}" for o in args.method_option]).get(args.method, {})
    cfg = CalibrationConfig(method=args.method, n_generated=args.n_generated, photo_sources=sources,
                            photos_per_source=args.photos_per_source, attacks=tuple(args.attacks.split(",")),
                            n_keys=args.n_keys, method_options=options)
    run_calibration(cfg, Path(args.out), log=log)
    print_report(args.out)
    return 0


def _cmd_bench_photos(args) -> int:
    need("server", "bench-photos")
    from shallowmark.attacks import photos_report

    method = photos_report.PhotoScenarioConfig.method
    options = _method_options([f"{method}:{o}" for o in args.method_option]).get(method)
    cfg = photos_report.PhotoScenarioConfig(n=args.n, sources=tuple(args.sources.split(",")) if args.sources else None,
                                            cache_dir=args.cache, method_options=options)
    photos_report.run(cfg, Path(args.out), log=log, command=args.invocation)
    print_report(args.out)
    return 0


def _cmd_bench_identify(args) -> int:
    need("server", "bench-identify")
    from shallowmark.attacks import identify_report

    method = identify_report.IdentifyConfig.method
    options = _method_options([f"{method}:{o}" for o in args.method_option]).get(method, {})
    cfg = identify_report.IdentifyConfig(n_marked=args.n, sizes=tuple(int(s) for s in args.sizes.split(",")),
                                         attacks=tuple(args.attacks.split(",")), n_generated_negatives=args.n_negatives,
                                         photos_per_source=args.photos_per_source, method_options=options)
    identify_report.run(cfg, Path(args.out), log=log, command=args.invocation)
    print_report(args.out)
    return 0


def _cmd_bench_sizes(args) -> int:
    need("server", "bench-sizes")
    from shallowmark.attacks import sizes_report

    sizes_report.run(Path(args.out), log=log, command=args.invocation)
    print_report(args.out)
    return 0


def _bench_options(args, parse_attacks) -> dict:
    """The BenchConfig fields the flags set (unset flags keep the config's defaults)."""
    kw = {}
    if args.methods is not None:
        kw["methods"] = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if args.attacks is not None:
        kw["attacks"] = parse_attacks(args.attacks)
    for name in ("n", "seed", "batch", "target_fpr"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.method_attacks:
        kw["method_attacks"] = _method_attacks(args.method_attacks)
    if args.method_option:
        kw["method_config"] = _method_options(args.method_option)
    if args.keys is not None:
        kw["n_keys"] = args.keys
    if args.steps is not None:
        kw["num_steps"] = args.steps
    for name in ("model", "positives", "negatives", "executor", "workers", "dask_address"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    kw.update(out_dir=args.out, cache_dir=args.cache, server=args.server, command=args.invocation)
    return kw


def _method_attacks(specs: list[str]) -> dict:
    """``["tree-ring,ringid=clean,jpeg", ...]`` -> ``{"tree-ring": ("clean", "jpeg"), ...}``. The
    names are checked with the rest of the config; the shape of each flag here."""
    from shallowmark.errors import InvalidParameterError

    out: dict = {}
    for spec in specs:
        methods, sep, attacks = spec.partition("=")
        names = [m.strip() for m in methods.split(",") if m.strip()]
        subset = tuple(a.strip() for a in attacks.split(",") if a.strip())
        if not sep or not names or not subset:
            raise InvalidParameterError(f"--method-attacks {spec!r}: write METHODS=ATTACKS, e.g. "
                                        "tree-ring,ringid=clean,jpeg,blur")
        for m in names:
            if m in out:
                raise InvalidParameterError(f"--method-attacks names {m!r} twice")
            out[m] = subset
    return out


def _method_options(specs: list[str]) -> dict:
    """``["shallow-diffuse:key_variants=16", ...]`` -> ``{"shallow-diffuse": {"key_variants": 16}}``.
    Method names and option names are checked with the rest of the config; the shape here."""
    import json

    from shallowmark.errors import InvalidParameterError

    out: dict = {}
    for spec in specs:
        method, sep, assignment = spec.partition(":")
        key, eq, value = assignment.partition("=")
        if not sep or not eq or not method.strip() or not key.strip():
            raise InvalidParameterError(f"--method-option {spec!r}: write METHOD:KEY=VALUE, e.g. "
                                        "shallow-diffuse:key_variants=16")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        out.setdefault(method.strip(), {})[key.strip()] = parsed
    return out


def _cmd_bench(args) -> int:
    if args.server is None:  # server mode runs without torch: the server has the model
        need("core", "bench")
    from shallowmark.attacks.bench import BenchConfig, parse_attacks, run_bench

    kw = _bench_options(args, parse_attacks)
    config = BenchConfig.quick_config(**kw) if args.quick else BenchConfig(**kw)
    if args.server is None:
        run_bench(config, progress=not args.no_progress, log=log)
    else:
        from shallowmark.attacks.bench import validate_config

        validate_config(config)  # names and numbers first: a typo costs no connection
        with make_client(args) as c:
            run_bench(config, progress=not args.no_progress, log=log, client=c)
    print_report(args.out)
    return 0
