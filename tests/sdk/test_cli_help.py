"""Every command's ``--help`` prints its usage: argparse expands ``%`` in help strings, so a bare
``%`` in any of them (as "99 %-energy" was) makes that command's help a TypeError traceback."""
import argparse

import pytest

from shallowmark.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, path + (name,))


COMMANDS = [path for path, _ in _parsers(build_parser())]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "shallowmark")
def test_help_prints_usage(path, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*path, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: shallowmark")


def test_every_command_is_walked():
    assert ("analyze",) in COMMANDS and ("bench",) in COMMANDS and len(COMMANDS) > 10
