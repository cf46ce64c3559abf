"""Server configuration: one typed dataclass, loaded from a TOML file and/or command-line flags.

Example ``server.toml`` (every key is optional; the values shown are the defaults unless noted)::

    host = "127.0.0.1"              # "0.0.0.0" or "[::]" to listen on every interface (needs [tls])
    allow_insecure = false          # true: plaintext on a non-loopback host (behind a TLS proxy only)
    port = 50051
    models = ["tiny-ldm"]           # the first is the default model
    device = "cpu"                  # torch device for the models, e.g. "cuda"
    max_message_bytes = 16777216    # grpc.max_receive_message_length (16 MiB)
    max_image_pixels = 16777216     # width x height, checked before decoding (4096 x 4096)
    max_decode_bytes = 67108864     # width x height x samples x bytes per sample, from the header (64 MiB)
    max_batch = 8                   # most requests run together as one model batch
    batching = true                 # micro-batching of concurrent Verify / Embed-generate calls
    max_wait_ms = 5.0               # how long the first request of a batch waits for company
    vae_batch = 0                   # images per autoencoder call inside a batch; 0: 1 on CPU, all elsewhere
    max_keys_per_verify = 100000    # keys searched, key family members counted
    max_queue = 32                  # model jobs waiting or running; beyond it RESOURCE_EXHAUSTED
    workers = 8                     # Watermark calls in flight at once; beyond it RESOURCE_EXHAUSTED at once
    max_streams = 4                 # reflection and health Watch streams open at once
    grace_s = 30.0                  # drain time on SIGTERM
    state_dir = "~/.local/state/shallowmark"
    ledger_url = "sqlite:////var/lib/shallowmark/ledger.sqlite3"  # or a plain path; default: <state_dir>/ledger.sqlite3
    # ledger_url = "postgresql://shallowmark@db.internal:5432/shallowmark"  # PostgreSQL (replicas share it);
    #                                     password from PGPASSWORD or ~/.pgpass, so the file holds no secret
    # ledger_head_file = "/var/lib/shallowmark/ledger-pg.head"  # PostgreSQL only: this replica's record of the
    #                                     newest acknowledged chain head (detects a restore of an older backup);
    #                                     default: <state_dir>/ledger-pg-<dbname>-<hash of host, port, dbname>.head
    attestation_key = "/var/lib/shallowmark/attestation.pem"      # default: <state_dir>/attestation_ed25519.pem
    metrics_port = 9464             # Prometheus metrics on http://metrics_host:9464/metrics (default: off; 0: a free port)
    metrics_host = "127.0.0.1"      # "0.0.0.0" for a scraper on another machine (plain HTTP, no token)
    log_format = "text"             # or "json": one JSON object per line (shallowmark serve)

    [tls]                           # omit the table for plaintext: loopback only, unless allow_insecure
    cert = "/etc/shallowmark/server.crt"
    key = "/etc/shallowmark/server.key"
    client_ca = "/etc/shallowmark/clients-ca.crt"   # set it to require client certificates (mTLS)

    [tokens]                        # bearer token -> tenant
    "sha256:9f86d081884c7d65..." = "acme"   # preferred: the SHA-256 of the token, so the file holds no secret
    "dev-token-123" = "local"               # a plain token also works

    [tenant_limits."*"]             # every tenant without its own table (omit: no per-tenant limits)
    rate = 10.0                     # requests per second, refilled continuously (0: no rate limit)
    burst = 20                      # requests at once after a quiet spell (default: rate, at least 1)
    max_in_flight = 4               # the tenant's calls in flight at once (0: only the server's workers)
    [tenant_limits.acme]            # a tenant of [tokens]: replaces "*" for it
    rate = 50.0

    [methods.shallow-diffuse]       # keyword arguments for load_method(name, backend, **options)
    num_steps = 50

    [model.stable-diffusion]        # keyword arguments for load_backend(name, **options)
    model = "/models/sd-1.5"

Relative paths in the file are resolved against the file's folder. Command-line flags
(``shallowmark serve --port ...``) override the file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from shallowmark.client import is_loopback_host
from shallowmark.errors import InvalidParameterError, check_int

__all__ = ["ServerConfig", "TLSConfig", "TenantLimits", "load_config", "token_digest", "ALL_TENANTS"]

#: The ``tenant_limits`` entry that applies to every tenant without one of its own.
ALL_TENANTS = "*"


def token_digest(token: str) -> str:
    """``"sha256:<hex>"`` of a bearer token, the form to put in ``[tokens]`` instead of the token."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TLSConfig:
    """Server TLS. With ``client_ca`` set, clients must present a certificate signed by it (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class TenantLimits:
    """One tenant's share of the server (see ``ServerConfig.tenant_limits``).

    Attributes:
        rate: requests per second the tenant may send, as a token bucket refilled continuously;
            0 means no rate limit.
        burst: the bucket's size: requests the tenant may send at once after a quiet spell.
            0 (the default) means ``rate`` rounded up, at least 1.
        max_in_flight: the tenant's calls in flight at once; 0 means only the server's ``workers``
            bound them.
    """

    rate: float = 0.0
    burst: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, (int, float)) or not 0 <= self.rate < float("inf"):
            raise InvalidParameterError(f"tenant_limits rate must be a number of requests per second >= 0 "
                                        f"(0: no rate limit); got {self.rate!r}")
        check_int("tenant_limits burst (0: the rate, at least 1)", self.burst, 0)
        check_int("tenant_limits max_in_flight (0: no per-tenant bound)", self.max_in_flight, 0)
        if self.burst and not self.rate:
            raise InvalidParameterError("tenant_limits burst needs a rate (requests per second) to refill the bucket")

    @property
    def bucket(self) -> int:
        """The token bucket's size (``burst``, or the rate rounded up, at least 1)."""
        return self.burst or max(1, -int(-self.rate // 1))


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``shallowmark serve`` needs. Build with :func:`load_config` or directly.

    Attributes:
        host, port: where to listen. ``port=0`` picks a free port (see ``ServerApp.port``).
            Without ``tls`` the host must be a loopback one (``localhost``, 127.0.0.0/8, ``::1``)
            unless ``allow_insecure`` is set.
        allow_insecure: allow plaintext on a non-loopback host (``0.0.0.0``, a LAN address).
            Bearer tokens, keys and images then cross the network unencrypted, so set it only
            when a TLS-terminating proxy or an encrypted overlay network sits in front; the server
            logs a warning at start. Off by default: such a config is refused.
        tokens: bearer token (or ``"sha256:<hex>"`` of it) -> tenant name. Empty means every call
            on the Watermark service is refused with UNAUTHENTICATED.
        tls: certificate and key for TLS, and optionally the client CA for mutual TLS.
        models: backend names to load (see ``shallowmark models``); the first is the default.
        model_options: per model, keyword arguments for ``load_backend`` (e.g. a Stable Diffusion path).
        method_options: per method, keyword arguments for ``load_method`` (e.g. ``num_steps``).
        device: torch device for the models.
        max_message_bytes: ``grpc.max_receive_message_length`` and send length.
        max_image_pixels: largest image accepted (width x height), checked before decoding.
        max_decode_bytes: largest decoded image accepted, width x height x samples per pixel x
            bytes per sample as the file's header declares them (PNG IHDR bit depth and colour
            type, JPEG frame header), checked before decoding. A small file can declare a large
            16-bit image whose decoding costs seconds and hundreds of MB; the default (64 MiB)
            takes an 8-bit RGBA image of ``max_image_pixels``, but not a 16-bit RGB one.
        max_batch: most requests run together as one model batch (reported in GetInfo).
        batching: micro-batching on (see :mod:`shallowmark.server.batching`): concurrent Verify
            calls, and Embed calls that generate, for the same model and method run as one batched
            model call. Off: one request per model call, in arrival order.
        max_wait_ms: how long a batch waits for company before it runs anyway, counted from its
            first request's arrival or from the end of the previous batch, whichever is later.
            Requests that arrive while the model is busy join the next batch.
        vae_batch: most images per autoencoder (VAE) call inside a batch; the denoiser always gets
            the whole batch. 0 (the default) means 1 on a CPU, where batched VAE calls cost more per
            image than single ones, and the whole batch on other devices.
        max_keys_per_verify: most keys one Verify searches, every member of a key family counted
            (at most 1024 entries are sent; more keys go as a family). Scoring 100 000 ring keys
            costs no model evaluation, about 1 s of CPU per image on this project's reference machine
            (docs/benchmarks/identification).
        max_queue: model jobs waiting or running at once; more get RESOURCE_EXHAUSTED. The jobs
            belong to calls in flight, so this binds only when it is below ``workers``.
        workers: Watermark calls in flight at once (admitted: decoding, waiting for the model or
            running). Each has a handler thread of its own, so no call waits unseen in gRPC's
            queue: a call beyond them is refused with RESOURCE_EXHAUSTED on arrival, before its
            image is decoded. Health checks, reflection and those refusals run on threads of their
            own (``max_streams`` plus a few), so they answer at once under full load.
        max_streams: reflection and health ``Watch`` streams open at once (each holds a thread
            while open); more get RESOURCE_EXHAUSTED.
        tenant_limits: tenant (a name in ``tokens``, or ``"*"`` for every tenant without an entry)
            -> :class:`TenantLimits` (or a table with its keys ``rate``, ``burst``,
            ``max_in_flight``). A call over its tenant's rate gets RESOURCE_EXHAUSTED saying when
            to retry; a call beyond the tenant's ``max_in_flight`` gets RESOURCE_EXHAUSTED naming
            that limit. Both are checked on arrival, before the server's ``workers`` bound, and
            apply to every Watermark RPC. Empty (the default): no per-tenant limits.
        grace_s: seconds to let in-flight calls finish after SIGTERM.
        state_dir: where the default ledger and attestation key live.
        ledger_url: ``sqlite:////abs/path``, ``sqlite:///rel/path`` or a plain path (one SQLite
            file), or a libpq URL ``postgresql://user@host:port/dbname`` (or ``postgres://``) for a
            PostgreSQL table that several replicas can share (see :mod:`shallowmark.server.ledger`).
        ledger_head_file: PostgreSQL ledger only: this server's local head file, where it keeps
            the newest head of the ledger's hash chain (record count and last link) it has seen
            acknowledged, written (0600, fsynced, atomic rename, in a folder created 0700) after
            each insert commits and before the Embed is answered. At start the database must hold
            that head; a database restored to an older state is refused
            (``LedgerIntegrityError``), one that other replicas moved ahead is fine. ``None`` (the
            default): ``<state_dir>/ledger-pg-<dbname>-<12 hex>.head``, the hex a hash of the URL's
            host, port and database name, so two ledgers never share one
            (:func:`shallowmark.server.ledger.pg_head_file`). A missing file is written from the
            database as it is (first start, a new replica); deleting it is how the operator accepts
            a database that was rolled back. Each replica needs its own: do not share the state
            folder between replicas. Setting it with a SQLite ledger is an error: that one's head is
            always ``<ledger file>.head``.
        attestation_key: Ed25519 private key file (PEM); created with mode 0600 if missing.
        reflection: serve gRPC reflection (for grpcurl and friends).
        metrics_port: serve Prometheus metrics (``GET /metrics``, plain HTTP) on this port;
            ``None`` (the default; in TOML: leave the key out) serves none, ``0`` picks a free port
            (read it back from ``ServerApp.metrics_port``), as ``port=0`` does for gRPC. The
            metrics are counted either way (``ServerApp.metrics.registry``). They carry no tenant,
            key, request id or image, only method names, status codes and counts; the endpoint
            has no token and no TLS, so keep it where only the scraper reaches it.
        metrics_host: where the metrics endpoint listens (default ``127.0.0.1``; ``0.0.0.0`` or
            ``::`` for a scraper on another machine). Not bound by the loopback rule of ``host``:
            nothing secret crosses it.
        log_format: ``"text"`` (the default: ``time LEVEL logger: message``) or ``"json"`` (one
            JSON object per line: time, level, logger, message, and request_id, rpc, tenant,
            status, duration_ms where known). ``shallowmark serve`` sets up the process's logging
            with it (:func:`shallowmark.server.logs.configure_logging`); a program that embeds
            :class:`~shallowmark.server.app.ServerApp` keeps its own logging. Every call's request
            id (the caller's sane ``x-request-id``, else a fresh one) is on each of its log lines
            and comes back in the trailing metadata as ``x-request-id``.
    """

    host: str = "127.0.0.1"
    port: int = 50051
    allow_insecure: bool = False
    tokens: Mapping[str, str] = field(default_factory=dict)
    tls: TLSConfig | None = None
    models: tuple[str, ...] = ("tiny-ldm",)
    model_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    max_message_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_decode_bytes: int = 64 * 1024 * 1024
    max_batch: int = 8
    batching: bool = True
    max_wait_ms: float = 5.0
    vae_batch: int = 0
    max_keys_per_verify: int = 100_000
    max_queue: int = 32
    workers: int = 8
    max_streams: int = 4
    tenant_limits: Mapping[str, TenantLimits] = field(default_factory=dict)
    grace_s: float = 30.0
    state_dir: Path = field(default_factory=lambda: Path("~/.local/state/shallowmark").expanduser())
    ledger_url: str | None = None
    ledger_head_file: Path | None = None
    attestation_key: Path | None = None
    reflection: bool = True
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    log_format: str = "text"

    def _check_method_options(self) -> None:
        """Refuse a method option the server could not apply, now rather than when a model loads in
        the background (where it would leave the model unavailable and the server never ready)."""
        from shallowmark.core.watermarks import config_fields, latent_method_names

        if not isinstance(self.method_options, Mapping):
            raise InvalidParameterError(f"method_options must map method names to option tables; got "
                                        f"{type(self.method_options).__name__}")
        for name, options in self.method_options.items():
            if name not in latent_method_names():
                raise InvalidParameterError(f"method_options: {name!r} takes no options here; methods with options: "
                                            f"{', '.join(latent_method_names())}")
            if not isinstance(options, Mapping):
                raise InvalidParameterError(f"method_options.{name} must be a table of options; got {options!r}")
            # the names here; the values need the model's latent shape, so load_method checks them
            valid = config_fields(name)
            unknown = sorted(set(options) - set(valid))
            if unknown:
                raise InvalidParameterError(f"method_options.{name}: unknown option(s) {unknown}; valid: "
                                            f"{', '.join(valid)}")

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise InvalidParameterError(f"port must be an int in 0..65535; got {self.port!r}")
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool) or not isinstance(
                self.metrics_port, int) or not 0 <= self.metrics_port <= 65535):
            raise InvalidParameterError(f"metrics_port must be an int in 0..65535 (0: a free port; leave it out for "
                                        f"no metrics endpoint); got {self.metrics_port!r}")
        if self.metrics_port and self.metrics_port == self.port:
            raise InvalidParameterError(f"metrics_port must differ from port (both {self.port}): the metrics are "
                                        "served over plain HTTP on a port of their own")
        if not isinstance(self.metrics_host, str) or not self.metrics_host.strip():
            raise InvalidParameterError(f"metrics_host must be a host name or IP address; got {self.metrics_host!r}")
        if self.log_format not in ("text", "json"):
            raise InvalidParameterError(f"log_format must be \"text\" or \"json\"; got {self.log_format!r}")
        for name in ("max_message_bytes", "max_image_pixels", "max_decode_bytes", "max_batch",
                     "max_keys_per_verify", "max_queue", "workers", "max_streams"):
            check_int(name, getattr(self, name), 1)
        if self.max_message_bytes < 1024:
            raise InvalidParameterError(f"max_message_bytes must be at least 1024; got {self.max_message_bytes}")
        if not isinstance(self.batching, bool):
            raise InvalidParameterError(f"batching must be true or false; got {self.batching!r}")
        if (isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float))
                or not 0 <= self.max_wait_ms <= 10_000):
            raise InvalidParameterError(f"max_wait_ms must be a number in 0..10000; got {self.max_wait_ms!r}")
        check_int("vae_batch (0: automatic)", self.vae_batch, 0)
        if not isinstance(self.grace_s, (int, float)) or self.grace_s < 0:
            raise InvalidParameterError(f"grace_s must be >= 0; got {self.grace_s!r}")
        if isinstance(self.models, str) or not self.models:
            raise InvalidParameterError(f"models must be a non-empty list of backend names; got {self.models!r}")
        object.__setattr__(self, "models", tuple(self.models))
        for tok, tenant in self.tokens.items():
            if not isinstance(tok, str) or not tok or not isinstance(tenant, str) or not tenant:
                raise InvalidParameterError("tokens must map non-empty token strings to non-empty tenant names")
            if tok.startswith("sha256:") and len(tok) != 7 + 64:
                raise InvalidParameterError("a hashed token must be 'sha256:' followed by 64 hex digits")
        object.__setattr__(self, "tenant_limits", self._checked_tenant_limits())
        self._check_method_options()
        object.__setattr__(self, "state_dir", Path(self.state_dir).expanduser())
        if self.ledger_head_file is not None:
            object.__setattr__(self, "ledger_head_file", Path(self.ledger_head_file).expanduser())
            if not _is_postgres(self.resolved_ledger_url()):
                # a SQLite ledger's head is always beside it; a file set here would be ignored silently
                raise InvalidParameterError(
                    "ledger_head_file applies to a PostgreSQL ledger only (ledger_url = \"postgresql://...\"); a "
                    "SQLite ledger keeps its head beside the file, in <ledger file>.head")
        if not isinstance(self.host, str) or not self.host.strip():
            raise InvalidParameterError(f"host must be a host name or IP address; got {self.host!r}")
        if not isinstance(self.allow_insecure, bool):
            raise InvalidParameterError(f"allow_insecure must be true or false; got {self.allow_insecure!r}")
        if self.tls is None and not self.allow_insecure and not is_loopback_host(self.host):
            raise InvalidParameterError(
                f"host {self.host!r} is not a loopback address and no [tls] is configured: bearer tokens, keys "
                "and images would cross the network in plaintext. Add a [tls] table (cert, key), listen on "
                "127.0.0.1, or set allow_insecure = true if a TLS-terminating proxy sits in front")

    def _checked_tenant_limits(self) -> dict[str, TenantLimits]:
        if not isinstance(self.tenant_limits, Mapping):
            raise InvalidParameterError("tenant_limits must map tenant names (or \"*\") to tables of rate, burst "
                                        f"and max_in_flight; got {self.tenant_limits!r}")
        known = set(self.tokens.values())
        out: dict[str, TenantLimits] = {}
        for tenant, lim in self.tenant_limits.items():
            if tenant != ALL_TENANTS and tenant not in known:
                # a typo would otherwise leave the tenant it meant unlimited, silently
                raise InvalidParameterError(
                    f"tenant_limits names tenant {tenant!r}, which no token in [tokens] maps to; known tenants: "
                    f"{', '.join(sorted(known)) or 'none'} (or \"*\" for every tenant)")
            if isinstance(lim, Mapping):
                bad = set(lim) - {f.name for f in fields(TenantLimits)}
                if bad:
                    raise InvalidParameterError(f"unknown key(s) in tenant_limits for {tenant!r}: "
                                                f"{', '.join(sorted(map(str, bad)))}; "
                                                "valid keys: burst, max_in_flight, rate")
                lim = TenantLimits(**lim)
            elif not isinstance(lim, TenantLimits):
                raise InvalidParameterError(f"tenant_limits for {tenant!r} must be a table of rate, burst and "
                                            f"max_in_flight; got {lim!r}")
            out[tenant] = lim
        return out

    def limits_for(self, tenant: str | None) -> TenantLimits | None:
        """The :class:`TenantLimits` that apply to ``tenant`` (its own, else ``"*"``), or ``None``."""
        lim = self.tenant_limits.get(tenant) if tenant is not None else None
        return lim if lim is not None else self.tenant_limits.get(ALL_TENANTS)

    @property
    def plaintext_off_loopback(self) -> bool:
        """Serving without TLS on a non-loopback host (only possible with ``allow_insecure``)."""
        return self.tls is None and not is_loopback_host(self.host)

    @property
    def default_model(self) -> str:
        return self.models[0]

    @property
    def address(self) -> str:
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def resolved_ledger_url(self) -> str:
        return self.ledger_url or f"sqlite:///{self.state_dir / 'ledger.sqlite3'}"

    def resolved_ledger_head_file(self) -> Path | None:
        """The PostgreSQL ledger's local head file (``ledger_head_file``, else one in ``state_dir``
        named after the database); ``None`` for a SQLite ledger.

        Raises:
            InvalidParameterError: ``ledger_url`` is not a valid PostgreSQL URL.
        """
        url = self.resolved_ledger_url()
        if not _is_postgres(url):
            return None
        if self.ledger_head_file is not None:
            return self.ledger_head_file
        from shallowmark.server.ledger import pg_head_file  # psycopg parses the URL

        return pg_head_file(url, self.state_dir)

    def resolved_attestation_key(self) -> Path:
        return Path(self.attestation_key) if self.attestation_key else self.state_dir / "attestation_ed25519.pem"

    def token_digests(self) -> dict[str, str]:
        """``"sha256:<hex>"`` -> tenant for every configured token (plain tokens are hashed here)."""
        return {(t.lower() if t.startswith("sha256:") else token_digest(t)): tenant
                for t, tenant in self.tokens.items()}

    def with_overrides(self, **overrides: Any) -> "ServerConfig":
        """A copy with the given fields replaced; ``None`` values are ignored (unset flags)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgres://", "postgresql://"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise InvalidParameterError("reading a TOML config on Python 3.10 needs 'tomli' (pip install tomli)") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise InvalidParameterError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidParameterError(f"config file {path} is not valid TOML: {e}") from None


