"""Uploads of other sizes than the model's, through the real server: the same size comes back,
the photo keeps its detail (PSNR at native resolution), and Verify takes the image as it is.

The server here runs Shallow Diffuse at its real 50 DDIM steps (the shared test server uses 10,
where the watermark is weaker), since the p-value bound is the one the service promises."""

from __future__ import annotations

import numpy as np
import pytest

SIZES = [(300, 800), (512, 384), (1024, 768), (1920, 1080)]  # (width, height)


@pytest.fixture(scope="module")
def client50(tmp_path_factory, loader, make_config, token_a):
    from shallowmark.client import Client
    from shallowmark.server.app import ServerApp

    app = ServerApp(make_config(tmp_path_factory.mktemp("sizes"), method_options={}), backend_loader=loader).start()
    assert app.wait_until_ready(120)
    with Client(app.address, token_a, timeout=300, retries=0) as c:
        yield c
    app.stop(1.0)


@pytest.fixture(scope="module")
def photo():
    from shallowmark.core.photos import heldout_photo

    return heldout_photo()  # never seen in training


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_upload_of_any_size_comes_back_at_its_size_and_is_detected(client50, keys, photo, size):
    from shallowmark.attacks.metrics import psnr
    from shallowmark.attacks.sizes_report import photo_at

    w, h = size
    original = photo_at(photo, w, h)
    mk = keys[0].for_method("shallow-diffuse")
    res = client50.embed(mk, image=original)
    marked = res.to_array()
    assert marked.shape == (h, w, 3)
    assert psnr(marked, original) >= 38.0
    assert any("centre" in n for n in res.notes)
    v = client50.verify(res.image, [mk, keys[1].for_method("shallow-diffuse")])
    assert v.detected and v.identified_key_id == keys[0].key_id_for("shallow-diffuse") and v.best.p_value < 1e-6
    plain = client50.verify(original, [mk])
    assert not plain.detected


def test_decode_output_is_kept_at_the_models_size(client_a, keys, photo):
    from shallowmark.core.photos import center_crop

    img = center_crop(photo, 256)
    res = client_a.embed(keys[0].for_method("shallow-diffuse"), image=img, output="decode")
    assert res.to_array().shape == (256, 256, 3) and not res.notes


def test_concurrent_verifies_of_different_sizes_can_share_a_batch(server, client_a, keys, photo):
    """Latent methods get grid-sized pixels before batching, so uploads of several sizes can be
    stacked into one model call (stacking the raw pixels would fail)."""
    from concurrent.futures import ThreadPoolExecutor

    from shallowmark.attacks.sizes_report import photo_at

    mk = keys[0].for_method("shallow-diffuse")
    images = [photo_at(photo, w, h) for w, h in ((300, 500), (640, 480), (256, 256), (900, 300))]
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda im: client_a.verify(im, [mk]), images))
    assert all(np.isfinite(r.best.p_value) for r in results)
