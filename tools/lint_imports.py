"""Run import-linter on this checkout: the contracts in pyproject.toml's ``[tool.importlinter]``.

The installed package is spread over several folders (pyproject.toml's package-dir: ``shallowmark``
is sdk/, ``shallowmark.core`` is core/, ...), while import-linter finds a package's modules by
walking the one folder Python imports it from, so through the editable install it would see sdk/
alone. This script lays the sources out as one ``shallowmark`` folder (symbolic links by default,
copies with ``--copy``) in a temporary directory, puts that directory first on PYTHONPATH, and runs
``lint-imports`` from the same environment with the checkout's contracts:

    .venv/bin/python tools/lint_imports.py [--src DIR] [--copy] [lint-imports options...]

``--src`` takes another tree with the same layout (the tests use it on a modified copy). Exit
status: lint-imports' own (0 when every contract is kept).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "shallowmark"


def package_dirs(pyproject: Path) -> dict[str, str]:
    """pyproject.toml's ``[tool.setuptools] package-dir``: import name -> folder."""
    return tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]


def lay_out(src: Path, dest: Path, *, copy: bool = False, skip: tuple[str, ...] = ()) -> Path:
    """Make ``dest/shallowmark`` the importable package of the sources in ``src``, laid out as the
    package-dir of ``src/pyproject.toml`` says; returns ``dest``. ``copy`` copies the files instead
    of linking them; ``skip``: folders, relative to ``src``, left out (e.g. ``core/assets``)."""
    src, dest = Path(src).resolve(), Path(dest)
    skipped = {(src / s).resolve() for s in skip}

    def ignore(folder, names):
        return [n for n in names if n == "__pycache__" or (Path(folder) / n).resolve() in skipped]

    for name, folder in sorted(package_dirs(src / "pyproject.toml").items(), key=lambda kv: kv[0].count(".")):
        parts = name.split(".")
        if parts[0] != PACKAGE:
            continue
        target = dest.joinpath(*parts)
        if name == PACKAGE:  # the root package's entries one by one: the subpackages go in beside them
            target.mkdir(parents=True, exist_ok=True)
            entries = [(e, target / e.name) for e in sorted((src / folder).iterdir())]
        else:
            entries = [(src / folder, target)]
        for source, link in entries:
            if ignore(source.parent, [source.name]) or link.exists():
                continue
            if not copy:
                link.symlink_to(source, target_is_directory=source.is_dir())
            elif source.is_dir():
                shutil.copytree(source, link, ignore=ignore)
            else:
                shutil.copy2(source, link)
    return dest


def run(tree: Path, config: Path = ROOT / "pyproject.toml", extra: list[str] | tuple = (),
        **kwargs) -> subprocess.CompletedProcess:
    """lint-imports of this environment on the package laid out in ``tree`` (first on PYTHONPATH)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), *filter(None, [os.environ.get("PYTHONPATH")])]))
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache", *extra, str(config)], env=env, cwd=tree, **kwargs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=ROOT, help="the tree to check (default: this checkout)")
    p.add_argument("--copy", action="store_true", help="copy the sources instead of linking them")
    args, extra = p.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="shallowmark-imports-") as tmp:
        lay_out(args.src, Path(tmp), copy=args.copy)
        return run(Path(tmp), args.src / "pyproject.toml", extra).returncode


if __name__ == "__main__":
    sys.exit(main())
