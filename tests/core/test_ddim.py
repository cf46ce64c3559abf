import numpy as np
import pytest
import torch

from shallowmark.core import ddim
from shallowmark.core.backends import load_backend
from shallowmark.core.images import to_uint8
from shallowmark.errors import InvalidParameterError, InvalidShapeError


def test_grid_matches_diffusers_ddim_timesteps(tiny_ldm, ddim_grid):
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(tiny_ldm.scheduler_config)
    s.set_timesteps(50)
    assert list(ddim_grid.timesteps) == sorted(int(t) for t in s.timesteps)
    assert ddim_grid.num_steps == 50
    assert ddim_grid.position(0.3) == 15
    assert float(ddim_grid.alphas[0]) == pytest.approx(float(s.final_alpha_cumprod))


def test_same_seed_bit_identical_other_seed_differs(tiny_ldm, ddim_grid):
    def gen(seed):
        z = ddim.denoise(tiny_ldm, tiny_ldm.randn_latents([seed]), ddim_grid, 50)
        return to_uint8(tiny_ldm.decode(z))[0]

    a, b, c = gen(7), gen(7), gen(8)
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5


def test_batched_sampling_equals_one_by_one(tiny_ldm, ddim_grid):
    batch = ddim.denoise(tiny_ldm, tiny_ldm.randn_latents([1, 2]), ddim_grid, 50, 45)
    single = ddim.denoise(tiny_ldm, tiny_ldm.randn_latents([2]), ddim_grid, 50, 45)
    assert torch.allclose(batch[1:], single, atol=1e-4)


def test_segments_compose(tiny_ldm, ddim_grid):
    """T→t* then t*→0 equals T→0, and 0→t*→T equals 0→T: callers can stop and start anywhere."""
    xT = tiny_ldm.randn_latents([3])
    direct = ddim.denoise(tiny_ldm, xT, ddim_grid, 50, 0)
    split = ddim.denoise(tiny_ldm, ddim.denoise(tiny_ldm, xT, ddim_grid, 50, 15), ddim_grid, 15, 0)
    assert torch.equal(direct, split)
    up = ddim.invert(tiny_ldm, direct, ddim_grid, 0, 50)
    up2 = ddim.invert(tiny_ldm, ddim.invert(tiny_ldm, direct, ddim_grid, 0, 15), ddim_grid, 15, 50)
    assert torch.equal(up, up2)


def test_shallow_round_trip_beats_full_round_trip(tiny_ldm, ddim_grid):
    z0 = ddim.denoise(tiny_ldm, tiny_ldm.randn_latents([4, 5]), ddim_grid, 50)
    full = ddim.denoise(tiny_ldm, ddim.invert(tiny_ldm, z0, ddim_grid, 0, 50), ddim_grid, 50)
    shallow = ddim.denoise(tiny_ldm, ddim.invert(tiny_ldm, z0, ddim_grid, 0, 15), ddim_grid, 15)
    e_full, e_shallow = ddim.relative_l2(full, z0), ddim.relative_l2(shallow, z0)
    assert (e_shallow < e_full).all()
    assert (e_shallow < 0.1).all()


def test_analytic_round_trip_is_nearly_exact():
    b = load_backend("analytic", latent_shape=(1, 8, 8), rank=4, clusters=2)
    g = ddim.make_grid(b, 50)
    x0 = b.sample_data(4)
    back = ddim.denoise(b, ddim.invert(b, x0, g), g, 50)
    assert ddim.relative_l2(back, x0).max() < 0.02


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, float("nan")])
def test_t_star_outside_unit_interval_is_refused(ddim_grid, fraction):
    with pytest.raises(InvalidParameterError, match=r"t\* must be a fraction of T in \(0, 1\]"):
        ddim_grid.position(fraction)


def test_bad_segments_and_shapes_are_refused(tiny_ldm, ddim_grid):
    x = tiny_ldm.randn_latents([0])
    with pytest.raises(InvalidParameterError, match="stop .* must be <= start"):
        ddim.denoise(tiny_ldm, x, ddim_grid, 10, 20)
    with pytest.raises(InvalidParameterError, match=r"grid positions must be in \[0, 50\]"):
        ddim.invert(tiny_ldm, x, ddim_grid, 0, 51)
    with pytest.raises(InvalidShapeError, match=r"expects latents of shape \(batch, 4, 64, 64\); got \(1, 4, 32, 32\)"):
        ddim.denoise(tiny_ldm, torch.zeros(1, 4, 32, 32), ddim_grid, 5)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidShapeError, match="NaN"):
        ddim.invert(tiny_ldm, bad, ddim_grid, 0, 5)
    with pytest.raises(InvalidParameterError, match="num_steps"):
        ddim.make_grid(tiny_ldm, 0)
