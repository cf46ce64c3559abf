"""The analysis behind ``shallowmark analyze jacobian-rank`` (research.jacobian_rank): the full-size
cross-check and the report. The profile and the t* rule it builds on are tested in
tests/core/test_t_star.py."""

import json

import numpy as np
import pytest

from shallowmark.errors import InvalidParameterError
from shallowmark.research import jacobian_rank as R


def test_full_size_check_known_answer(molrg_k1):
    x0 = molrg_k1.sample_data(2, seed=4)
    chk = R.full_size_check(molrg_k1, x0, fractions=(0.3, 0.7), top_fractions=(0.7,), rank=5, iters=3, probes=64)
    abar = molrg_k1.alphas_cumprod[list(chk.timesteps)].numpy()
    assert chk.gain.shape == chk.participation.shape == (2, 2)
    assert chk.top_fractions == (0.7,) and np.allclose(chk.sigma_max, np.sqrt(abar[1]), rtol=1e-6)
    # Hutchinson estimates of Σσ²/d = r·ᾱ/d and of the participation ratio r/d (J = √ᾱ·UUᵀ)
    assert np.allclose(chk.gain, 5 * abar[None] / 64, rtol=0.3)
    assert np.all(chk.participation_stderr > 0) and np.all(chk.participation_stderr < 0.02)
    assert np.all(np.abs(chk.participation - 5 / 64) < 4 * chk.participation_stderr + 1e-9)


def test_full_size_check_needs_two_probes(molrg_k1):
    x0 = molrg_k1.sample_data(1, seed=0)
    with pytest.raises(InvalidParameterError, match="probes"):
        R.full_size_check(molrg_k1, x0, fractions=[0.3], probes=1)


def test_cli_quick_writes_report(tiny_ldm, tmp_path, monkeypatch, capsys):
    import shallowmark.core.backends as backends
    from shallowmark.cli import main

    monkeypatch.setattr(backends, "load_backend", lambda name="tiny-ldm", **kw: tiny_ldm)  # reuse the session's
    out = tmp_path / "jr"
    assert main(["analyze", "jacobian-rank", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "report.json", "rank_profile.png", "cross_check.png"):
        assert (out / name).stat().st_size > 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["quick"] is True and "--quick" in rep["command"] and rep["settings"]["tol"] == 0.01
    prof = rep["profile"]
    assert len(prof["rank_ratio_mean"]) == len(prof["t_fraction"]) == 4
    assert all(0 < r <= 1 for r in prof["rank_ratio_mean"])
    auto = rep["t_star"]["auto"]
    assert 0.1 <= auto <= 0.7 and rep["t_star"]["compare"]["auto"]["position"] == round(auto * 50)
    assert rep["t_star"]["compare"]["reference"]["position"] == 15
    assert all(0 < e < 1 for e in rep["round_trip"]["rel_l2_mean"])
    md = (out / "report.md").read_text()
    assert rep["command"] in md and "## t* vs 0.3T" in md
    capsys.readouterr()
    assert main(["analyze", "jacobian-rank", "--quick", "--out", str(out), "--tol", "1.5"]) == 2
    assert "tolerance must be in (0, 1)" in capsys.readouterr().err
