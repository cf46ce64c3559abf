"""A Fashion-MNIST pixel-space model (:mod:`shallowmark.research.fmnist`) behind the project's
:class:`~shallowmark.core.backends.base.Backend` interface, so that DDIM (:mod:`shallowmark.core.ddim`),
the Jacobian tools and the watermark methods run on it unchanged.

There is no autoencoder: the latents are the pixels, (batch, 1, 28, 28) in [−1, 1], as for the
``analytic`` backend whose latents are its data. Two conventions join it to the rest:

- **time**: the project indexes training timesteps 0..T−1 as diffusers does; the Fashion-MNIST
  models are trained on t = 1..T with ᾱ(0) = 1. Backend timestep k is model step k + 1, so
  ``alphas_cumprod[k] = Schedule.alpha_bar[k + 1]`` — which is also what diffusers'
  ``squaredcos_cap_v2`` schedule computes — and the ``trailing`` DDIM grid of 50 steps is
  Schedule.grid(50) (model steps 1000, 980, …, 20) shifted by one, ending at ᾱ = 1
  (``set_alpha_to_one``) as :func:`~shallowmark.research.fmnist.ddim_steps` does;
- **images**: the project's image API is uint8 RGB, so :meth:`FmnistBackend.decode` repeats the grey
  channel three times and :meth:`FmnistBackend.encode` reads a grey image (three equal channels)
  as that channel, so the round trip is the identity; any other RGB image is read as the mean of
  its channels. Single-channel tensors (batch, 1, 28, 28) are accepted by ``encode`` too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shallowmark.core.backends.base import Backend
from shallowmark.errors import InvalidParameterError, InvalidShapeError
from shallowmark.research import fmnist

#: The diffusers scheduler config equivalent to :class:`~shallowmark.research.fmnist.Schedule`
#: under the time convention of the module docstring (core.ddim.make_grid builds its grid from it).
SCHEDULER_CONFIG = dict(num_train_timesteps=fmnist.T, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon",
                        timestep_spacing="trailing")

#: Channels of the images the backend decodes to (the project's RGB image API).
IMAGE_CHANNELS = 3


class FmnistBackend(Backend):
    """A Fashion-MNIST pixel-space diffusion model (1×28×28, no autoencoder; latents are pixels)."""

    name = "fmnist-pixels"
    latent_shape = (1, fmnist.SIDE, fmnist.SIDE)
    image_size = fmnist.SIDE

    def __init__(self, net: nn.Module, schedule: fmnist.Schedule | None = None, batch: int = 500):
        if not isinstance(net, nn.Module):
            raise InvalidParameterError(f"FmnistBackend needs a trained network (torch.nn.Module); got "
                                        f"{type(net).__name__}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise InvalidParameterError(f"batch must be a positive integer; got {batch!r}")
        self.schedule = schedule or fmnist.Schedule()
        if self.schedule.steps != fmnist.T:
            raise InvalidParameterError(f"the Fashion-MNIST models are trained with T = {fmnist.T}; got a "
                                        f"schedule of {self.schedule.steps} steps")
        self.denoiser = fmnist.NetDenoiser(net, self.schedule, batch)
        self.net = net
        # the float32 table the network was trained with, as float64 (the Backend contract)
        self.alphas_cumprod = self.schedule.alpha_bar[1:].double()
        self.scheduler_config = dict(SCHEDULER_CONFIG)
        self.device, self.dtype = torch.device("cpu"), torch.float32

    # -- the model ----------------------------------------------------------------------------------
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        """ε(x_t, t) at backend timestep(s) ``t`` in 0..T−1 (model step t + 1); differentiable, so the
        Jacobian tools can take JVPs/VJPs through it (the DDIM loops call it under ``no_grad``)."""
        self.check_latents(x_t)
        t = torch.as_tensor(t, dtype=torch.long).flatten()
        if t.numel() not in (1, x_t.shape[0]):
            raise InvalidShapeError(f"{self.name}: give one timestep or one per sample ({x_t.shape[0]}); "
                                    f"got {t.numel()}")
        if int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps:
            raise InvalidParameterError(f"{self.name}: timesteps must be in [0, {self.num_train_timesteps - 1}]; "
                                        f"got {int(t.min())}..{int(t.max())}")
        t = t.expand(x_t.shape[0])
        x = x_t.to(self.dtype)
        out = torch.empty_like(x)
        for step in torch.unique(t).tolist():   # the DDIM loops give one timestep per call
            rows = (t == step).nonzero().flatten()
            xs = x[rows]
            ab = self.schedule.ab(step + 1)
            x0 = torch.cat([self.denoiser.x0_grad(c, step + 1) for c in xs.split(self.denoiser.batch)])
            out = out.index_copy(0, rows, (xs - ab.sqrt() * x0) / (1 - ab).sqrt())
        return out

    def parameter_count(self) -> int:
        return fmnist.parameter_count(self.net)

    # -- images <-> latents -------------------------------------------------------------------------
    def check_images(self, images: torch.Tensor) -> torch.Tensor:
        """Raise a clear error unless ``images`` is a finite (batch, 1 or 3, 28, 28) tensor."""
        s = self.image_size
        if (not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, IMAGE_CHANNELS)
                or tuple(images.shape[2:]) != (s, s)):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise InvalidShapeError(f"{self.name} expects images of shape (batch, 1 or 3, {s}, {s}) in [-1, 1]; "
                                    f"got {shape}")
        if not torch.isfinite(images).all():
            raise InvalidShapeError(f"{self.name}: images contain NaN or infinite values")
        return images

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """The grey image as the latent: an image whose channels are equal gives that channel exactly,
        any other the mean of its channels."""
        x = self.check_images(images).to(self.dtype)
        first = x[:, :1]
        grey = (x == first).flatten(1).all(1).view(-1, 1, 1, 1)
        return torch.where(grey, first, x.mean(1, keepdim=True))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The latent as an RGB image tensor (three equal channels), clipped to [−1, 1]."""
        self.check_latents(latents)
        return latents.float().clamp(-1, 1).expand(-1, IMAGE_CHANNELS, -1, -1).contiguous()
