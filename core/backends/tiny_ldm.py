"""``tiny-ldm``: the embedded default model, trained by ``shallowmark train-default``.

Unconditional latent diffusion on 256×256 RGB: an f=4, 4-channel ``AutoencoderKL`` (latents
4×64×64, Stable Diffusion's latent size) and a small ``UNet2DModel``, both in plain diffusers
format under ``shallowmark/core/assets/tiny-ldm``. See the model card there.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch

from shallowmark.core.backends.base import Backend

DEFAULT_PATH = Path(str(resources.files("shallowmark.core.assets") / "tiny-ldm"))


class TinyLDM(Backend):
    """Embedded unconditional latent diffusion model (256², latents 4×64×64), trained on bundled photos."""

    name = "tiny-ldm"

    def __init__(self, path: str | Path | None = None, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

        path = Path(path) if path else DEFAULT_PATH
        self.path = path
        self.device, self.dtype = torch.device(device), dtype
        self.vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype, low_cpu_mem_usage=False).to(self.device).eval()
        self.unet = UNet2DModel.from_pretrained(path / "unet", torch_dtype=dtype, low_cpu_mem_usage=False).to(self.device).eval()
        self.vae.requires_grad_(False)
        self.unet.requires_grad_(False)
        sched = DDIMScheduler.from_pretrained(path / "scheduler")
        self.scheduler_config = dict(sched.config)
        self.alphas_cumprod = sched.alphas_cumprod.double()
        self._init_vae_latents()
        self.latent_shape = (int(self.vae.config.latent_channels), int(self.unet.config.sample_size),
                             int(self.unet.config.sample_size))
        self.image_size = int(self.unet.config.sample_size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def eps(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Any = None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0]) if torch.as_tensor(t).dim() == 0 else t
        return self.unet(x_t.to(self.dtype), t.to(x_t.device)).sample

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.vae.parameters()) + sum(p.numel() for p in self.unet.parameters())
