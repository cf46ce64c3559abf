"""The ``shallowmark`` command line.

The SDK must stay importable without torch, so every subcommand that needs the model stack
imports it lazily, and a missing extra is reported with the pip command that installs it.

One module per command group, each with the parsers of its subcommands and their functions:
:mod:`.models` (models, train-default), :mod:`.bench` (bench, bench-core, bench-methods,
bench-key-scan), :mod:`.photos` (fetch-photos), :mod:`.analyze` (analyze, edit), :mod:`.service`
(serve, embed, verify, loadtest, soak), :mod:`.keys` (keys), :mod:`.demo` (demo); :mod:`._common` holds
what they share.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from shallowmark.cli import analyze, bench, demo, keys, models, photos, service
from shallowmark.errors import ShallowmarkError

# Who registers which subcommands, in the order `shallowmark --help` lists them.
_REGISTER = (models.register, bench.register, photos.register, analyze.register, service.register_serve,
             keys.register, service.register_client, service.register_loadtest,
             service.register_soak, demo.register)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shallowmark", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for register in _REGISTER:
        register(sub)
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
