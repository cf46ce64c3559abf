"""The one small interface every diffusion model is reached through.

A backend exposes what DDIM sampling, inversion, the posterior-mean Jacobian and the watermark
methods need, and nothing else (in the spirit of k-diffusion's model adapters):

- ``latent_shape`` (C, H, W) and ``image_size``;
- ``encode(images) -> latents`` and ``decode(latents) -> images`` with images as float tensors in
  [-1, 1], NCHW;
- ``eps(x_t, t, cond)``: the noise prediction at integer training timestep(s) ``t``;
- ``alphas_cumprod`` and ``scheduler_config`` (the DDPM schedule the model was trained with);
- ``encode_prompt(prompts)``: conditioning, or ``None`` for unconditional models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from shallowmark.errors import InvalidShapeError


@dataclass(frozen=True)
class BackendInfo:
    """What ``shallowmark models`` prints about a backend."""

    name: str
    latent_shape: tuple[int, int, int]
    image_size: int
    parameters: int
    conditional: bool
    description: str
    default: bool = False


class Backend:
    """Base class of the diffusion backends. Subclasses fill in the model-specific parts.

    Backends with a diffusers ``AutoencoderKL`` in ``self.vae`` call ``_init_vae_latents()`` and get
    ``encode``/``decode`` with diffusers' latent normalisation for free.
    """

    name: str = "base"
    latent_shape: tuple[int, int, int]
    image_size: int
    alphas_cumprod: torch.Tensor  # float64 on CPU, indexed by training timestep
    scheduler_config: dict
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    conditional: bool = False

    # -- model-specific ---------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents of images in [-1, 1] (NCHW at ``image_size``)."""
        self.check_images(images)
        z = self.vae.encode(images.to(self.device, self.dtype)).latent_dist.mode()
        return (z - self._latent_mean) * self._latent_scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (float32 NCHW) from latents."""
        self.check_latents(latents)
        x = self.vae.decode(latents.to(self.device, self.dtype) / self._latent_scale + self._latent_mean).sample
        return x.clamp(-1, 1).float()

    def _init_vae_latents(self) -> None:
        """diffusers' conventions: per-channel ``latents_mean``/``latents_std`` when the VAE config has
        them (as SDXL), else a global ``shift_factor``; both times ``scaling_factor``."""
        c = self.vae.config
        n = int(c.latent_channels)
        mean, std = getattr(c, "latents_mean", None), getattr(c, "latents_std", None)
        mean = list(mean) if mean is not None else [float(getattr(c, "shift_factor", None) or 0.0)] * n
        std = list(std) if std is not None else [1.0] * n
        self._latent_mean = torch.tensor(mean, dtype=self.dtype, device=self.device).view(1, n, 1, 1)
        self._latent_scale = (float(c.scaling_factor) / torch.tensor(std, dtype=self.dtype, device=self.device)
                              ).view(1, n, 1, 1)

    def encode_prompt(self, prompts: Sequence[str] | None, batch: int) -> Any:
        """Conditioning for ``batch`` samples; unconditional models return ``None``."""
        return None

    def parameter_count(self) -> int:
        return 0

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, tuple(self.latent_shape), self.image_size,
                           self.parameter_count(), self.conditional, (self.__doc__ or "").strip().split("\n")[0])

    # -- shared helpers ---------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def check_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Raise a clear error unless ``x`` is a finite batch of this model's latents."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != tuple(self.latent_shape):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InvalidShapeError(
                f"{self.name} expects latents of shape (batch, {', '.join(map(str, self.latent_shape))}); got {shape}")
        if not torch.isfinite(x).all():
            raise InvalidShapeError(f"{self.name}: latents contain NaN or infinite values")
        return x

    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        expect = (3, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expect:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidShapeError(f"{self.name} expects images of shape (batch, 3, {self.image_size}, "
                                    f"{self.image_size}) in [-1, 1]; got {shape}")
        return images

    def randn_latents(self, seeds: Sequence[int]) -> torch.Tensor:
        """Initial noise x_T, one ``torch.Generator`` per seed so a sample never depends on its batch."""
        out = []
        for s in seeds:
            g = torch.Generator(device="cpu").manual_seed(int(s))
            out.append(torch.randn(self.latent_shape, generator=g, dtype=torch.float32))
        return torch.stack(out).to(self.device, self.dtype)
