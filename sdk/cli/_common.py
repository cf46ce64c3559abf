"""What the command modules share: the import guard for optional extras, the keystore passphrase,
the connection to a server, and printing."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shallowmark.errors import MissingDependencyError, ShallowmarkError


def need(extra: str, feature: str):
    """Import guard for subcommands that need an optional extra."""
    try:
        import torch  # noqa: F401
        import diffusers  # noqa: F401
        if extra == "server":
            import grpc_health  # noqa: F401
            import prometheus_client  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(feature, extra, e)


def log(message: str) -> None:
    """Progress lines of the long commands, flushed as they come."""
    print(message, flush=True)


def print_report(folder) -> None:
    """Print the report.md a command wrote into ``folder``."""
    print(Path(folder, "report.md").read_text())


def passphrase(confirm: bool = False) -> str:
    """The keystore passphrase: $SHALLOWMARK_PASSPHRASE, else asked on the terminal."""
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


def connection_flags(p) -> None:
    """Token, TLS and timeout flags of every command that talks to a server (read by :func:`make_client`)."""
    p.add_argument("--token", help="bearer token (default $SHALLOWMARK_TOKEN; prefer the variable: "
                                   "a flag shows in the process list)")
    p.add_argument("--tls", action="store_true", help="TLS with the system root certificates")
    p.add_argument("--ca", help="CA certificate (PEM) of the server; implies TLS")
    p.add_argument("--client-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--client-key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per call, retries included")


def make_client(args):
    """A :class:`~shallowmark.client.Client` for ``args.server`` with the :func:`connection_flags`."""
    from shallowmark.client import Client

    return Client(args.server, token=args.token or os.environ.get("SHALLOWMARK_TOKEN"),
                  tls=True if args.tls else None, root_certificates=args.ca, client_cert=args.client_cert,
                  client_key=args.client_key, timeout=args.timeout)
