import json

import numpy as np
import pytest
import torch

from shallowmark.research.pca_codec import fit_patch_pca
from shallowmark.research.train_default import TrainConfig, train_default
from shallowmark.errors import InvalidParameterError


def test_short_cpu_training_writes_a_loadable_diffusers_model(tmp_path):
    rng = np.random.default_rng(0)
    photos = {f"p{i}": rng.integers(0, 256, (300, 320, 3), dtype=np.uint8) for i in range(2)}
    log = train_default(TrainConfig(out_dir=str(tmp_path), budget_s=6, vae_batch=2, vae_crop=32, unet_batch=2,
                                    pool=4, photos=photos), log=lambda m: None)
    assert log["vae_steps"] >= 1 and log["unet_steps"] >= 1
    from shallowmark.core.backends import load_backend

    b = load_backend("tiny-ldm", path=tmp_path)
    assert b.latent_shape == (4, 64, 64)
    record = json.loads((tmp_path / "training_log.json").read_text())
    assert record["photos"] == ["p0", "p1"] and record["final"]["unet_loss"] > 0
    assert torch.isfinite(b.decode(b.randn_latents([0]))).all()


@pytest.mark.parametrize("field,value,msg", [("budget_s", 0, "budget"), ("vae_share", 1.0, "vae_share"),
                                             ("vae_crop", 30, "vae_crop")])
def test_bad_training_config(tmp_path, field, value, msg):
    cfg = TrainConfig(out_dir=str(tmp_path))
    setattr(cfg, field, value)
    with pytest.raises(InvalidParameterError, match=msg):
        cfg.validate()


def test_pca_codec_is_exact_with_all_components_and_lossy_with_four():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(fit_patch_pca([img], components=48).reconstruct(img), img)
    assert not np.array_equal(fit_patch_pca([img], components=4).reconstruct(img), img)


def test_committed_core_report_meets_the_goals():
    """The committed reference figures (written by `shallowmark bench-core`) hold the issue's goals."""
    from pathlib import Path

    rep = json.loads((Path(__file__).parents[2] / "docs/benchmarks/core/report.json").read_text())
    ae, rt = rep["autoencoder"], rep["round_trip"]
    assert ae["heldout_psnr_db"] >= 24.0 > ae["pca_codec_heldout_psnr_db"]
    assert rt["shallow_0_tstar_0_rel_l2_mean"] < rt["full_0_T_0_rel_l2_mean"]
    assert set(rep["cost"]["ddim_s_per_step_per_image"]) == {"1", "8", "32"}
