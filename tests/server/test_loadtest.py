"""``shallowmark loadtest --quick``: the report's schema (a smoke size; the numbers mean nothing here)."""

from __future__ import annotations

import json

from shallowmark.cli import main


def test_quick_loadtest_writes_the_report(tmp_path, capsys):
    out = tmp_path / "service"
    assert main(["loadtest", "--quick", "--clients", "1,4", "--requests", "4", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    rows = rep["throughput"]
    assert [(r["clients"], r["batching"]) for r in rows] == [(1, True), (4, True), (1, False), (4, False)]
    for r in rows:
        assert set(r) >= {"clients", "batching", "rps", "p50_ms", "p99_ms"}
        assert r["errors"] == 0 and r["requests"] == 4 and r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
    assert [r["batches"] for r in rows if not r["batching"]] == [4, 4]   # off: one model call per request
    assert rep["inprocess_rps"] > 0 and rep["config"]["quick"] and rep["config"]["verify_model_evals"] == 3
    assert rep["command"].startswith("shallowmark loadtest --quick")
    md = (out / "report.md").read_text()
    assert "| clients | batching | req/s |" in md and "quick smoke size" in md
    assert "In process, no RPC" in capsys.readouterr().out
