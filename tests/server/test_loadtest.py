"""``shallowmark loadtest --quick``: the report's schema (a smoke size; the numbers mean nothing here)."""

from __future__ import annotations

import json

from shallowmark.cli import main


def test_quick_loadtest_writes_the_report(tmp_path, capsys):
    import torch

    out = tmp_path / "service"
    out.mkdir()
    (out / "notes.md").write_text("## Notes\n\nhand-written analysis\n")   # kept when the report is rewritten
    threads = torch.get_num_threads()
    try:
        assert main(["loadtest", "--quick", "--clients", "1,4", "--requests", "4", "--threads", "1",
                     "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)   # --threads is process-wide; leave the other tests theirs
    rep = json.loads((out / "report.json").read_text())
    rows = rep["throughput"]
    assert [(r["clients"], r["batching"]) for r in rows] == [(1, True), (4, True), (1, False), (4, False)]
    for r in rows:
        assert set(r) >= {"clients", "batching", "rps", "p50_ms", "p99_ms", "batch_sizes", "cpu_s"}
        assert r["errors"] == 0 and r["requests"] == 4 and r["rps"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]
        assert sum(int(s) * n for s, n in r["batch_sizes"].items()) == 4 and r["cpu_s"] > 0
    assert [r["batches"] for r in rows if not r["batching"]] == [4, 4]   # off: one model call per request
    assert all(r["batch_sizes"] == {"1": 4} for r in rows if not r["batching"])
    assert rep["inprocess_rps"] > 0 and len(rep["inprocess_rps_runs"]) == 2
    assert rep["config"]["quick"] and rep["config"]["verify_model_evals"] == 3 and rep["config"]["vae_batch"] == 1
    assert rep["environment"]["torch_threads"] == 1
    g = rep["goals"]
    assert g["batching_gain_at"] == 4 and g["batching_gain"] > 0 and isinstance(g["batching_gain_met"], bool)
    assert 0 < g["served_share_of_inprocess"] and isinstance(g["served_share_met"], bool)
    assert rep["command"].startswith("shallowmark loadtest --quick")
    md = (out / "report.md").read_text()
    assert "| clients | batching | req/s |" in md and "quick smoke size" in md and "## Goals" in md
    assert md.endswith("## Notes\n\nhand-written analysis\n")
    assert "In process, no RPC" in capsys.readouterr().out


def test_rows_run_for_at_least_min_seconds(tmp_path):
    """``--min-seconds``: the clients keep sending past the request count until the floor has passed
    (on an H200, 96 requests at 16 clients took 3.6 s: too short a row to measure)."""
    import torch

    threads = torch.get_num_threads()
    try:
        assert main(["loadtest", "--quick", "--clients", "1", "--requests", "1", "--min-seconds", "2",
                     "--threads", "1", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["config"]["min_seconds"] == 2.0
    for r in rep["throughput"]:
        assert r["wall_s"] >= 2.0 and r["requests"] > 1 and r["errors"] == 0
    assert "at least 2 s per row" in (tmp_path / "report.md").read_text()


def test_negative_min_seconds_is_refused(tmp_path, capsys):
    assert main(["loadtest", "--quick", "--min-seconds", "-1", "--out", str(tmp_path)]) == 2
    assert "--min-seconds needs a number >= 0" in capsys.readouterr().err


def test_quick_loadtest_with_clients_in_processes_of_their_own(tmp_path):
    """The server in a subprocess, two clients spread over two spawned processes: every call
    answered and counted, the served share against the in-process rate reported."""
    out = tmp_path / "processes"
    assert main(["loadtest", "--isolation", "processes", "--quick", "--clients", "2", "--requests", "4",
                 "--client-processes", "2", "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    (row,) = rep["throughput"]
    assert row["clients"] == 2 and row["client_processes"] == 2
    assert row["requests"] == 4 and row["errors"] == 0 and row["rps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
    assert rep["config"]["server_isolation"] == "subprocess" and rep["config"]["server_torch_threads"] == 1
    assert rep["server"]["exit_code"] == 0 and rep["profile"] is None
    g = rep["goals"]
    assert g["served_share_at"] == 2 and g["served_share_of_inprocess"] > 0 and g["served_share_goal"] == 0.9
    md = (out / "report.md").read_text()
    assert "in a subprocess" in md and "| clients | client processes | req/s |" in md


def test_profile_summary_folds_idle_waits_and_ranks_the_busy_frames():
    from shallowmark.server.loadtest_processes import summarise_profile

    folded = "\n".join([
        "thread (0x1);run (server.py:1);forward (torch/nn/modules/conv.py:560) 60",
        "thread (0x2);loop (grpc.py:3);wait (threading.py:355) 30",
        "thread (0x1);run (server.py:1);sign (attestation.py:9) 10",
        "garbage line without a count",
    ])
    s = summarise_profile(folded)
    assert s["samples"] == 100 and s["threads"] == {"thread (0x1)": 70, "thread (0x2)": 30}
    assert [(t["frame"], t["share"]) for t in s["top"]] == [
        ("forward (torch/nn/modules/conv.py:560)", 0.6), ("(idle: waiting)", 0.3), ("sign (attestation.py:9)", 0.1)]


def test_loadtest_flags_that_need_processes_are_refused_alone(capsys):
    assert main(["loadtest", "--quick", "--profile", "5"]) != 0
    assert "--isolation processes" in capsys.readouterr().err
