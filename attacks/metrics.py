"""Detection and fidelity metrics for the benchmark.

Detection: scores follow the convention **higher score = more likely watermarked**; positives are
watermarked images, negatives are clean ones. Fidelity: PSNR and SSIM between uint8 RGB images.

scikit-learn and scikit-image are imported on first use, so importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shallowmark.errors import InvalidImageError, InvalidParameterError, MissingDependencyError

from shallowmark.imaging import check_rgb as check_image

# FPR values from roc_curve are ratios k / n_neg; allow rounding noise so that e.g. 3/300 counts
# as 1% exactly.
_FPR_EPS = 1e-12


@dataclass(frozen=True)
class RocResult:
    """ROC summary of a detector on one attack.

    Attributes:
        auc: area under the ROC curve.
        tpr_at_1pct_fpr: highest TPR among thresholds whose FPR <= 1% (see :func:`tpr_at_fpr`).
        threshold_at_1pct_fpr: the score threshold achieving it (``inf`` when only the
            "flag nothing" threshold qualifies).
        tpr_at_01pct_fpr: the same at FPR <= 0.1% (the WAVES benchmark's headline figure). With
            fewer than 1000 negatives no threshold has 0 < FPR <= 0.1%, so it is the TPR at zero
            false positives; ``n_neg`` says which.
        fpr, tpr, thresholds: the full curve from ``sklearn.metrics.roc_curve`` with
            ``drop_intermediate=False``, for plotting.
        n_pos, n_neg: number of positive (watermarked) and negative (clean) scores.
    """

    auc: float
    tpr_at_1pct_fpr: float
    threshold_at_1pct_fpr: float
    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int
    tpr_at_01pct_fpr: float = float("nan")

    def to_dict(self, include_curve: bool = False) -> dict:
        """Plain-Python dict for JSON reports; the curve arrays only if ``include_curve``."""
        d = {
            "auc": self.auc,
            "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr,
            "threshold_at_1pct_fpr": self.threshold_at_1pct_fpr,
            "tpr_at_01pct_fpr": self.tpr_at_01pct_fpr,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
        }
        if include_curve:
            d.update(fpr=self.fpr.tolist(), tpr=self.tpr.tolist(), thresholds=self.thresholds.tolist())
        return d


def _sklearn_metrics():
    try:
        from sklearn import metrics
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependencyError("ROC metrics (scikit-learn)", "audit", e) from e
    return metrics


def _scores(x, what: str) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64).ravel()
    except (TypeError, ValueError) as e:
        raise InvalidParameterError(f"{what} must be numbers: {e}") from None
    if a.size == 0:
        raise InvalidParameterError(f"{what} is empty; need at least one score")
    if not np.all(np.isfinite(a)):
        raise InvalidParameterError(f"{what} contains NaN or infinite values ({int(np.sum(~np.isfinite(a)))} of {a.size})")
    return a


def _curve(scores_pos, scores_neg):
    pos = _scores(scores_pos, "scores_pos")
    neg = _scores(scores_neg, "scores_neg")
    y = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    s = np.concatenate([pos, neg])
    # Keep every threshold: dropping "intermediate" points can remove the last point under the FPR
    # limit and understate TPR@FPR.
    fpr, tpr, thr = _sklearn_metrics().roc_curve(y, s, drop_intermediate=False)
    return pos, neg, y, s, fpr, tpr, thr


def _best_under(fpr, tpr, thr, fpr_max: float) -> tuple[float, float]:
    ok = fpr <= fpr_max + _FPR_EPS
    # roc_curve always starts at (0, 0) with threshold inf, so ``ok`` is never empty.
    i = int(np.flatnonzero(ok)[np.argmax(tpr[ok])])
    return float(tpr[i]), float(thr[i])


def _check_fpr_max(fpr_max) -> float:
    f = float(fpr_max)
    if not 0.0 <= f <= 1.0:
        raise InvalidParameterError(f"fpr_max must be in [0, 1], got {fpr_max}")
    return f


def tpr_at_fpr(scores_pos, scores_neg, fpr_max: float = 0.01) -> float:
    """TPR at a false-positive budget: **the highest TPR among thresholds whose FPR <= fpr_max**.

    An image is flagged as watermarked when ``score >= threshold``. Thresholds are all distinct
    scores (``sklearn.metrics.roc_curve`` with ``drop_intermediate=False``), plus ``inf`` (flag
    nothing). Tied scores share one threshold, so a positive tied with a negative counts only if
    that negative also fits in the budget. No interpolation between ROC points is done. With
    ``n_neg`` negatives, the budget allows ``floor(fpr_max * n_neg)`` of them above the threshold;
    with fewer than ``1 / fpr_max`` negatives that is zero, i.e. the threshold must beat every
    negative.

    Raises InvalidParameterError for empty inputs, NaN or infinite scores, or fpr_max outside [0, 1].
    """
    f = _check_fpr_max(fpr_max)
    _, _, _, _, fpr, tpr, thr = _curve(scores_pos, scores_neg)
    return _best_under(fpr, tpr, thr, f)[0]


def roc_metrics(scores_pos, scores_neg) -> RocResult:
    """AUC, TPR@1%FPR and TPR@0.1%FPR of a detector from its scores on watermarked and clean images.

    Convention: higher score = more likely watermarked. ``tpr_at_1pct_fpr`` is defined as **the
    highest TPR among thresholds whose FPR <= 1%** (see :func:`tpr_at_fpr`); quote this definition
    with reported numbers. AUC is ``sklearn.metrics.roc_auc_score`` (ties count one half).

    Raises InvalidParameterError for empty inputs or NaN / infinite scores.
    """
    pos, neg, y, s, fpr, tpr, thr = _curve(scores_pos, scores_neg)
    auc = float(_sklearn_metrics().roc_auc_score(y, s))
    t1, th1 = _best_under(fpr, tpr, thr, 0.01)
    t01, _ = _best_under(fpr, tpr, thr, 0.001)
    return RocResult(
        auc=auc,
        tpr_at_1pct_fpr=t1,
        threshold_at_1pct_fpr=th1,
        fpr=fpr,
        tpr=tpr,
        thresholds=thr,
        n_pos=int(pos.size),
        n_neg=int(neg.size),
        tpr_at_01pct_fpr=t01,
    )


def bit_accuracy(bits_true, bits_pred) -> float:
    """Fraction of positions where the decoded bits equal the embedded bits (0.0 .. 1.0).

    Both inputs are array-likes of the same shape holding 0/1 or booleans.
    Raises InvalidParameterError on a shape mismatch, empty input, or values other than 0/1.
    """
    t = np.asarray(bits_true)
    p = np.asarray(bits_pred)
    if t.shape != p.shape:
        raise InvalidParameterError(f"bit arrays differ in shape: {t.shape} vs {p.shape}")
    if t.size == 0:
        raise InvalidParameterError("bit arrays are empty")
    for a, what in ((t, "bits_true"), (p, "bits_pred")):
        if not np.isin(a, (0, 1)).all():
            raise InvalidParameterError(f"{what} must contain only 0/1 or booleans")
    return float(np.mean(t.astype(bool) == p.astype(bool)))


def _pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    check_image(a, "first image")
    check_image(b, "second image")
    if a.shape != b.shape:
        raise InvalidImageError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 RGB images of equal shape.

    Peak 255, MSE over all pixels and channels; ``inf`` for identical images.
    """
    from shallowmark.core.images import psnr as _psnr

    return _psnr(*_pair(a, b))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity between two uint8 RGB images of equal shape (1.0 = identical).

    scikit-image's ``structural_similarity`` with a 7x7 uniform window, data range 255, averaged
    over channels. Images smaller than 7 pixels on a side use the largest odd window that fits
    (at least 3); smaller images raise InvalidImageError.
    """
    a, b = _pair(a, b)
    try:
        from skimage.metrics import structural_similarity
    except ImportError as e:  # pragma: no cover - depends on the install
        raise MissingDependencyError("SSIM (scikit-image)", "audit", e) from e
    side = min(a.shape[:2])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        raise InvalidImageError(f"SSIM needs images of at least 3x3 pixels, got {a.shape[:2]}")
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win))
