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
        from diffusers import DDIMScheduler, UNet2DModel

        path = Path(path) if path else DEFAULT_PATH
        self.path = path
        self.device, self.dtype = torch.device(device), dtype
        self.vae = _load_vae(path / "vae", dtype).to(self.device).eval()
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


def _load_vae(folder: Path, dtype: torch.dtype):
    """The folder's ``AutoencoderKL``. A variant trained with ``--vae-from`` on the embedded autoencoder
    may ship only ``vae/config.json`` (its own latent statistics) without weights: then the weights
    are the embedded model's, with the variant's ``latents_mean``/``latents_std``."""
    import json

    from diffusers import AutoencoderKL

    from shallowmark.errors import InvalidParameterError

    if any(folder.glob("diffusion_pytorch_model*")) or not (folder / "config.json").is_file():
        return AutoencoderKL.from_pretrained(folder, torch_dtype=dtype, low_cpu_mem_usage=False)
    own = json.loads((folder / "config.json").read_text())
    vae = AutoencoderKL.from_pretrained(DEFAULT_PATH / "vae", torch_dtype=dtype, low_cpu_mem_usage=False)
    arch = ("block_out_channels", "latent_channels", "layers_per_block", "down_block_types", "up_block_types")
    same = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731 - JSON lists vs config tuples
    diff = [k for k in arch if k in own and same(own[k]) != same(vae.config[k])]
    if diff:
        raise InvalidParameterError(f"{folder} has no autoencoder weights and its config differs from the embedded "
                                    f"autoencoder in {', '.join(diff)}: it cannot reuse those weights")
    vae.register_to_config(latents_mean=own.get("latents_mean"), latents_std=own.get("latents_std"),
                           scaling_factor=own.get("scaling_factor", vae.config.scaling_factor),
                           shift_factor=own.get("shift_factor"))
    return vae
