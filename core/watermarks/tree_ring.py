"""Tree-Ring (Wen et al., 2023): a ring key in the low frequencies (shifted spectrum, centred on
DC) of one channel of the initial noise x_T; detection inverts DDIM all the way back to x_T.

Server scenario only: the key lives in x_T, so an existing image cannot be watermarked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from shallowmark.core import ddim
from shallowmark.core.images import to_tensor
from shallowmark.core.watermarks import rings
from shallowmark.core.watermarks.base import LatentMethod, check_target_fpr, verdict
from shallowmark.keys import MethodKey


@dataclass(frozen=True)
class TreeRingConfig:
    num_steps: int = 50
    channel: int = 3
    radius: int = 10
    strength: float = 1.0


class TreeRing(rings.RingKeyed, LatentMethod):
    name = "tree-ring"
    supports_embed = False

    def __init__(self, backend, config: TreeRingConfig | None = None):
        self.backend = backend
        self.config = config or TreeRingConfig()
        self.grid = ddim.make_grid(backend, self.config.num_steps)
        self.geom = rings.RingGeometry(backend.latent_shape[-1], self.config.radius, "dc")
        self.last_model_evals = 0

    def initial_noise(self, keys: Sequence[MethodKey], seeds: Sequence[int]) -> torch.Tensor:
        x_T = self.backend.randn_latents(seeds)
        return rings.inject(x_T, self.config.channel, self._patterns(keys), self.geom)

    @torch.no_grad()
    def generate_latents(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> torch.Tensor:
        """Watermarked clean latents x_0 (before decoding)."""
        keys = self.check_keys(keys, len(seeds))
        cond = self.backend.encode_prompt(prompts, len(seeds)) if prompts is not None else None
        self.last_model_evals = self.grid.num_steps
        return ddim.denoise(self.backend, self.initial_noise(keys, seeds), self.grid, self.grid.num_steps, 0, cond=cond)

    def embed(self, keys, images):
        raise NotImplementedError(f"{self.name} writes its key into the initial noise x_T, so it cannot "
                                  "watermark an existing image; use shallow-diffuse for that")

    @torch.no_grad()
    def detect(self, images: np.ndarray, keys: Sequence[MethodKey], target_fpr: float = 0.01, prompts=None) -> list:
        target_fpr = check_target_fpr(target_fpr)
        images = self.check_images(images, self.backend.image_size)
        keys = self.check_keys(keys)
        return self.detect_noise(self.invert_for_detection(images), keys, target_fpr, self.grid.num_steps)

    @torch.no_grad()
    def invert_for_detection(self, images: np.ndarray, prompts=None) -> torch.Tensor:
        """x_T of each image (encode, invert 0 → T): the model work of :meth:`detect`, one batched
        call for all images whatever their keys; score it with :meth:`detect_inverted`."""
        images = self.check_images(images, self.backend.image_size)
        # Detection uses the empty prompt, as the reference does: the verifier does not know it.
        z0 = self.backend.encode(to_tensor(images).to(self.backend.device))
        return ddim.invert(self.backend, z0, self.grid, 0, self.grid.num_steps)

    def detect_inverted(self, latents: torch.Tensor, keys: Sequence[MethodKey], target_fpr: float = 0.01) -> list:
        """Detection from :meth:`invert_for_detection`'s output (no model evaluation)."""
        return self.detect_noise(latents, keys, target_fpr, self.grid.num_steps)

    def detect_noise(self, x_T: torch.Tensor, keys: Sequence[MethodKey], target_fpr: float = 0.01,
                     model_evals: int = 0) -> list:
        """Detection from an already recovered x_T, e.g. one inversion shared by several detectors."""
        keys = self.check_keys(keys)
        target_fpr = check_target_fpr(target_fpr)
        self.backend.check_latents(x_T)
        cos, p = self._ring_p_values(x_T, keys)
        return [verdict(self.name, p[i], cos[i].tolist(), keys, target_fpr, model_evals) for i in range(len(cos))]
