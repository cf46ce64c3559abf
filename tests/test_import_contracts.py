"""The import contracts (pyproject.toml's [tool.importlinter]) hold on this tree, and a broken one is
caught: import-linter runs on the real sources, then on a copy with a forbidden import added.

Both go through tools/lint_imports.py, which lays the package's folders (sdk/, core/, server/, ...)
out as one ``shallowmark`` folder and puts it first on PYTHONPATH for lint-imports."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "pyproject.toml"


def _load_tool():
    spec = importlib.util.spec_from_file_location("_shallowmark_tools_lint_imports", ROOT / "tools/lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _contracts() -> dict[str, dict]:
    return {c["id"]: c for c in tool.tomllib.loads(CONFIG.read_text())["tool"]["importlinter"]["contracts"]}


def _lint(tree: Path) -> tuple[int, str]:
    r = tool.run(tree, CONFIG, ["--no-logo"], capture_output=True, text=True, timeout=120)
    return r.returncode, " ".join((r.stdout + r.stderr).split())   # the report wraps long lines


def _copy(tmp_path: Path) -> Path:
    """The package sources (sdk/, core/ but its model weights, server/, attacks/, research/) copied
    into ``tmp_path/tree`` as one importable ``shallowmark`` package."""
    tree = tool.lay_out(ROOT, tmp_path / "tree", copy=True, skip=("core/assets",))
    assert (tree / "shallowmark/keys.py").is_file() and not (tree / "shallowmark/keys.py").is_symlink()
    assert {"core", "server", "attacks", "research", "cli"} <= {p.name for p in (tree / "shallowmark").iterdir()}
    return tree


def test_the_contracts_hold_on_this_tree(tmp_path):
    code, out = _lint(tool.lay_out(ROOT, tmp_path / "links"))
    assert code == 0, out
    contracts = _contracts()
    assert set(contracts) == {"sdk-light", "core-data-path", "no-research-in-service"}
    for c in contracts.values():
        assert f"{' '.join(c['name'].split())} KEPT" in out
    assert f"Contracts: {len(contracts)} kept, 0 broken." in out


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    tree = _copy(tmp_path)
    # the copy, not the editable install, is what lint-imports' Python imports
    env = dict(os.environ, PYTHONPATH=str(tree))
    origin = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(u.find_spec('shallowmark').origin)"],
                            env=env, cwd=tree, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(origin) == tree / "shallowmark" / "__init__.py"
    code, out = _lint(tree)
    assert code == 0, out                       # the copy as it is keeps every contract

    with open(tree / "shallowmark/keys.py", "a") as f:
        f.write("\nimport shallowmark.core.ddim\n")
    code, out = _lint(tree)
    name = " ".join(_contracts()["sdk-light"]["name"].split())
    assert code != 0
    assert f"{name} BROKEN" in out and "shallowmark.keys -> shallowmark.core.ddim" in out
    assert "Contracts: 2 kept, 1 broken." in out


def _tracked_sdk_modules() -> set[str]:
    """The SDK's modules and subpackages as git tracks them (all of sdk/ outside a git checkout)."""
    try:
        files = subprocess.run(["git", "ls-files", "sdk"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(ROOT)) for p in (ROOT / "sdk").rglob("*.py")]
    names = {Path(f).parts[1] for f in files if len(Path(f).parts) > 1}
    return {n.removesuffix(".py") for n in names if n.endswith(".py") or (ROOT / "sdk" / n / "__init__.py").exists()}


@pytest.mark.parametrize("contract", ["sdk-light", "no-research-in-service"])
def test_every_sdk_module_is_a_source_of_the_sdk_contracts(contract):
    """The SDK contracts list their modules by name (the CLI is the exception): a new SDK module
    must be added to them, or nothing checks it."""
    sources = set(_contracts()[contract]["source_modules"])
    missing = {f"shallowmark.{m}" for m in _tracked_sdk_modules() - {"__init__", "cli"}} - sources
    assert not missing, f"add {sorted(missing)} to the source_modules of {contract!r} in pyproject.toml"
