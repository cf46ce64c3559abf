"""Packaging promises: the SDK stays light, the CLI reports missing pieces clearly."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_import_shallowmark_does_not_import_torch():
    code = "import sys, shallowmark, shallowmark.keys, shallowmark.keystore, shallowmark.cli; " \
           "sys.exit(1 if {'torch', 'diffusers'} & set(sys.modules) else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci/run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme


def test_cli_error_for_bad_arguments_is_clear():
    r = subprocess.run([sys.executable, "-m", "shallowmark.cli", "train-default", "--out", "/tmp/x", "--budget", "-1"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "budget must be positive" in r.stderr
