"""``shallowmark soak`` at a smoke size (10 s, 2 clients): the report's structure, and that no call
failed with anything but the codes a loaded server may answer. The 5-minute run is opt-in (see
docs/service.md); this one checks the machinery, not the figures."""

from __future__ import annotations

import json

from shallowmark.cli import main


def test_short_soak_writes_the_report(tmp_path, capsys):
    from shallowmark.server.soak import DOCUMENTED_CODES, LOAD_CODES, MIX

    out = tmp_path / "soak"
    out.mkdir()
    (out / "notes.md").write_text("## Notes\n\nhand-written\n")
    assert main(["soak", "--duration", "10", "--clients", "2", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())

    p = rep["parameters"]
    assert p["duration_s"] == 10 and p["clients"] == 2 and p["server_isolation"] == "subprocess"
    assert p["client_retries"] == 0 and set(p["operations"]) == set(MIX)
    assert rep["command"] == f"shallowmark soak --duration 10 --clients 2 --out {out}"

    load = rep["load"]
    assert load["requests"] > 0 and load["wall_s"] >= 10 and load["ok_rps"] > 0
    assert sum(load["by_status"].values()) == load["requests"]
    failed = {code for code, n in load["by_status"].items() if code != "OK"}
    assert failed <= set(LOAD_CODES), rep["failures"]          # nothing but load shedding or a deadline
    assert set(load["by_status"]) <= set(DOCUMENTED_CODES)
    assert rep["failures"]["unexpected"] == {} and rep["failures"]["undocumented"] == []
    assert load["verdict_mismatches"] == 0                     # marked images identified, plain ones not
    for group in (rep["rpcs"], rep["operations"]):
        for row in group.values():
            assert set(row) >= {"requests", "ok", "failed", "by_status", "p50_ms", "p99_ms", "ok_rps"}
            if row["ok"]:
                assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert set(rep["rpcs"]) == {"Embed", "Verify"}
    assert sum(r["requests"] for r in rep["rpcs"].values()) == load["requests"]
    assert len(rep["windows"]) == 10 and sum(w["requests"] for w in rep["windows"]) == load["requests"]

    rss = rep["rss"]
    assert rss["source"].startswith("/proc/") and rss["interval_s"] == 1.0
    assert len(rss["samples"]) >= 8 and rss["sample_columns"][:2] == ["t_s", "rss_mib"]
    assert 50 < rss["start_mib"] <= rss["max_mib"] and rss["end_mib"] <= rss["max_mib"]
    assert isinstance(rss["bounded"], bool) and "median RSS" in rss["rule"]

    s = rep["server"]
    assert s["exit_code"] == 0 and not s["exited_during_run"] and s["pid"] > 0   # drained on SIGTERM
    assert s["log"]["errors"] == 0
    embeds = rep["rpcs"]["Embed"]["ok"]
    assert rep["ledger"] == dict(records=embeds, embeds_ok=embeds, matches=True, error="")
    assert rep["notes"]

    md = (out / "report.md").read_text()
    for part in ("| operation | RPC | requests |", "## Over time", "## Server memory", "Rule: bounded:", "## Checks"):
        assert part in md
    assert md.endswith("## Notes\n\nhand-written\n")
    assert "Service soak run" in capsys.readouterr().out


def test_rss_verdict_rule():
    from shallowmark.server.soak import rss_verdict

    def samples(values):
        return [dict(t_s=float(i), rss_mib=v, hwm_mib=v) for i, v in enumerate(values)]

    warmup_then_flat = [400 + 10 * i for i in range(20)] + [600] * 20 + [610] * 20
    v = rss_verdict(samples(warmup_then_flat), 59)
    assert v["bounded"] is True and v["start_mib"] == 400 and v["max_mib"] == 610 and v["end_mib"] == 610
    leak = [500 + 2 * i for i in range(60)]          # +2 MiB a second, all along
    v = rss_verdict(samples(leak), 59)
    assert v["bounded"] is False and v["growth_last_half"] > 0.05
    spike = [600] * 59 + [900]                      # one sample at the very end does not decide
    assert rss_verdict(samples(spike), 59)["bounded"] is True
    assert rss_verdict(samples([600, 610]), 1)["bounded"] is None
    assert rss_verdict([], 10)["start_mib"] is None
