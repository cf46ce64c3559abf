"""``analytic``: a MoLRG data distribution with its exact posterior mean as the "model".

Instant, and its posterior-mean Jacobian is exactly low rank (rank ≤ K·r), so DDIM, the Jacobian
tools and the null-space projection can be tested against a ground truth. Latents are the data:
``encode``/``decode`` are the identity on (batch, C, H, W) arrays in [-1, 1]-free units.
"""

from __future__ import annotations

from typing import Any

import torch

from shallowmark.core.backends.base import Backend
from shallowmark.core.molrg import MoLRG
from shallowmark.errors import InvalidParameterError

# Stable Diffusion's scaled-linear schedule, as for tiny-ldm.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                        steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")


class AnalyticMoLRG(Backend):
    """Mixture of low-rank Gaussians with the exact posterior mean (no network, no weights)."""

    name = "analytic"

    def __init__(self, latent_shape=(1, 8, 8), rank: int = 4, clusters: int = 1, seed: int = 0,
                 device: str = "cpu", dtype: torch.dtype = torch.float64):
        latent_shape = tuple(int(s) for s in latent_shape)
        if len(latent_shape) != 3 or min(latent_shape) < 1:
            raise InvalidParameterError(f"latent_shape must be (C, H, W) of positive ints; got {latent_shape}")
        betas = torch.linspace(SCHEDULER_CONFIG["beta_start"] ** 0.5, SCHEDULER_CONFIG["beta_end"] ** 0.5,
                               SCHEDULER_CONFIG["num_train_timesteps"], dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.latent_shape = latent_shape
        self.image_size = latent_shape[-1]
        self.device, self.dtype = torch.device(device), dtype
        d = latent_shape[0] * latent_shape[1] * latent_shape[2]
        self.model = MoLRG.random(d, rank, clusters, seed=seed, dtype=dtype)

    def posterior_mean_exact(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a = float(self.alphas_cumprod[int(t)])
        return self.model.posterior_mean(x_t.flatten(1), a).view_as(x_t)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        t = torch.as_tensor(t).flatten()
        if t.numel() > 1 and not bool((t == t[0]).all()):  # one noise level per call keeps it simple
            return torch.cat([self.eps(x_t[i:i + 1], t[i]) for i in range(x_t.shape[0])])
        a = float(self.alphas_cumprod[int(t[0])])
        x0 = self.model.posterior_mean(x_t.flatten(1), a).view_as(x_t)
        return (x_t - a ** 0.5 * x0) / (1 - a) ** 0.5

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.check_latents(images.to(self.dtype))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.check_latents(latents)

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.check_latents(images)

    def parameter_count(self) -> int:
        return int(self.model.bases.numel())

    def sample_data(self, n: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.model.sample(n, g).view(n, *self.latent_shape)
