"""gRPC health check of a shallowmark server from inside its container (Docker HEALTHCHECK, Kubernetes
exec probe: the native ``grpc:`` probe of Kubernetes speaks plaintext, or TLS without verification
from the 1.37 API on, so a TLS server needs this).

Exit 0 when ``grpc.health.v1.Health/Check`` answers SERVING for the service, 1 otherwise: NOT_SERVING
while the models load or after the ledger was found corrupt, UNAVAILABLE while draining, no answer.
With ``--alive`` (a liveness probe) any status counts: the process answers, and a NOT_SERVING
replica is the readiness probe's business, not a reason to restart it.

The port and whether TLS is on are read from the server's own config file, so the probe cannot drift
from it. The TLS flags default to environment variables, so that the image's fixed HEALTHCHECK can be
pointed at a CA with ``docker run -e SHALLOWMARK_HEALTH_CA=...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shallowmark.server.config import load_config


def parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=env("SHALLOWMARK_CONFIG", "/etc/shallowmark/config/server.toml"))
    p.add_argument("--service", default="shallowmark.v1.Watermark", help='"" asks for the whole server')
    p.add_argument("--ca", default=env("SHALLOWMARK_HEALTH_CA"), help="CA (PEM) of the server's certificate")
    p.add_argument("--server-name", default=env("SHALLOWMARK_HEALTH_SERVER_NAME", "localhost"),
                   help="a name the server's certificate carries (the probe dials 127.0.0.1)")
    p.add_argument("--client-cert", default=env("SHALLOWMARK_HEALTH_CLIENT_CERT"), help="for mTLS (client_ca)")
    p.add_argument("--client-key", default=env("SHALLOWMARK_HEALTH_CLIENT_KEY"))
    p.add_argument("--alive", action="store_true", help="exit 0 on any status (liveness)")
    p.add_argument("--timeout", type=float, default=3.0)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)

    cfg = load_config(a.config)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::", "[::]") else cfg.host
    target = f"[{host}]:{cfg.port}" if ":" in host and not host.startswith("[") else f"{host}:{cfg.port}"
    if cfg.tls is None:
        channel = grpc.insecure_channel(target)
    elif not a.ca or bool(a.client_cert) != bool(a.client_key):
        print(f"{a.config} has [tls]: give --ca (or SHALLOWMARK_HEALTH_CA), and for mTLS both --client-cert "
              "and --client-key", file=sys.stderr)
        return 1
    else:
        pair = [Path(f).read_bytes() for f in (a.client_key, a.client_cert)] if a.client_cert else [None, None]
        creds = grpc.ssl_channel_credentials(Path(a.ca).read_bytes(), *pair)
        channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", a.server_name)])
    with channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=a.service), timeout=a.timeout).status
        except grpc.RpcError as e:
            print(f"{target}: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if a.alive or status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
