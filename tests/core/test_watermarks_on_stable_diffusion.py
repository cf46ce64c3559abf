"""The Stable Diffusion adapter carries Shallow Diffuse, Tree-Ring and Gaussian Shading end to end
through the latent and conditioning path: prompt + CFG generation, a verifier's inversion with the
empty prompt (it does not know the prompt), detection, identification."""

import numpy as np
import pytest

from shallowmark import WatermarkKey
from shallowmark.core import ddim
from shallowmark.core.watermarks import load_method


def _keys(method, n):
    return [WatermarkKey.from_hex(f"{i + 1:064x}").for_method(method) for i in range(n)]


@pytest.mark.parametrize("name,config", [("shallow-diffuse", dict(radius=8, inner_radius=2, num_steps=20)),
                                         ("tree-ring", dict(radius=8, num_steps=20)),
                                         ("gaussian-shading", dict(num_steps=20, hw_copy=8))])
def test_generate_then_detect_through_the_sd_adapter(tiny_sd_watermark_backend, name, config):
    b = tiny_sd_watermark_backend
    m = load_method(name, b, **config)
    keys = _keys(name, 4)
    z0 = m.generate_latents(keys[:2], [1, 2], prompts=["a photo of a red cat", "a blue house"])
    assert z0.shape == (2, *b.latent_shape)
    grid = ddim.make_grid(b, 20)
    det = m.score(ddim.invert(b, z0, grid, 0, m.inversion.position), keys)
    assert [d.key_id for d in det] == [keys[0].key_id, keys[1].key_id]
    assert all(d.detected and d.p_value < 1e-6 for d in det)
    # the decode path runs and gives images of the pipeline's size
    images = m.generate(keys[:1], [3], prompts=["a photo of a red cat"])
    assert images.shape == (1, b.image_size, b.image_size, 3) and images.dtype == np.uint8
