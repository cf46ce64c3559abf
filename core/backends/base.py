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
    """Base class of the diffusion backends. Subclasses fill in the model-specific parts."""

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
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
