"""The key-placement scan: a quick run through the CLI writes a report with every figure."""

import json

import pytest

from shallowmark.cli import main


def test_quick_key_scan_writes_a_report(tmp_path):
    assert main(["bench-key-scan", "--quick", "--out", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert [c["config"]["ring_centre"] for c in rep["candidates"]] == ["nyquist", "dc"]
    for cand in rep["candidates"]:
        assert set(cand["attacks"]) == {"clean", "jpeg"}
        assert cand["attacks"]["clean"]["detected"] == 1.0       # own key, clean images
        assert 25 < cand["psnr"] < 60 and 25 < cand["user_residual"]["psnr"] < 60
        assert cand["user_residual"]["max_p_jpeg75"] < 0.01
    assert rep["candidates"][1]["dims"] == 9                      # rings 8..16, real values
    assert "| centre | rings |" in (tmp_path / "report.md").read_text()


def test_key_scan_refuses_bad_input_before_model_work(tmp_path):
    from shallowmark.attacks import key_scan
    from shallowmark.errors import InvalidParameterError, UnknownNameError

    with pytest.raises(InvalidParameterError, match="n must be ≥ 1 and n_user"):
        key_scan.run(tmp_path, n=0)
    with pytest.raises(UnknownNameError, match="jpeg"):
        key_scan.run(tmp_path, n=1, attacks=("clean", "jpg"))