def load_config(path: str | os.PathLike[str] | None = None, **overrides: Any) -> ServerConfig:
    """Read ``path`` (TOML; see the module docstring) and apply ``overrides`` (``None`` = unset).

    Raises:
        InvalidParameterError: unreadable file, unknown key (the message lists the valid ones), or
            a value out of range.
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = _read_toml(path)
        base = path.resolve().parent
        known = {f.name for f in fields(ServerConfig)}
        unknown = set(raw) - known - {"methods", "model"}
        if unknown:
            raise InvalidParameterError(f"unknown key(s) in {path}: {', '.join(sorted(unknown))}; "
                                        f"valid keys: {', '.join(sorted(known | {'methods', 'model'}))}")

        def rel(p: Any) -> Path:
            p = Path(str(p)).expanduser()
            return p if p.is_absolute() else base / p

        for k, v in raw.items():
            if k == "tls":
                if not isinstance(v, dict) or not {"cert", "key"} <= set(v) or set(v) - {"cert", "key", "client_ca"}:
                    raise InvalidParameterError(f"[tls] in {path} needs 'cert' and 'key' (and optionally 'client_ca')")
                data["tls"] = TLSConfig(cert=rel(v["cert"]), key=rel(v["key"]),
                                        client_ca=rel(v["client_ca"]) if v.get("client_ca") else None)
            elif k == "methods":
                data["method_options"] = {str(m): dict(o) for m, o in v.items()}
            elif k == "model":
                data["model_options"] = {str(m): dict(o) for m, o in v.items()}
            elif k in ("state_dir", "attestation_key", "ledger_head_file"):
                data[k] = rel(v)
            elif k == "ledger_url" and "://" not in str(v):
                data[k] = f"sqlite:///{rel(v)}"
            elif k == "ledger_url" and str(v).startswith("sqlite:///") and len(str(v)) > 10:
                data[k] = f"sqlite:///{rel(str(v)[10:])}"
            elif k == "models":
                data[k] = tuple(v)
            else:
                data[k] = v
    try:
        cfg = ServerConfig(**data)
    except TypeError as e:
        raise InvalidParameterError(f"bad config: {e}") from None
    return cfg.with_overrides(**overrides)
