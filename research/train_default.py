"""Train the embedded default model ``tiny-ldm`` from the photos that ship inside installed wheels.

Two stages inside one wall-clock budget:

1. an ``AutoencoderKL`` (f=4, 4 latent channels, no attention) on random rescaled crops with colour
   augmentation; L1 + MSE, a tiny KL, and — in the second half — a latent cycle term
   ``|E(D(z + n)) - (z + n)|`` that keeps encode∘decode close to the identity near the data, which
   every latent-space watermark relies on when it re-encodes a decoded image;
2. a ``UNet2DModel`` (eps prediction, Stable Diffusion's scaled-linear schedule, 1000 steps) on the
   latents of fresh crops, with an EMA of the weights (the EMA is what is saved).

The same command runs on the CPU (slowly) or a GPU; the saved folder is plain diffusers format.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shallowmark.errors import InvalidParameterError

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 128), layers_per_block=1, norm_num_groups=16,
    mid_block_add_attention=False, sample_size=256,
)
UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(32, 64, 128, 128),
    down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4,
    add_attention=False, norm_num_groups=16,
)
# Stable Diffusion's schedule, so the watermark parameters of the reference code apply unchanged.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    timestep_spacing="leading",
)


@dataclass
class TrainConfig:
    """Everything that decides the trained weights. ``budget_s`` is wall-clock for both stages."""

    out_dir: str
    device: str = "cpu"
    budget_s: float = 600.0
    vae_share: float = 0.4          # fraction of the budget spent on the autoencoder
    seed: int = 0
    vae_batch: int = 8
    vae_crop: int = 128
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    cycle_weight: float = 0.5
    pool: int = 1024                # distinct 256² crops made up front; batches are drawn from them
    unet_batch: int = 32
    unet_lr: float = 4e-4
    ema_decay: float = 0.999
    offset_noise: float = 0.1       # per-channel DC noise: stops the UNet reading colour off x_T
    vae_from: str | None = None     # reuse a trained autoencoder folder and skip stage 1
    unet_steps: int | None = None   # run exactly this many UNet steps (LR schedule over steps), not to the deadline
    bf16: bool = False              # autocast on CUDA; parameters stay fp32
    save_fp16: bool = True          # halves the committed size; loaded back as fp32
    photos: dict = field(default_factory=dict, repr=False)  # name -> uint8 image; empty = from wheels

    def validate(self) -> None:
        if self.budget_s <= 0:
            raise InvalidParameterError(f"budget must be positive seconds, got {self.budget_s}")
        if not 0.05 <= self.vae_share <= 0.95:
            raise InvalidParameterError(f"vae_share must be in [0.05, 0.95], got {self.vae_share}")
        if self.vae_crop % 4 or self.vae_crop < 32:
            raise InvalidParameterError(f"vae_crop must be a multiple of 4 and >= 32, got {self.vae_crop}")
        if self.unet_steps is not None and int(self.unet_steps) < 1:
            raise InvalidParameterError(f"unet_steps must be a positive number of steps, got {self.unet_steps}")


class CropSampler:
    """Random rescaled crops of the training photos, with flips and colour augmentation, on device.

    ``sample`` cuts fresh crops one by one (slow per image on a GPU); ``make_pool`` does that once
    and ``from_pool`` then draws augmented batches from the pool with a few vectorised ops.
    """

    def __init__(self, photos: dict[str, np.ndarray], device: torch.device, generator: torch.Generator):
        self.names = sorted(photos)
        self.images = [torch.tensor(photos[n]).permute(2, 0, 1).float().div(127.5).sub(1).to(device)
                       for n in self.names]
        area = np.array([im.shape[1] * im.shape[2] for im in self.images], dtype=np.float64)
        self.weights = torch.tensor(np.sqrt(area) / np.sqrt(area).sum())  # big photos more often, not dominant
        self.g = generator
        self.device = device

    def _rand(self, *shape) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g)

    def sample(self, batch: int, size: int, colour: float = 1.0) -> torch.Tensor:
        """``batch`` crops of ``size``², in [-1, 1]; ``colour`` scales the colour augmentation."""
        idx = torch.multinomial(self.weights, batch, replacement=True, generator=self.g)
        out = []
        for i in idx.tolist():
            im = self.images[i]
            h, w = im.shape[1:]
            short = min(h, w)
            # region side in source pixels: from a quarter of the photo (zoomed in) up to all of it
            lo, hi = max(size * 0.75, short * 0.2), short
            region = int(math.exp(math.log(lo) + (math.log(max(hi, lo)) - math.log(lo)) * float(self._rand(1))))
            region = min(region, short)
            top = int(self._rand(1) * (h - region + 1))
            left = int(self._rand(1) * (w - region + 1))
            crop = im[:, top:top + region, left:left + region].unsqueeze(0)
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=region > size,
                                 align_corners=False)
            if self._rand(1) < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
        x = torch.cat(out)
        if colour > 0:
            x = _colour_augment(x, colour, self._rand)
        return x.clamp(-1, 1)


    def make_pool(self, n: int, size: int = 256, chunk: int = 64) -> torch.Tensor:
        return torch.cat([self.sample(min(chunk, n - i), size, colour=0.0) for i in range(0, n, chunk)])

    def from_pool(self, pool: torch.Tensor, batch: int, size: int, colour: float = 1.0) -> torch.Tensor:
        """``batch`` random ``size``² windows of random pool crops (one window offset per batch),
        randomly flipped, colour-augmented."""
        idx = torch.randint(0, pool.shape[0], (batch,), generator=self.g).to(pool.device)
        full = pool.shape[-1]
        top, left = (int(self._rand(1) * (full - size + 1)) for _ in range(2))
        x = pool[idx, :, top:top + size, left:left + size].float()
        flip = (self._rand(batch) < 0.5).to(pool.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if colour > 0:
            x = _colour_augment(x, colour, self._rand)
        return x.clamp(-1, 1)


def _colour_augment(x: torch.Tensor, strength: float, rand) -> torch.Tensor:
    """Per-image channel gains, a small colour mix, brightness/contrast, sometimes a channel
    permutation. The photos are warm-toned; without this a blue sky comes back orange."""
    b = x.shape[0]
    dev = x.device
    gains = (1 + strength * 0.25 * (rand(b, 3) * 2 - 1)).to(dev)
    mix = torch.eye(3) + strength * 0.08 * (rand(b, 3, 3) * 2 - 1)
    x = torch.einsum("bij,bjhw->bihw", mix.to(dev), x * gains[:, :, None, None])
    contrast = (1 + strength * 0.3 * (rand(b) * 2 - 1)).to(dev)[:, None, None, None]
    bright = (strength * 0.2 * (rand(b) * 2 - 1)).to(dev)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * contrast + mean + bright
    perm = rand(b) < 0.3 * strength
    if perm.any():
        for i in torch.nonzero(perm).flatten().tolist():
            x[i] = x[i, torch.randperm(3)]
    return x


def _lr_at(frac: float, base: float, warmup: float = 0.03) -> float:
    if frac < warmup:
        return base * frac / warmup
    return base * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(1.0, (frac - warmup) / (1 - warmup)))))


def _autocast(cfg: TrainConfig, device: torch.device):
    if cfg.bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_default(cfg: TrainConfig, log=print) -> dict:
    """Train ``tiny-ldm`` into ``cfg.out_dir`` (``vae/``, ``unet/``, ``scheduler/``, ``training_log.json``).

    Returns the training log (steps, seconds, losses) that the model card quotes.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from shallowmark.core.photos import training_photos

    cfg.validate()
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    photos = cfg.photos or training_photos()
    sampler = CropSampler(photos, device, g)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = sampler.make_pool(cfg.pool, 256)
    log(f"pool of {cfg.pool} crops in {time.perf_counter() - t0:.1f}s")
    vae_deadline = t0 + cfg.budget_s * cfg.vae_share
    deadline = t0 + cfg.budget_s

    # ---- stage 1: autoencoder ------------------------------------------------------------------
    if cfg.vae_from:
        vae = AutoencoderKL.from_pretrained(cfg.vae_from, torch_dtype=torch.float32).to(device)
        prior = json.loads((Path(cfg.vae_from).parent / "training_log.json").read_text()) \
            if (Path(cfg.vae_from).parent / "training_log.json").exists() else {}
        vae_deadline = t0  # skip the loop
    else:
        vae = AutoencoderKL(**VAE_CONFIG).to(device)
        prior = {}
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae_log, step = list(prior.get("vae_log", [])), int(prior.get("vae_steps", 0))
    while time.perf_counter() < vae_deadline or (step == 0 and not cfg.vae_from):  # at least one step
        frac = (time.perf_counter() - t0) / (vae_deadline - t0)
        for group in opt.param_groups:
            group["lr"] = _lr_at(frac, cfg.vae_lr)
        x = sampler.from_pool(pool, cfg.vae_batch, cfg.vae_crop)
        with _autocast(cfg, device):
            post = vae.encode(x).latent_dist
            z = post.mode()
            rec = vae.decode(z).sample.float()
            l1 = (rec - x).abs().mean()
            mse = F.mse_loss(rec, x)
            kl = post.kl().mean() / z[0].numel()
            loss = l1 + mse + cfg.kl_weight * kl
            cyc = torch.zeros((), device=device)
            if frac > 0.5 and cfg.cycle_weight > 0:
                # z is detached: the cycle term shapes the decoder/encoder pair, not the target.
                zt = z.detach().float()
                zn = zt + 0.1 * zt.std() * torch.randn_like(zt)
                back = vae.encode(vae.decode(zn).sample.clamp(-1, 1)).latent_dist.mode().float()
                cyc = (back - zn).abs().mean() / zt.std()
                loss = loss + cfg.cycle_weight * cyc
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            psnr = -10 * math.log10(max(mse.item() / 4, 1e-12))  # [-1,1] range -> peak-to-peak 2
            vae_log.append(dict(step=step, t=round(time.perf_counter() - t0, 1), l1=l1.item(), psnr=psnr,
                                cycle=cyc.item(), kl=kl.item()))
            log(f"vae step {step} t={vae_log[-1]['t']}s l1={l1.item():.4f} psnr={psnr:.2f} cyc={cyc.item():.4f}")
    vae.eval().requires_grad_(False)
    vae_steps = step

    # Per-channel latent statistics (diffusers' ``latents_mean``/``latents_std``, as SDXL uses them):
    # the UNet sees zero-mean, unit-variance channels. With one global shift the channels keep
    # different means, and the model learns to read them off x_T instead of generating them.
    with torch.no_grad():
        chunk = min(64, cfg.pool)
        latents = torch.cat([vae.encode(sampler.from_pool(pool, chunk, 256, colour=0.3)).latent_dist.mode().float()
                             for _ in range(max(1, cfg.pool // chunk))])
    mean_c = latents.mean(dim=(0, 2, 3))
    std_c = latents.std(dim=(0, 2, 3))
    vae.register_to_config(scaling_factor=1.0, shift_factor=None, latents_mean=mean_c.tolist(),
                           latents_std=std_c.tolist())
    latents = (latents - mean_c.view(1, -1, 1, 1)) / std_c.view(1, -1, 1, 1)
    shift, scale = mean_c.tolist(), (1.0 / std_c).tolist()
    del pool

    # ---- stage 2: UNet on latents --------------------------------------------------------------
    sched = DDIMScheduler(**SCHEDULER_CONFIG)
    abar = sched.alphas_cumprod.to(device)
    unet = UNet2DModel(**UNET_CONFIG).to(device)
    ema = UNet2DModel(**UNET_CONFIG).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    unet_log, step, t1 = [], 0, time.perf_counter()
    # A fixed step count makes a run repeatable on a shared machine (the same seed gives the same
    # weights whatever the load); otherwise the stage fills the wall-clock budget.
    while (step < cfg.unet_steps) if cfg.unet_steps else (time.perf_counter() < deadline or step == 0):
        frac = step / cfg.unet_steps if cfg.unet_steps else (time.perf_counter() - t1) / max(deadline - t1, 1e-9)
        for group in opt.param_groups:
            group["lr"] = _lr_at(frac, cfg.unet_lr)
        z0 = latents[torch.randint(0, latents.shape[0], (cfg.unet_batch,), generator=g).to(device)]
        t = torch.randint(0, sched.config.num_train_timesteps, (z0.shape[0],), generator=g).to(device)
        noise = torch.randn(z0.shape, generator=g)
        if cfg.offset_noise > 0:  # "offset noise": a random constant per sample and channel
            noise = noise + cfg.offset_noise * torch.randn(z0.shape[0], z0.shape[1], 1, 1, generator=g)
        noise = noise.to(device)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        with _autocast(cfg, device):
            pred = unet(zt, t).sample.float()
            loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 50 == 0 or step == 1:
            unet_log.append(dict(step=step, t=round(time.perf_counter() - t0, 1), loss=loss.item()))
            log(f"unet step {step} t={unet_log[-1]['t']}s loss={loss.item():.4f}")

    # ---- save ----------------------------------------------------------------------------------
    dtype = torch.float16 if cfg.save_fp16 else torch.float32
    vae.to("cpu", dtype).save_pretrained(out / "vae")
    ema.to("cpu", dtype).save_pretrained(out / "unet")
    sched.save_pretrained(out / "scheduler")
    record = dict(
        config={k: v for k, v in asdict(cfg).items() if k != "photos"},
        photos=sorted(photos), device_name=_device_name(device), torch=torch.__version__,
        vae_steps=vae_steps, vae_reused_from=cfg.vae_from, unet_steps=step, seconds=round(time.perf_counter() - t0, 1),
        latent_shift=shift, latent_scale=scale, vae_log=vae_log, unet_log=unet_log,
        final=dict(vae_l1=vae_log[-1]["l1"] if vae_log else None, vae_psnr=vae_log[-1]["psnr"] if vae_log else None,
                   vae_cycle=vae_log[-1]["cycle"] if vae_log else None,
                   unet_loss=float(np.mean([r["loss"] for r in unet_log[-5:]])) if unet_log else None),
    )
    (out / "training_log.json").write_text(json.dumps(record, indent=1))
    return record


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
