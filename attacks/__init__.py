"""Attacks on watermarked images and the metrics the benchmark reports.

Attacks are pure functions on uint8 RGB arrays, called by name::

    from shallowmark.attacks import apply_attack, list_attacks
    attacked = apply_attack("jpeg", image)            # reference strength (quality 25)
    attacked = apply_attack("noise", image, 0.05, rng=np.random.default_rng(1))
"""

from .codec import jpeg_bytes
from .metrics import RocResult, bit_accuracy, psnr, roc_metrics, ssim, tpr_at_fpr
from .registry import AttackSpec, apply_attack, get_attack, list_attacks, register, unregister

__all__ = [
    "AttackSpec",
    "RocResult",
    "apply_attack",
    "bit_accuracy",
    "get_attack",
    "jpeg_bytes",
    "list_attacks",
    "psnr",
    "register",
    "roc_metrics",
    "ssim",
    "tpr_at_fpr",
    "unregister",
]
