"""RP and GL scores: known answers (a model against itself, training crops against the training set),
the descriptors (stand-in and a TorchScript file through the SSCD path), bad input, and the quick
analysis end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from shallowmark.research.descriptors import SSCDDescriptor, ThumbnailDescriptor, load_descriptor
from shallowmark.core.photos import heldout_photo, training_photos
from shallowmark.research.reproducibility import (
    THRESHOLD,
    build_reference_set,
    calibrate_descriptor,
    generate,
    gl_score,
    reference_crop,
    rp_score,
    run_reproducibility_analysis,
    training_crops,
    training_region_sides,
    wilson_interval,
)
from shallowmark.errors import InvalidImageError, InvalidParameterError


@pytest.fixture(autouse=True)
def _one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def photos():
    return training_photos()


@pytest.fixture(scope="module")
def descriptor():
    return ThumbnailDescriptor()


# -- known answers ---------------------------------------------------------------------------------
def test_rp_of_a_model_with_itself_is_one(tiny_ldm, descriptor):
    seeds = [3, 4, 5]
    a = generate(tiny_ldm, seeds, steps=4)
    b = generate(tiny_ldm, seeds, steps=4)  # a second run from the same noises
    assert a.shape == (3, 256, 256, 3) and a.dtype == np.uint8
    rp = rp_score(a, b, descriptor)
    assert rp.score == 1.0 and rp.n == 3 and rp.descriptor == "thumbnail-band-24"
    assert min(rp.similarities) > 0.999
    # different noises are not the same image: the pairing by noise is what RP measures
    assert rp_score(a, np.roll(a, 1, axis=0), descriptor).similarities != rp.similarities


def test_gl_of_training_crops_is_memorized_and_of_a_held_out_photo_is_not(photos, descriptor):
    one = {"astronaut": photos["astronaut"]}
    ref = build_reference_set(descriptor, one)
    assert len(ref) == sum(ref.per_photo.values()) > 1000
    # crops drawn by the training code's own sampler (random scale, position, flip, colour), off the grid
    gl, nearest = gl_score(training_crops(one, 6, seed=3), ref, descriptor)
    assert gl.score == 0.0 and min(gl.similarities) > THRESHOLD  # every one is a copy: memorized
    assert {ref.labels[i][0] for i in nearest} == {"astronaut"}
    # a grid crop itself scores 1
    exact, _ = gl_score(reference_crop(one, ref.labels[5])[None], ref, descriptor)
    assert exact.similarities[0] > 0.999
    held = reference_crop({"h": heldout_photo()}, ("h", 400, 50, 60, False))
    novel, _ = gl_score(np.stack([held, held[:, ::-1].copy()]), ref, descriptor)
    assert novel.score == 1.0 and max(novel.similarities) < THRESHOLD


def test_descriptor_separates_copies_from_different_photos(photos, descriptor):
    sub = {k: photos[k] for k in ("astronaut", "coffee", "chelsea", "rocket")}
    cal = calibrate_descriptor(descriptor, sub, n=16, negatives=100, seed=1)
    assert cal["positives"]["JPEG q50"]["above"] == 1.0
    assert cal["positives"]["colour/contrast"]["above"] == 1.0
    assert cal["positives_all"]["above"] > 0.9
    assert cal["different_photos"]["above"] < 0.05


def test_stand_in_descriptor_is_normalised_and_ignores_brightness(descriptor):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 200, (2, 64, 64, 3), dtype=np.uint8)
    f = descriptor(img)
    assert f.shape == (2, (24 * 24 + 8 * 8) * 8)  # layout ⊗ texture
    torch.testing.assert_close(f.norm(dim=1), torch.ones(2))
    # the similarity is the cosine of the full features = the product of the factors' cosines
    other = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    by_factor = descriptor.factor_similarities(img, other)
    assert by_factor.shape == (2, 2) and descriptor.factor_names == ("layout", "texture")
    torch.testing.assert_close(descriptor.similarity(img, other), (f * descriptor(other)).sum(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(descriptor.similarity(img, other), by_factor.prod(0))
    brighter = np.clip(img.astype(int) + 40, 0, 255).astype(np.uint8)
    assert descriptor.similarity(img, brighter).min() > 0.99
    flat = np.full((1, 64, 64, 3), 128, np.uint8)
    assert descriptor(flat).abs().max() == 0  # no pattern: similarity 0 to everything


def test_wilson_interval():
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.27 < hi < 0.31
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9


def test_region_sides_follow_the_training_sampler():
    sides = training_region_sides(1411, 1.1)
    assert sides[0] == round(0.2 * 1411) and sides[-1] == 1411
    assert all(b / a < 1.11 for a, b in zip(sides, sides[1:]))
    assert training_region_sides(300, 1.1)[0] == 192  # 0.75 × 256 > 0.2 × 300


# -- the SSCD path ---------------------------------------------------------------------------------
class _Probe(torch.nn.Module):
    """A TorchScript stand-in for SSCD that reports what it was fed: per-channel means and the side."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.full((x.shape[0], 1), float(x.shape[-1]))
        return torch.cat([x.mean(dim=(2, 3)), side / 1000.0], dim=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated, SSCD ships as TorchScript
def test_sscd_torchscript_file_is_loaded_and_fed_imagenet_normalised_320px(tmp_path):
    path = tmp_path / "probe.torchscript.pt"
    torch.jit.script(_Probe()).save(str(path))
    d = load_descriptor(path)
    assert isinstance(d, SSCDDescriptor) and d.name == "sscd:probe.torchscript.pt"
    grey = np.full((2, 256, 256, 3), 128, np.uint8)
    (raw,) = d.features(torch.from_numpy(grey).permute(0, 3, 1, 2).float() / 255)
    expect = (128 / 255 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(raw[0, :3], expect, atol=1e-4, rtol=0)
    assert raw[0, 3].item() == pytest.approx(0.320)
    torch.testing.assert_close(d(grey).norm(dim=1), torch.ones(2))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_missing_or_broken_sscd_file_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidParameterError, match="does not exist.*SSCD TorchScript"):
        load_descriptor(tmp_path / "sscd_disc_mixup.torchscript.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(InvalidParameterError, match="not a loadable TorchScript"):
        load_descriptor(junk)
    # the analysis refuses before it spends any time
    with pytest.raises(InvalidParameterError, match="does not exist"):
        run_reproducibility_analysis(tmp_path / "out", quick=True, sscd=str(tmp_path / "missing.pt"))
    assert not (tmp_path / "out").exists()


# -- bad input -------------------------------------------------------------------------------------
def test_zero_samples_are_a_clear_error(tiny_ldm, descriptor, photos, tmp_path):
    empty = np.zeros((0, 64, 64, 3), np.uint8)
    with pytest.raises(InvalidParameterError, match="N must be at least 1; got 0"):
        rp_score(empty, empty, descriptor)
    with pytest.raises(InvalidParameterError, match="N must be at least 1; got 0"):
        generate(tiny_ldm, [])
    with pytest.raises(InvalidParameterError, match="N must be at least 1; got 0"):
        run_reproducibility_analysis(tmp_path / "out", quick=True, n=0)
    ref = build_reference_set(descriptor, {"chelsea": photos["chelsea"]}, scale_ratio=1.5, stride=0.5)
    with pytest.raises(InvalidParameterError, match="N must be at least 1; got 0"):
        gl_score(empty, ref, descriptor)


def test_other_bad_input(descriptor, photos, tmp_path):
    with pytest.raises(InvalidParameterError, match="not a tiny-ldm folder"):
        run_reproducibility_analysis(tmp_path / "out", quick=True, extra_models=[tmp_path / "no-model"])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    with pytest.raises(InvalidParameterError, match="both sides need N images"):
        rp_score(a, a[:2], descriptor)
    with pytest.raises(InvalidImageError, match="uint8"):
        descriptor(a.astype(np.float32))
    with pytest.raises(InvalidImageError, match="RGB"):
        descriptor(a[..., 0])
    with pytest.raises(InvalidParameterError, match="threshold"):
        rp_score(a, a, descriptor, threshold=1.5)
    with pytest.raises(InvalidParameterError, match="stride"):
        build_reference_set(descriptor, photos, stride=0)
    ref = build_reference_set(ThumbnailDescriptor(16), {"chelsea": photos["chelsea"]}, scale_ratio=1.5, stride=0.5)
    with pytest.raises(InvalidParameterError, match="same descriptor"):
        gl_score(a, ref, descriptor)


# -- the variant folder format and the training option ---------------------------------------------
def test_variant_folder_may_reuse_the_embedded_autoencoder(tmp_path, tiny_ldm):
    from shallowmark.core.backends import load_backend
    from shallowmark.core.backends.tiny_ldm import DEFAULT_PATH

    folder = tmp_path / "variant"
    shutil.copytree(DEFAULT_PATH / "unet", folder / "unet")
    shutil.copytree(DEFAULT_PATH / "scheduler", folder / "scheduler")
    (folder / "vae").mkdir()
    cfg = json.loads((DEFAULT_PATH / "vae" / "config.json").read_text())
    cfg["latents_mean"] = [m + 0.5 for m in cfg["latents_mean"]]
    (folder / "vae" / "config.json").write_text(json.dumps(cfg))
    b = load_backend("tiny-ldm", path=folder)
    torch.testing.assert_close(b._latent_mean, tiny_ldm._latent_mean + 0.5)
    for p, q in zip(b.vae.parameters(), tiny_ldm.vae.parameters()):
        assert torch.equal(p, q)
    cfg["block_out_channels"] = [16, 32, 64]
    (folder / "vae" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidParameterError, match="block_out_channels"):
        load_backend("tiny-ldm", path=folder)


def test_committed_variant_is_a_second_trained_model(tiny_ldm):
    """core/assets/tiny-ldm-b (in the repository, not the wheel): found by the analysis' default
    models, the shipped recipe with seed 1, and a different denoiser on the same autoencoder."""
    from shallowmark.core.backends import load_backend
    from shallowmark.research.reproducibility import ASSETS, default_models

    folder = ASSETS / "tiny-ldm-b"
    if not (folder / "unet").is_dir():
        pytest.skip("the variant is not installed (a wheel install ships only tiny-ldm)")
    assert [s.label for s in default_models()][:2] == ["shipped", "variant-b"]
    log = json.loads((folder / "training_log.json").read_text())
    assert log["config"]["seed"] == 1 and log["unet_steps"] == 3522 and log["config"]["unet_batch"] == 128
    assert log["final"]["unet_loss"] < 0.05
    b = load_backend("tiny-ldm", path=folder)
    for p, q in zip(b.vae.parameters(), tiny_ldm.vae.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(b.unet.parameters(), tiny_ldm.unet.parameters()))


def test_training_with_a_fixed_number_of_unet_steps(tmp_path):
    from shallowmark.research.train_default import TrainConfig, train_default

    rng = np.random.default_rng(0)
    photos = {"p": rng.integers(0, 256, (200, 220, 3), dtype=np.uint8)}
    log = train_default(TrainConfig(out_dir=str(tmp_path), budget_s=2, vae_batch=2, vae_crop=32, unet_batch=2,
                                    pool=2, unet_steps=3, photos=photos), log=lambda m: None)
    assert log["unet_steps"] == 3 and log["config"]["unet_steps"] == 3
    with pytest.raises(InvalidParameterError, match="unet_steps"):
        TrainConfig(out_dir=str(tmp_path), unet_steps=0).validate()


# -- end to end ------------------------------------------------------------------------------------
def test_quick_analysis_through_the_cli(tmp_path, capsys):
    from shallowmark.cli import main

    out = tmp_path / "rp"
    assert main(["analyze", "reproducibility", "--quick", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["descriptor"]["name"] == "thumbnail-band-24"
    assert rep["command"] == f"shallowmark analyze reproducibility --quick --out {out}"
    assert rep["rp"]["shipped vs shipped"]["score"] == 1.0
    assert rep["gl"]["shipped"]["n"] == 3
    md = (out / "report.md").read_text()
    assert "thumbnail-band-24" in md and rep["command"] in md
    for png in rep["figures"].values():
        assert (out / png).stat().st_size > 1000
    assert "Reproducibility (RP)" in capsys.readouterr().out
