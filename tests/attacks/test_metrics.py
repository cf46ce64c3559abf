"""ROC, bit accuracy and fidelity metrics."""

from __future__ import annotations

import numpy as np
import pytest

from shallowmark.attacks import bit_accuracy, psnr, roc_metrics, ssim, tpr_at_fpr
from shallowmark.errors import InvalidImageError, InvalidParameterError


def test_perfect_separation():
    r = roc_metrics([5, 6, 7], np.arange(200) / 100)
    assert r.auc == 1.0 and r.tpr_at_1pct_fpr == 1.0
    assert r.n_pos == 3 and r.n_neg == 200
    assert r.fpr.shape == r.tpr.shape == r.thresholds.shape


def test_same_distribution_auc_half():
    rng = np.random.default_rng(0)
    r = roc_metrics(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(r.auc - 0.5) < 0.05
    assert r.tpr_at_1pct_fpr < 0.05


def test_one_negative_fits_in_one_percent():
    # 100 negatives: 99 below 1, one at 5. Positives: 3 above 5, 7 between 1 and 5.
    neg = np.concatenate([np.linspace(0, 0.9, 99), [5.0]])
    pos = [6, 7, 8, 1, 2, 3, 4, 4.5, 4.6, 4.7]
    # Threshold 1: all 10 positives and exactly 1/100 negatives flagged -> FPR 0.01 qualifies.
    assert roc_metrics(pos, neg).tpr_at_1pct_fpr == 1.0
    # With no false positives allowed only the 3 positives above 5 count.
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(0.3)


def test_top_negative_alone_exceeds_budget():
    # 50 negatives: the top one alone is FPR 0.02 > 1%, so the threshold must beat every negative.
    neg = np.concatenate([np.linspace(0, 0.9, 49), [5.0]])
    pos = [6, 7, 8, 5.0, 1, 2, 3, 4, 4.5, 4.6]  # the 5.0 ties with the top negative: not counted
    r = roc_metrics(pos, neg)
    assert r.tpr_at_1pct_fpr == pytest.approx(0.3)
    assert r.threshold_at_1pct_fpr == 6.0


def test_two_negatives_fit_in_one_percent_of_200():
    # 200 negatives: 198 in [0, 0.5], two at 4 and 5. Positives 6, 7 above both; 4.5 between;
    # 3 and 2 below both but above the rest; 0.25 among the bulk.
    neg = np.concatenate([np.linspace(0, 0.5, 198), [4.0, 5.0]])
    pos = [6, 7, 4.5, 3, 2, 0.25]
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(5 / 6)  # threshold 2: FPR 2/200
    assert tpr_at_fpr(pos, neg, 0.005) == pytest.approx(3 / 6)  # threshold 4.5: FPR 1/200
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(2 / 6)  # threshold 6: FPR 0


def test_to_dict():
    d = roc_metrics([1, 2], [0, 0.5]).to_dict()
    assert d["auc"] == 1.0 and "fpr" not in d
    assert len(roc_metrics([1, 2], [0, 0.5]).to_dict(include_curve=True)["fpr"]) > 1


@pytest.mark.parametrize(
    "pos, neg",
    [([], [1.0]), ([1.0], []), ([np.nan, 1.0], [0.0]), ([1.0], [0.0, np.inf])],
    ids=["empty-pos", "empty-neg", "nan", "inf"],
)
def test_bad_scores(pos, neg):
    with pytest.raises(InvalidParameterError):
        roc_metrics(pos, neg)


def test_bad_fpr_max():
    with pytest.raises(InvalidParameterError):
        tpr_at_fpr([1.0], [0.0], 1.5)


def test_bit_accuracy():
    assert bit_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert bit_accuracy(np.array([True, False]), np.array([1, 0])) == 1.0
    with pytest.raises(InvalidParameterError):
        bit_accuracy([1, 0], [1])
    with pytest.raises(InvalidParameterError):
        bit_accuracy([2, 0], [1, 0])
    with pytest.raises(InvalidParameterError):
        bit_accuracy([], [])


def test_psnr_ssim():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert psnr(a, a) == float("inf")
    assert ssim(a, a) == pytest.approx(1.0)
    b = a.copy()
    b[0, 0, 0] ^= 1  # one value off by one: MSE = 1 / (32*32*3)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 * 32 * 32 * 3))
    noisy = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisy) < ssim(a, b) <= 1
    assert ssim(a[:5, :5], a[:5, :5]) == pytest.approx(1.0)  # small image: smaller window


def test_fidelity_bad_images():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(InvalidImageError):
        psnr(a, np.zeros((16, 8, 3), np.uint8))
    with pytest.raises(InvalidImageError):
        ssim(a, a.astype(np.float32))
    with pytest.raises(InvalidImageError):
        ssim(a[:2, :2], a[:2, :2])


def test_tpr_at_01pct_fpr_allows_one_false_positive_per_thousand():
    from shallowmark.attacks.metrics import roc_metrics

    neg = np.arange(1000, dtype=float)            # one negative (999) above every positive but one
    pos = np.array([998.5] * 9 + [1000.5])
    r = roc_metrics(pos, neg)
    assert r.tpr_at_01pct_fpr == 1.0              # threshold 998.5: one false positive of 1000
    assert roc_metrics(pos, neg[1:]).tpr_at_01pct_fpr == 0.1    # 999 negatives: no false positive allowed
    assert r.to_dict()["tpr_at_01pct_fpr"] == 1.0
