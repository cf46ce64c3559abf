"""MoLRG with real training: the sampled-noise phase grid, the DSM-trained networks and their metrics,
the report and the CLI. Every problem is tiny and seeded."""

from __future__ import annotations

import json
import math

import pytest
import torch

from shallowmark.core.molrg import MoLRG
from shallowmark.errors import InvalidParameterError
from shallowmark.research.molrg_theory import schedule
from shallowmark.research.molrg_training import (
    MolrgTrainingConfig,
    component_pools,
    empirical_optimum,
    empirical_optimum_jacobian,
    jacobian_subspace,
    pointwise_jacobian,
    run_molrg_training_analysis,
    sampled_phase_grid,
    transition_ratio,
)

DTYPE = torch.float64


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("molrg-training")
    return out, run_molrg_training_analysis(out, MolrgTrainingConfig.quick())


def test_quick_run_writes_the_report(quick_report):
    out, rep = quick_report
    for name in ("report.json", "report.md", *rep["figures"].values()):
        assert (out / name).stat().st_size > 0, name
    for png in rep["figures"].values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    saved = json.loads((out / "report.json").read_text())
    assert {"analysis", "command", "config", "phase_transition", "network", "reading", "figures",
            "timings_s", "machine"} <= set(saved)
    assert saved["analysis"] == "molrg-training" and saved["command"].startswith("shallowmark analyze molrg-training")
    assert set(saved["phase_transition"]) == {"k1", "k2"}
    for key, k in (("k1", 1), ("k2", 2)):
        part = saved["phase_transition"][key]
        assert part["clusters"] == k and len(part["mean_error_by_ratio"]) == len(part["ratios"])
        assert {"transition_ratio", "rows"} <= set(part)
    cfg = MolrgTrainingConfig.quick()
    net = saved["network"]
    assert len(net["cells"]) == len(cfg.net_ranks) * cfg.net_seeds * len(cfg.net_ratios)
    for cell in net["cells"]:
        for who in ("net", "empirical_optimum"):
            assert {"subspace_error", "exact_relative_mse", "train_loss", "test_loss", "relative_gap"} <= set(cell[who])
    md = (out / "report.md").read_text()
    assert "## Reading" in md and saved["command"] in md
    for png in rep["figures"].values():
        assert png in md


def test_quick_run_measures_what_it_says(quick_report):
    _, rep = quick_report
    # the lower bound √((1 − N/r)/2) holds for every fit with N < r (a fit cannot see the other directions)
    for key in ("k1", "k2"):
        for g in rep["phase_transition"][key]["rows"]:
            for j, q in enumerate(g["ratios"]):
                if q < 1:
                    assert min(row[j] for row in g["error"]) >= g["bound"][j] - 1e-6
    # the empirical optimum memorizes: its training loss is below its test loss at the smallest N
    first = rep["network"]["rows"][0]["empirical_optimum"]
    assert first["train_loss"]["mean"][0] < first["test_loss"]["mean"][0]
    # more data brings the network closer to the true distribution's denoiser
    mse = rep["network"]["rows"][0]["net"]["exact_relative_mse"]["mean"]
    assert mse[-1] < mse[0]


def test_sampled_noise_training_recovers_the_subspace_only_with_enough_samples():
    # K = 1, r = 3 in d = 12: N = 1 leaves two directions unseen; N = 12 pins the subspace down
    g = sampled_phase_grid(12, 3, 1, [1, 12], trials=1, steps=600, seed=0)
    low, high = g["error"][0]
    assert low >= math.sqrt((1 - 1 / 3) / 2) - 1e-6     # the bound, and far from recovered
    assert high < 0.1, high
    # K = 2, r = 2: with random restarts and the lowest-loss one kept, N = 16 per component recovers both
    g2 = sampled_phase_grid(12, 2, 2, [1, 16], trials=1, restarts=4, steps=600, seed=0)
    assert g2["error"][0, 0] > 0.4 and g2["error"][0, 1] < 0.1, g2["error"]
    assert g2["loss_excess"][0, 1] < 0.05                  # the kept fit is as good as the truth on the same draw


def test_transition_ratio_needs_every_larger_ratio_below_tolerance():
    assert transition_ratio([0.5, 1, 2, 4], [0.6, 0.05, 0.2, 0.01], 0.1) == 4.0
    assert transition_ratio([0.5, 1, 2, 4], [0.6, 0.05, 0.02, 0.01], 0.1) == 1.0
    assert transition_ratio([0.5, 1], [0.6, 0.5], 0.1) is None


