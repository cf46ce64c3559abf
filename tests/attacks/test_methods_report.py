"""The committed methods report (written by `shallowmark bench-methods`) keeps its schema: every
check the methods issue names is there, with a value and a goal."""

import json
from pathlib import Path

from shallowmark.core.watermarks import method_names

REPORT = Path(__file__).parents[2] / "docs/benchmarks/methods/report.json"


def test_committed_report_has_every_named_check():
    rep = json.loads(REPORT.read_text())
    names = {c["name"] for c in rep["checks"]}
    for m in method_names():
        assert {f"median_p_clean/{m}", f"fpr_at_1pct/{m}", f"ident_acc_32/{m}", f"ident_acc_256/{m}"} <= names
    assert {"psnr/shallow-diffuse-plain", "psnr/shallow-diffuse-nullspace",
            "psnr_user_scenario/shallow-diffuse-decode", "psnr_user_scenario/shallow-diffuse-residual",
            "verify_evals_ratio/shallow-diffuse-vs-tree-ring"} <= names
    for c in rep["checks"]:
        assert set(c) >= {"name", "value", "goal"}
    assert rep["methods"]["shallow-diffuse"]["n_null"] >= 200
