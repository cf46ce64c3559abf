"""The service commands: ``serve`` (the gRPC server), ``embed`` and ``verify`` (clients of a server,
with a keystore), ``loadtest`` (throughput and latency of a local server) and ``soak`` (a long mixed run:
errors, latency and server memory over time)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from shallowmark.cli._common import connection_flags, log, make_client, need, passphrase, print_report
from shallowmark.errors import ShallowmarkError


# -- serve -----------------------------------------------------------------------------------------
def register_serve(sub) -> None:
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
    s.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (default: off; 0 picks a free port)")
    s.add_argument("--metrics-host", help="where the metrics endpoint listens (default 127.0.0.1)")
    s.add_argument("--log-format", choices=("text", "json"),
                   help="text (default) or json: one JSON object per line, with request ids")
    s.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    need("server", "serve")
    import logging
    import secrets

    from shallowmark.client import is_loopback_host
    from shallowmark.server.app import serve
    from shallowmark.server.config import load_config
    from shallowmark.server.logs import configure_logging

    overrides = dict(host=args.host, port=args.port, device=args.device,
                     models=tuple(args.model) if args.model else None,
                     state_dir=Path(args.state_dir) if args.state_dir else None, ledger_url=args.ledger_url,
                     max_batch=args.max_batch, batching=False if args.no_batching else None,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host, log_format=args.log_format)
    dev_token = None
    if args.config is None:
        # Development mode: loopback only, one fresh token per start, tiny-ldm unless --model says otherwise.
        # Checked before the config is built, whose own refusal would point at allow_insecure, a config key.
        if args.host is not None and not is_loopback_host(args.host):
            raise ShallowmarkError(f"without --config the server listens on loopback only (localhost, 127.0.0.0/8, "
                                   f"::1), not {args.host!r}; write a config file (tokens, TLS) to listen on "
                                   "other interfaces")
        dev_token = secrets.token_urlsafe(24)
        overrides["tokens"] = {dev_token: "dev"}
    cfg = load_config(args.config, **overrides)
    configure_logging(cfg.log_format, level=logging.INFO)

    def ready(app):
        print(f"shallowmark server on {app.address} ({'TLS' if cfg.tls else 'plaintext'}); "
              f"models {', '.join(cfg.models)} loading in the background", flush=True)
        if app.metrics_port is not None:
            print(f"metrics on {app.metrics_exporter.url}", flush=True)
        print(f"attestation public key (pin it: shallowmark verify --trusted-key ...): "
              f"{app.signer.public_key_raw.hex()}", flush=True)
        if dev_token:
            print(f"development token (tenant 'dev'): {dev_token}\n"
                  f"  export SHALLOWMARK_TOKEN={dev_token}", flush=True)

    serve(cfg, on_ready=ready)
    return 0


# -- embed / verify (client side) ------------------------------------------------------------------
def _client_flags(p) -> None:
    p.add_argument("--server", default=os.environ.get("SHALLOWMARK_SERVER", "127.0.0.1:50051"),
                   help="server address host:port (default $SHALLOWMARK_SERVER or 127.0.0.1:50051)")
    p.add_argument("--keystore", required=True)
    connection_flags(p)
    p.add_argument("--model", help="server model (default: the server's default)")


def register_client(sub) -> None:
    e = sub.add_parser("embed", help="watermark an image through a server")
    _client_flags(e)
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
    _client_flags(v)
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--method", action="append", help="method(s) to check (repeatable; default shallow-diffuse)")
    v.add_argument("--target-fpr", type=float, default=0.01)
    att = v.add_mutually_exclusive_group()
    att.add_argument("--trusted-key", metavar="KEY|FILE",
                     help="the server's attestation public key you pinned (hex, base64, or a file holding it "
                          "as PEM, raw bytes, hex or base64; `shallowmark serve` prints it at start). "
                          "Required unless --no-attestation-check")
    att.add_argument("--no-attestation-check", action="store_true",
                     help="do not check the server's signature on the results (they are then only as "
                          "trustworthy as the connection); the output says so")
    v.add_argument("--json", action="store_true", help="one JSON object per image")
    v.set_defaults(func=_cmd_verify)


def _cmd_embed(args) -> int:
    from shallowmark.keystore import Keystore

    ks = Keystore.open(args.keystore, passphrase())
    key = ks.get(args.key) if args.key else ks.active()
    if args.image is None and args.seed is None:
        raise ShallowmarkError("give --seed N (with an optional --prompt) to generate, or --image FILE to watermark")
    if args.output and args.image is None:
        raise ShallowmarkError("--output applies to --image (a marked upload), not to --seed")
    with make_client(args) as c:
        if args.image is not None:
            res = c.embed(key, method=args.method, model=args.model or "", image=Path(args.image), output=args.output)
        else:
            res = c.embed(key, method=args.method, model=args.model or "", seed=args.seed, prompt=args.prompt)
    res.save(args.out)
    # the server names the key by the commitment it derives from the material; print the keystore's id
    # (what `keys list` shows) and keep the server's one beside it, as the ledger holds that
    info = dict(out=str(args.out), key_id=key.key_id, server_key_id=res.key_id, method=res.method, model=res.model,
                image_sha256=res.image_sha256, request_id=res.request_id, notes=list(res.notes))
    if args.json:
        print(json.dumps(info))
    else:
        print(f"wrote {args.out}: key {key.key_id}, {res.method} on {res.model}, sha256 {res.image_sha256}")
        for n in res.notes:
            print(f"  note: {n}")
    return 0


def _print_verdict(f: str, res, as_json: bool, keystore_ids: dict[str, str], attested: bool) -> None:
    best = res.best
    # results name keys by their per-method commitment; show the keystore's id, which users look up
    kid = keystore_ids.get(res.identified_key_id or "", res.identified_key_id)
    if as_json:
        # attested: the attestation was checked against the pinned key before this line is printed
        # (_cmd_verify); False only with --no-attestation-check
        print(json.dumps({"file": f, **res.to_dict(), "key_id": kid, "server_key_id": res.identified_key_id,
                          "attested": attested}), flush=True)
        return
    unchecked = "" if attested else " [attestation not checked]"
    if res.detected:
        print(f"{f}: watermarked with {kid} ({best.method}, p={best.p_value:.3g}, "
              f"corrected p={best.p_value_corrected:.3g}){unchecked}", flush=True)
    else:
        print(f"{f}: no watermark from these keys (best p={best.p_value_corrected:.3g} corrected, "
              f"target FPR {res.target_fpr:g}){unchecked}", flush=True)


def _trusted_key(value: str):
    """The pinned key of ``--trusted-key``: the value itself (hex, base64, PEM) or a file holding it."""
    from shallowmark.attestation import load_public_key

    path = Path(value)
    if len(value) < 4096 and path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ShallowmarkError(f"--trusted-key: cannot read {value}: {e}") from None
        if len(data) != 32 and not data.lstrip().startswith(b"-----BEGIN"):
            try:
                data = data.decode("ascii").strip()   # hex or base64 text
            except UnicodeDecodeError:
                pass
        source = value
    else:
        data, source = value, "the value given"
    try:
        return load_public_key(data)
    except ShallowmarkError as e:
        raise ShallowmarkError(f"--trusted-key ({source}): {e}") from None


def _cmd_verify(args) -> int:
    from shallowmark.attestation import verify_attestation
    from shallowmark.keystore import Keystore

    if args.no_attestation_check:
        trusted = None
        print("shallowmark verify: --no-attestation-check: the server's signatures on these results are "
              "NOT checked", file=sys.stderr, flush=True)
    elif args.trusted_key:
        trusted = _trusted_key(args.trusted_key)
    else:
        raise ShallowmarkError("verify checks the server's signed attestation against a key you pinned: give "
                               "--trusted-key KEY|FILE (the attestation public key `shallowmark serve` prints, "
                               "or your operator gives you), or --no-attestation-check to skip the check")
    ks = Keystore.open(args.keystore, passphrase())
    methods = args.method or ["shallow-diffuse"]
    keys = [k.for_method(m) for k in ks.verification_keys() for m in methods]
    keystore_ids = {mk.commitment: mk.key_id for mk in keys}
    failed = 0
    with make_client(args) as c:
        for f in args.files:
            try:
                data = Path(f).read_bytes()
                res = c.verify(data, keys, target_fpr=args.target_fpr, model=args.model or "")
                if trusted is not None:
                    verify_attestation(res, trusted, image=data)
            except (OSError, ShallowmarkError) as e:
                failed += 1
                if args.json:
                    print(json.dumps({"file": f, "error": str(e)}), flush=True)
                else:
                    print(f"{f}: error: {e}", file=sys.stderr, flush=True)
                continue
            _print_verdict(f, res, args.json, keystore_ids, attested=trusted is not None)
    return 2 if failed else 0


# -- loadtest --------------------------------------------------------------------------------------
def register_loadtest(sub) -> None:
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
    lt.add_argument("--isolation", choices=("threads", "processes"), default="threads",
                    help="threads: two servers (batching on and off) and their client threads in this process "
                         "(default); processes: one server in a subprocess and the clients in processes of their "
                         "own, against the in-process rate (default --out docs/benchmarks/service/processes)")
    lt.add_argument("--client-processes", type=int, help="processes the clients are spread over (default 4; "
                                                         "--isolation processes)")
    lt.add_argument("--profile", type=float, metavar="SECONDS",
                    help="sample the server with py-spy for this long at the largest client count "
                         "(--isolation processes; py-spy is in the dev extra)")
    lt.set_defaults(func=_cmd_loadtest)


def _loadtest_options(args) -> dict:
    """The LoadtestConfig fields the flags set, checked (unset flags keep the config's defaults)."""
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
    return kw


def _cmd_loadtest(args) -> int:
    need("server", "loadtest")
    from shallowmark.server.loadtest import LoadtestConfig, run_loadtest

    kw = _loadtest_options(args)
    if args.isolation == "processes":
        from shallowmark.server import loadtest_processes as lp

        if args.client_processes is not None:
            if args.client_processes < 1:
                raise ShallowmarkError("--client-processes needs a positive integer")
            kw["client_processes"] = args.client_processes
        if args.profile is not None:
            if not args.profile > 0:
                raise ShallowmarkError(f"--profile needs a number of seconds > 0; got {args.profile}")
            kw["profile_s"] = args.profile
        cfg = lp.ProcessLoadConfig.quick_config(**kw) if args.quick else lp.ProcessLoadConfig(**kw)
        out = args.out if args.out != "docs/benchmarks/service" else "docs/benchmarks/service/processes"
        lp.run(out, cfg, command=args.invocation, log=log)
        print_report(out)
        return 0
    if args.client_processes is not None or args.profile is not None:
        raise ShallowmarkError("--client-processes and --profile go with --isolation processes")
    cfg = LoadtestConfig.quick_config(**kw) if args.quick else LoadtestConfig(**kw)
    run_loadtest(args.out, cfg, command=args.invocation, log=log)
    print_report(args.out)
    return 0


# -- soak ------------------------------------------------------------------------------------------
def register_soak(sub) -> None:
    sk = sub.add_parser("soak", help="a long mixed Embed/Verify run against one local server (a subprocess): "
                                     "errors by status, p50/p99 and server RSS over time; writes report.md and "
                                     "report.json")
    sk.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    sk.add_argument("--clients", type=int, default=16, help="concurrent client threads (default 16)")
    sk.add_argument("--out", default="docs/reliability/soak")
    sk.add_argument("--steps", type=int, help="DDIM steps of shallow-diffuse (default 10)")
    sk.add_argument("--threads", type=int, help="torch threads of the server (default 1)")
    sk.add_argument("--device", help="torch device of the server (default cpu)")
    sk.set_defaults(func=_cmd_soak)


def _cmd_soak(args) -> int:
    need("server", "soak")
    from shallowmark.server.soak import SoakConfig, run_soak

    if not args.duration > 0:
        raise ShallowmarkError(f"--duration needs a number of seconds > 0; got {args.duration}")
    for name in ("clients", "steps", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ShallowmarkError(f"--{name} needs a positive integer")
    kw = dict(duration_s=args.duration, clients=args.clients)
    for name, field in (("steps", "num_steps"), ("threads", "threads"), ("device", "device")):
        if getattr(args, name) is not None:
            kw[field] = getattr(args, name)
    run_soak(args.out, SoakConfig(**kw), command=args.invocation, log=log)
    print_report(args.out)
    return 0
