"""Tree-Ring (Wen et al., 2023): a ring key in the low frequencies (shifted spectrum, centred on
DC) of one channel of the initial noise x_T; detection inverts DDIM all the way back to x_T.

Server scenario only: the key lives in x_T, so an existing image cannot be watermarked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from shallowmark.core import ddim
from shallowmark.core.watermarks import rings
from shallowmark.core.watermarks.base import LatentMethod, ModelEvals
from shallowmark.errors import InvalidParameterError, check_int
from shallowmark.keys import MethodKey


@dataclass(frozen=True)
class TreeRingConfig:
    """Tree-Ring's parameters (also RingID's): the reference's channel 3, radius 10, unit strength."""

    num_steps: int = 50     # DDIM steps of generation and of the inversion in detection
    channel: int = 3        # latent channel that carries the key
    radius: int = 10        # outermost key ring, in frequency bins (the whole disc 0..radius)
    strength: float = 1.0   # scale of the ring values

    def validate(self, latent_shape) -> None:
        if latent_shape is None:
            raise InvalidParameterError("tree-ring and ringid need a diffusion backend")
        check_int("num_steps", self.num_steps, 1)
        check_int("channel", self.channel, 0, latent_shape[0] - 1)
        if isinstance(self.strength, bool) or not isinstance(self.strength, (int, float)) or not self.strength > 0:
            raise InvalidParameterError(f"strength must be a number > 0; got {self.strength!r}")
        rings.RingGeometry(int(latent_shape[-1]), self.radius, "dc")  # checks the radius for this size


class TreeRing(rings.RingKeyed, LatentMethod):
    name = "tree-ring"
    supports_embed = False
    config_class = TreeRingConfig

    def __init__(self, backend, config: TreeRingConfig | None = None):
        self._configure(backend, config)
        self.geom = rings.RingGeometry(backend.latent_shape[-1], self.config.radius, "dc")

    def model_evals(self) -> ModelEvals:
        n = int(self.grid.num_steps)
        return ModelEvals(generate=n, embed=0, verify=n)

    def initial_noise(self, keys: Sequence[MethodKey], seeds: Sequence[int]) -> torch.Tensor:
        x_T = self.backend.randn_latents(seeds)
        return rings.inject(x_T, self.config.channel, self._patterns(keys), self.geom)

    @torch.no_grad()
    def generate_latents(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> torch.Tensor:
        """Watermarked clean latents x_0 (before decoding)."""
        keys = self.check_keys(keys, len(seeds))
        cond = self.backend.encode_prompt(prompts, len(seeds)) if prompts is not None else None
        return ddim.denoise(self.backend, self.initial_noise(keys, seeds), self.grid, self.grid.num_steps, 0, cond=cond)

    def embed(self, keys, images):
        raise NotImplementedError(f"{self.name} writes its key into the initial noise x_T, so it cannot "
                                  "watermark an existing image; use shallow-diffuse for that")
