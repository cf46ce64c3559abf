"""Regeneration attack: noise the image with the model's forward process, then denoise it back.

``regen`` encodes the image to a latent ``z``, draws ``eps ~ N(0, I)`` from the attack's ``rng``,
jumps to grid position ``k = round(strength · 50)`` of a 50-step DDIM grid in one step of the
forward process, ``x_k = sqrt(ᾱ_k) z + sqrt(1 − ᾱ_k) eps``, runs DDIM from ``k`` down to 0
(``k`` model evaluations) and decodes. ``strength`` is the noise level as a fraction of T in
(0, 1); the default 0.2 (10 DDIM steps, training timestep ≈ 200 of 1000) is in the range where
regeneration is known to remove pixel-level watermarks while keeping the picture recognisable
(Zhao et al., "Invisible image watermarks are provably removable using generative AI", 2023); at
0.5 and above the content itself starts to change.

The attack needs the diffusion model, so it is registered with ``context=("model",)``: importing
this module registers it, and it is then called as::

    import shallowmark.attacks.regen  # registers "regen"
    attacked = apply_attack("regen", image, 0.2, rng=np.random.default_rng(0), model=backend)

The image must be the model's size (``backend.image_size`` square). Deterministic for a given
``rng`` state. The package ``__init__`` does not import this module (it needs torch), so
``shallowmark.attacks`` stays light.
"""

from __future__ import annotations

import numpy as np

from shallowmark.errors import InvalidImageError, InvalidParameterError

from .registry import AttackSpec, get_attack, register

#: DDIM steps from T to 0 of the grid the attack moves on; ``strength`` picks a position on it.
GRID_STEPS = 50
DEFAULT_STRENGTH = 0.2

_GRIDS: dict[int, object] = {}


def _grid(model):
    from shallowmark.core import ddim

    g = _GRIDS.get(id(model))
    if g is None or g[0] is not model:
        g = (model, ddim.make_grid(model, GRID_STEPS))
        _GRIDS[id(model)] = g
    return g[1]


def check_strength(strength: float) -> None:
    """The noise level must be strictly inside (0, 1)."""
    if not 0.0 < float(strength) < 1.0:
        raise InvalidParameterError(f"regen strength must be in (0, 1) (a fraction of T); got {strength}")


def regen(image: np.ndarray, strength: float, rng: np.random.Generator, *, model) -> np.ndarray:
    """Regenerate ``image`` with ``model`` from noise level ``strength`` (fraction of T)."""
    import torch

    from shallowmark.core import ddim
    from shallowmark.core.images import to_tensor, to_uint8

    check_strength(strength)
    size = int(model.image_size)
    if image.shape[:2] != (size, size):
        raise InvalidImageError(f"regen with {model.name} needs {size}×{size} images; got "
                                f"{image.shape[1]}×{image.shape[0]}. Resize or crop first")
    grid = _grid(model)
    k = max(1, min(grid.num_steps, round(float(strength) * grid.num_steps)))
    a = float(grid.alphas[k])
    eps = torch.from_numpy(rng.standard_normal((1, *model.latent_shape)).astype(np.float32))
    with torch.no_grad():
        z = model.encode(to_tensor(image).to(model.device))
        x = a ** 0.5 * z + (1.0 - a) ** 0.5 * eps.to(z.device, z.dtype)
        z0 = ddim.denoise(model, x, grid, k, 0)
        return to_uint8(model.decode(z0))[0]


SPEC = AttackSpec(
    "regen", regen, DEFAULT_STRENGTH, (0.0, 1.0),
    f"noise level as a fraction of T in (0, 1), then DDIM back to 0 on a {GRID_STEPS}-step grid",
    check=check_strength, context=("model",),
)


def ensure_registered() -> AttackSpec:
    """Register ``regen`` if it is not registered yet; return its spec."""
    try:
        return get_attack(SPEC.name)
    except KeyError:
        return register(SPEC)


ensure_registered()