def test_empirical_optimum_jacobian_matches_autograd():
    model = MoLRG.random(6, 2, 2, seed=1)
    g = torch.Generator().manual_seed(2)
    train = model.sample(9, g)
    x_t = torch.randn(4, 6, generator=g, dtype=DTYPE)
    a, b = torch.full((4,), 0.8, dtype=DTYPE), torch.full((4,), 0.6, dtype=DTYPE)
    auto = pointwise_jacobian(lambda x: empirical_optimum(train, x, a, b), x_t)
    torch.testing.assert_close(empirical_optimum_jacobian(train, x_t, a, b), auto)


def test_jacobian_subspace_of_the_exact_posterior_mean_is_the_component():
    model = MoLRG.random(20, 3, 2, seed=4)
    g = torch.Generator().manual_seed(5)
    alpha, beta = (float(v) for v in schedule(torch.tensor(0.3, dtype=DTYPE)))
    for k, p in enumerate(component_pools(model, 48, g)):
        x_t = alpha * p + beta * torch.randn(p.shape, generator=g, dtype=DTYPE)
        u = jacobian_subspace(pointwise_jacobian(lambda x: model.posterior_mean(x, alpha ** 2), x_t), 3)
        err = torch.linalg.matrix_norm(u @ u.T - model.bases[k] @ model.bases[k].T) / math.sqrt(6)
        assert err < 0.05, (k, float(err))


@pytest.mark.parametrize("change, message", [
    (dict(dim=1), "dim must be an integer >= 2"),
    (dict(phase_trials=0), "phase_trials must be an integer >= 1"),
    (dict(net_steps=2.5), "net_steps must be an integer >= 1"),
    (dict(batch=True), "batch must be an integer >= 1"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(phase_lr=0.0), "phase_lr must be a positive finite number"),
    (dict(net_lr=float("nan")), "net_lr must be a positive finite number"),
    (dict(phase_ranks_k1=()), "phase_ranks_k1 must be a non-empty tuple"),
    (dict(phase_ranks_k2=(4, 2)), "phase_ranks_k2 must be increasing and distinct"),
    (dict(phase_ranks_k2=(30,)), r"phase_ranks_k2: K·r = 2·30 = 60 orthogonal directions do not fit in dim = 48"),
    (dict(net_clusters=3, net_ranks=(20,)), r"net_ranks: K·r = 3·20 = 60"),
    (dict(phase_ratios=(0.3, 1.0)), r"phase_ratios: N = \(N/r\)·r must be a whole number >= 1 for every rank; 0.3·4"),
    (dict(net_ratios=(2.0, 1.0)), "net_ratios must be increasing and distinct"),
    (dict(net_ratios=(-1.0, 1.0)), "net_ratios must hold positive numbers"),
    (dict(eval_t=()), r"eval_t must be a non-empty tuple of noise levels in \(0, 1\)"),
    (dict(eval_t=(0.5, 1.0)), r"eval_t must be a non-empty tuple of noise levels in \(0, 1\)"),
    (dict(jacobian_t=0.0), r"jacobian_t must be a noise level in \(0, 1\)"),
    (dict(tolerance=1.5), r"tolerance must be in \(0, 1\)"),
    (dict(t_range=(0.0, 0.5)), "t_range must satisfy 0 < t_min <= t_max < 1"),
    (dict(t_range=(0.1,)), r"t_range must be a pair \(t_min, t_max\)"),
], ids=["dim", "phase_trials", "net_steps_float", "batch_bool", "seed", "phase_lr", "net_lr_nan", "phase_ranks_k1_empty",
        "phase_ranks_k2_order", "phase_ranks_k2_too_big", "net_ranks_too_big", "phase_ratios_not_whole", "net_ratios_order",
        "net_ratios_negative", "eval_t_empty", "eval_t_one", "jacobian_t", "tolerance", "t_range", "t_range_length"])
def test_bad_config_is_rejected_with_a_clear_message(change, message, tmp_path):
    config = MolrgTrainingConfig(**change)
    with pytest.raises(InvalidParameterError, match=message):
        config.check()
    with pytest.raises(InvalidParameterError, match=message):  # before any work or file
        run_molrg_training_analysis(tmp_path / "out", config)
    assert not (tmp_path / "out").exists()


def test_defaults_and_quick_are_valid():
    MolrgTrainingConfig().check()
    MolrgTrainingConfig.quick().check()


def test_cli_quick_respects_seed_and_rejects_bad_values(tmp_path, capsys):
    from shallowmark.cli import main

    out = tmp_path / "cli"
    assert main(["analyze", "molrg-training", "--quick", "--seed", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["command"] == f"shallowmark analyze molrg-training --quick --seed 1 --out {out}"
    assert rep["config"]["seed"] == 1 and rep["config"]["dim"] == MolrgTrainingConfig.quick().dim
    assert "# MoLRG with real training" in capsys.readouterr().out
    assert main(["analyze", "molrg-training", "--quick", "--seed", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "seed must be an integer >= 0" in capsys.readouterr().err
