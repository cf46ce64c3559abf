"""Fashion-MNIST and small pixel-space diffusion models trained on it, for the analyses that need a
model which can both memorize and generalize.

tiny-ldm is trained on crops of eleven photos, so it can only memorize; the talk's claims about two
regimes, low-rank Jacobians at medium noise and LOCO's properties are about models of real data.
Here:

- :func:`load_fashion_mnist`: the 70 000 28×28 images from their IDX files (Debian's
  ``dataset-fashion-mnist`` puts them under :data:`DEFAULT_DIR`; any folder with the four files works);
- :class:`PixelUNet`: an ε-predicting U-Net on 28×28 (28 → 14 → 7), whose width sets its capacity;
- :class:`Schedule`: the variance-preserving cosine schedule, T = 1000 discrete steps;
- :func:`train_model`: denoising score matching (ε-MSE) with Adam;
- :func:`ddim_sample` / :func:`ddim_invert`: the deterministic DDIM sampler (η = 0) and its inversion;
- :class:`EmpiricalOptimum`: the closed-form minimiser of the same loss on a finite training set,
  ``E[x0 | x_t] = Σ_i softmax_i(−‖x_t − √ᾱ y_i‖² / 2(1−ᾱ)) y_i``, which reproduces only training
  images: the memorization limit every trained model is compared with.

Pixels are scaled to [−1, 1]; an image tensor is (B, 1, 28, 28), float32.
"""

from __future__ import annotations

import gzip
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from shallowmark.errors import InvalidParameterError, ShallowmarkError

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
PACKAGE = "dataset-fashion-mnist"
SIDE = 28
DIM = SIDE * SIDE
T = 1000
_FILES = {"train": ("train-images-idx3-ubyte", 60_000), "test": ("t10k-images-idx3-ubyte", 10_000)}


class DatasetMissingError(ShallowmarkError):
    """The Fashion-MNIST files are not where they were looked for."""


class DatasetFormatError(ShallowmarkError):
    """A file is there but is not an IDX image file of 28×28 uint8 images."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 16:
        raise DatasetFormatError(f"{path}: {len(raw)} bytes, too short for an IDX image file")
    magic, n, rows, cols = struct.unpack(">IIII", raw[:16])
    if magic != 0x00000803 or (rows, cols) != (SIDE, SIDE):
        raise DatasetFormatError(f"{path}: magic {magic:#010x}, {rows}×{cols}; an IDX file of 28×28 uint8 images "
                                 "has magic 0x00000803")
    if len(raw) != 16 + n * DIM:
        raise DatasetFormatError(f"{path}: header says {n} images ({16 + n * DIM} bytes), the file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, SIDE, SIDE)


def load_fashion_mnist(split: str = "train", folder: str | Path | None = None) -> np.ndarray:
    """The Fashion-MNIST images of ``split`` ("train": 60 000, "test": 10 000, "all": 70 000) as
    (n, 28, 28) uint8, from ``folder`` (default :data:`DEFAULT_DIR`), gzipped or not. A folder may
    hold fewer images than Fashion-MNIST's files (a slice); the header must match the data.

    Raises:
        DatasetMissingError: a file is missing; the message names the Debian package that ships them.
        DatasetFormatError: a file is not a 28×28 IDX image file or is truncated.
    """
    if split not in ("train", "test", "all"):
        raise InvalidParameterError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    root = Path(folder) if folder is not None else DEFAULT_DIR
    parts = []
    for name in (("train", "test") if split == "all" else (split,)):
        stem, count = _FILES[name]
        found = [p for p in (root / f"{stem}.gz", root / stem) if p.is_file()]
        if not found:
            raise DatasetMissingError(
                f"Fashion-MNIST: {stem}[.gz] not found in {root}. Install the Debian package {PACKAGE} "
                f"(apt-get install {PACKAGE}, files under {DEFAULT_DIR}) or pass the folder holding the IDX files")
        # any count: a user's folder may hold a slice (Fashion-MNIST's own files hold `count`)
        parts.append(_read_idx(found[0]))
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, 28, 28) uint8 -> (n, 1, 28, 28) float32 in [−1, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 127.5 - 1.0).reshape(-1, 1, SIDE, SIDE)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(n, 1, 28, 28) in [−1, 1] -> (n, 28, 28) uint8 (clipped)."""
    return ((x.detach().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).reshape(-1, SIDE, SIDE).numpy()


def subset(images: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """The first ``n`` of one fixed permutation of ``images``: nested subsets (the images of the
    2⁶ set are in the 2⁷ set and so on), so that growing N only adds data."""
    if not 1 <= n <= len(images):
        raise InvalidParameterError(f"a subset of {len(images)} images needs 1 <= n <= {len(images)}; got {n}")
    order = np.random.default_rng(seed).permutation(len(images))
    return images[np.sort(order[:n])]


# ----------------------------------------------------------------------------------------------
# Noise schedule
# ----------------------------------------------------------------------------------------------

class Schedule:
    """Variance preserving, cosine (Nichol & Dhariwal 2021): ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
    normalised to ᾱ(0) = 1, for integer t in 1..T, with each step's β clipped at 0.999;
    ``x_t = √ᾱ x0 + √(1−ᾱ) ε``."""

    def __init__(self, steps: int = T, s: float = 0.008):
        self.steps = int(steps)
        t = torch.arange(self.steps + 1, dtype=torch.float64)
        f = torch.cos((t / self.steps + s) / (1 + s) * math.pi / 2) ** 2
        # through the betas, clipped at 0.999 as Nichol & Dhariwal do: ᾱ would reach 0 at t = T
        beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        self.alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - beta, 0)]).float()

    def ab(self, t) -> torch.Tensor:
        """ᾱ at integer steps ``t`` (tensor or int)."""
        return self.alpha_bar[torch.as_tensor(t, dtype=torch.long)]

    def grid(self, num_steps: int, t_end: int | None = None) -> list[int]:
        """DDIM's ``num_steps`` + 1 time points from ``t_end`` (default T) down to 0, evenly spaced."""
        t_end = self.steps if t_end is None else int(t_end)
        if num_steps < 1 or not 1 <= t_end <= self.steps:
            raise InvalidParameterError(f"a DDIM grid needs num_steps >= 1 and 1 <= t_end <= {self.steps}; "
                                        f"got {num_steps}, {t_end}")
        return sorted({int(round(v)) for v in np.linspace(0, t_end, num_steps + 1)}, reverse=True)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------

def _groups(c: int) -> int:
    return next(g for g in (8, 4, 2, 1) if c % g == 0)


class _Res(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb: int):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(_groups(c_in), c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.e = nn.Linear(emb, c_out)
        self.n2, self.c2 = nn.GroupNorm(_groups(c_out), c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, e):
        h = self.c1(nn.functional.silu(self.n1(x))) + self.e(e)[:, :, None, None]
        return self.skip(x) + self.c2(nn.functional.silu(self.n2(h)))


class PixelUNet(nn.Module):
    """ε-prediction U-Net for 1×28×28: ``width`` channels at 28², 2·width at 14² and 7², one residual
    block per level on the way down and up, skip connections, a sinusoidal embedding of t/T.
    Width 16 has 0.19 M parameters, width 48 1.7 M."""

    def __init__(self, width: int = 32):
        super().__init__()
        if not isinstance(width, int) or width < 4:
            raise InvalidParameterError(f"width must be an integer >= 4; got {width!r}")
        self.width = width
        c1, c2, emb = width, 2 * width, 4 * width
        self.emb = nn.Sequential(nn.Linear(width, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.inp = nn.Conv2d(1, c1, 3, padding=1)
        self.d1, self.down1 = _Res(c1, c1, emb), nn.Conv2d(c1, c1, 3, stride=2, padding=1)   # 28 -> 14
        self.d2, self.down2 = _Res(c1, c2, emb), nn.Conv2d(c2, c2, 3, stride=2, padding=1)   # 14 -> 7
        self.mid = _Res(c2, c2, emb)
        self.u2 = _Res(2 * c2, c2, emb)
        self.u1 = _Res(c2 + c1, c1, emb)
        self.out = nn.Sequential(nn.GroupNorm(_groups(c1), c1), nn.SiLU(), nn.Conv2d(c1, 1, 3, padding=1))

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.width // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
        a = (t.float()[:, None] / T) * 1000.0 * freqs[None]
        return self.emb(torch.cat([torch.sin(a), torch.cos(a)], dim=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self._embed(t.expand(x.shape[0]) if t.ndim == 0 else t)
        h0 = self.inp(x)
        h1 = self.d1(h0, e)
        h2 = self.d2(self.down1(h1), e)
        h = self.mid(self.down2(h2), e)
        h = nn.functional.interpolate(h, size=h2.shape[-2:], mode="nearest")
        h = self.u2(torch.cat([h, h2], 1), e)
        h = nn.functional.interpolate(h, size=h1.shape[-2:], mode="nearest")
        h = self.u1(torch.cat([h, h1], 1), e)
        return self.out(h)


class ResMLP(nn.Module):
    """ε-prediction MLP on the flattened 784 pixels: an input layer to ``width`` units, ``depth``
    pre-norm residual blocks (LayerNorm, Linear, SiLU, Linear) each shifted by an embedding of
    t/T, an output layer back to 784. Dense layers cost a tenth of the U-Net's 28² convolutions on
    a CPU, which is what lets two models per training-set size be trained in minutes."""

    def __init__(self, width: int = 512, depth: int = 3):
        super().__init__()
        if not isinstance(width, int) or width < 8 or not isinstance(depth, int) or depth < 1:
            raise InvalidParameterError(f"an MLP needs integer width >= 8 and depth >= 1; got {width!r}, {depth!r}")
        self.width, self.depth = width, depth
        self.freqs = 64
        self.inp = nn.Linear(DIM + 2 * self.freqs, width)
        self.temb = nn.Sequential(nn.Linear(2 * self.freqs, width), nn.SiLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(),
                                                  nn.Linear(width, width)) for _ in range(depth))
        self.shift = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, DIM))
        # A linear path from input to output, x ↦ g(t)·L·x, with L starting at the identity and the
        # learned gain g(t) at zero, so the net starts as if it had none. EDM's target
        # F = (x0 − c_skip·x̃)/c_out holds −c_skip/(c_out·c_in) times the net's own input, a
        # full-rank term whose weight depends on t; the normalised hidden layers (at most 784 wide)
        # cannot carry it, so without the path the Jacobian of x̂0 keeps a full-rank floor and the
        # net cannot land x̂0 on a training image (memorize). A path without g(t) can cancel the term
        # at one t only: at N = 16, 3000 steps, the 512×3 MLP reached loss 0.310 with a fixed path
        # and copied none of 1000 samples (the regimes report before this change), and 0.128 with
        # g(t), copying 988 of 1000 (docs/analysis/regimes).
        self.linear = nn.Linear(DIM, DIM, bias=False)
        nn.init.eye_(self.linear.weight)
        self.linear_gain = nn.Linear(2 * self.freqs, 1)
        nn.init.zeros_(self.linear_gain.weight)
        nn.init.zeros_(self.linear_gain.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        f = torch.exp(-math.log(1000.0) * torch.arange(self.freqs, dtype=torch.float32) / self.freqs)
        a = (t.float()[:, None] / T) * 1000.0 * f[None]
        te = torch.cat([torch.sin(a), torch.cos(a)], 1)
        h = self.inp(torch.cat([x.reshape(len(x), DIM), te], 1))
        e = self.temb(te)
        for block, shift in zip(self.blocks, self.shift):
            h = h + block(h + shift(e))
        return (self.out(h) + self.linear_gain(te) * self.linear(x.reshape(len(x), DIM))).reshape(x.shape)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_net(config: "TrainConfig") -> nn.Module:
    """The untrained network ``config`` describes (initialised from torch's global generator)."""
    return ResMLP(config.width, config.depth) if config.arch == "mlp" else PixelUNet(config.width)


SIGMA_DATA = 0.5  # EDM's data scale; Fashion-MNIST in [−1, 1] has standard deviation 0.71


def preconditioning(ab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's (Karras et al. 2022) scalings at ᾱ, in the variable x̃ = x_t / √ᾱ = x0 + σ ε with
    σ² = (1 − ᾱ)/ᾱ: ``x0 ≈ c_skip·x̃ + c_out·F(c_in·x̃, t)``; returns (σ, c_skip, c_out, c_in).

    Why not predict ε directly: at high noise ε ≈ x_t, an identity on 784 pixels, which a network
    narrower than 784 cannot represent (the MLP then trains worse than a linear guess). With the
    skip term the network only models the part that is low rank at every t."""
    sigma = ((1 - ab) / ab).sqrt()
    norm = (sigma ** 2 + SIGMA_DATA ** 2).sqrt()
    return sigma, SIGMA_DATA ** 2 / norm ** 2, sigma * SIGMA_DATA / norm, 1 / norm


def denoise_x0(net: nn.Module, x: torch.Tensor, t: torch.Tensor, schedule: "Schedule") -> torch.Tensor:
    """The posterior-mean estimate x̂0(x_t, t) of a network trained by :func:`train_model`."""
    ab = schedule.ab(t).reshape(-1, 1, 1, 1)
    _, c_skip, c_out, c_in = preconditioning(ab)
    xs = x / ab.sqrt()
    return c_skip * xs + c_out * net(c_in * xs, t)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainConfig:
    """Denoising score matching on a fixed training set.

    Attributes:
        arch: ``"mlp"`` (:class:`ResMLP`) or ``"unet"`` (:class:`PixelUNet`, ``depth`` unused).
        width: the network's width (its capacity with ``depth``).
        depth: residual blocks of the MLP.
        steps: optimiser steps (the same for every N, so that only the data changes).
        batch: images per step (drawn with replacement; a set smaller than the batch repeats).
        lr: Adam's learning rate, cosine-decayed to 5 % of it over ``steps``.
        seed: initial weights, batches and noise.
    """

    arch: str = "mlp"
    width: int = 512
    depth: int = 3
    steps: int = 3000
    batch: int = 128
    lr: float = 2e-3
    seed: int = 0

    def check(self) -> None:
        if self.arch not in ("mlp", "unet"):
            raise InvalidParameterError(f"arch must be 'mlp' or 'unet'; got {self.arch!r}")
        for name in ("steps", "batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidParameterError(f"{name} must be a positive integer; got {v!r}")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise InvalidParameterError(f"lr must be in (0, 1); got {self.lr!r}")


@dataclass
class TrainedModel:
    """A trained network, what trained it and what it cost."""

    net: nn.Module
    config: TrainConfig
    n_train: int
    seconds: float
    final_loss: float
    parameters: int


def train_model(images: np.ndarray, config: TrainConfig, schedule: Schedule | None = None,
                log: Optional[Callable[[str], None]] = None) -> TrainedModel:
    """Train the network of ``config`` on ``images`` ((n, 28, 28) uint8) by denoising score matching
    with t uniform in 1..T and EDM's preconditioning (:func:`preconditioning`). The last 10 % of
    steps' mean loss is reported as ``final_loss``."""
    config.check()
    schedule = schedule or Schedule()
    data = to_tensor(images)
    if len(data) == 0:
        raise InvalidParameterError("training needs at least one image")
    g = torch.Generator().manual_seed(int(config.seed))
    torch.manual_seed(int(config.seed))
    net = make_net(config)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(k, config.steps) / config.steps)))
    losses = []
    t0 = time.perf_counter()
    net.train()
    for k in range(config.steps):
        idx = torch.randint(len(data), (config.batch,), generator=g)
        x0 = data[idx]
        t = torch.randint(1, schedule.steps + 1, (config.batch,), generator=g)
        ab = schedule.ab(t)[:, None, None, None]
        eps = torch.randn(x0.shape, generator=g)
        sigma, c_skip, c_out, c_in = preconditioning(ab)
        xs = x0 + sigma * eps  # x_t / √ᾱ
        # EDM's loss: x0-MSE weighted by 1/c_out², i.e. plain MSE on the network's own target
        loss = ((net(c_in * xs, t) - (x0 - c_skip * xs) / c_out) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log and (k + 1) % max(1, config.steps // 4) == 0:
            log(f"  width {config.width} N={len(data)} step {k + 1}/{config.steps} loss {np.mean(losses[-100:]):.4f}")
    net.eval()
    tail = losses[-max(1, config.steps // 10):]
    return TrainedModel(net, config, len(data), time.perf_counter() - t0, float(np.mean(tail)), parameter_count(net))


# ----------------------------------------------------------------------------------------------
# Denoisers: a trained net or the empirical optimum, behind one call
# ----------------------------------------------------------------------------------------------

class Denoiser:
    """``eps(x_t, t)`` predicts the noise of x_t at integer step t; ``x0(x_t, t)`` the posterior mean."""

    schedule: Schedule

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        raise NotImplementedError

    def x0(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ab = self.schedule.ab(t)
        return (x - (1 - ab).sqrt() * self.eps(x, t)) / ab.sqrt()


class NetDenoiser(Denoiser):
    """A network trained by :func:`train_model`, evaluated in chunks of ``batch`` without gradients
    (``x0_grad`` keeps them, for Jacobians)."""

    def __init__(self, net: nn.Module, schedule: Schedule | None = None, batch: int = 500):
        self.net, self.schedule, self.batch = net, schedule or Schedule(), int(batch)

    def x0_grad(self, x: torch.Tensor, t: int) -> torch.Tensor:
        return denoise_x0(self.net, x, torch.full((len(x),), int(t), dtype=torch.long), self.schedule)

    def x0(self, x: torch.Tensor, t: int) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.x0_grad(c, t) for c in x.split(self.batch)])

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ab = self.schedule.ab(t)
        return (x - ab.sqrt() * self.x0(x, t)) / (1 - ab).sqrt()


class EmpiricalOptimum(Denoiser):
    """The denoiser that minimises the training loss exactly on the finite set ``images``: its
    posterior mean is a softmax-weighted average of the training images. DDIM with it lands on a
    training image for almost every noise, so it is what perfect memorization looks like."""

    def __init__(self, images: np.ndarray, schedule: Schedule | None = None, chunk: int = 4096):
        self.y = to_tensor(images).reshape(len(images), -1).double()
        self.y_sq = (self.y ** 2).sum(1)
        self.schedule, self.chunk = schedule or Schedule(), int(chunk)

    def x0(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ab = float(self.schedule.ab(t))
        xf = x.reshape(len(x), -1).double()
        # log-weights −‖x − √ᾱ y‖² / 2(1−ᾱ), without the ‖x‖² term that every y shares; a running
        # log-sum-exp over chunks of the training set keeps memory at chunk × batch.
        m = torch.full((len(x),), -math.inf, dtype=torch.float64)
        s = torch.zeros(len(x), dtype=torch.float64)
        acc = torch.zeros_like(xf)
        for lo in range(0, len(self.y), self.chunk):
            y, ysq = self.y[lo:lo + self.chunk], self.y_sq[lo:lo + self.chunk]
            logw = (2 * math.sqrt(ab) * xf @ y.T - ab * ysq[None]) / (2 * (1 - ab))
            m_new = torch.maximum(m, logw.max(1).values)
            scale = torch.exp(m - m_new)
            w = torch.exp(logw - m_new[:, None])
            s = s * scale + w.sum(1)
            acc = acc * scale[:, None] + w @ y
            m = m_new
        return (acc / s[:, None]).float().reshape(x.shape)

    def eps(self, x: torch.Tensor, t: int) -> torch.Tensor:
        ab = self.schedule.ab(t)
        return (x - ab.sqrt() * self.x0(x, t)) / (1 - ab).sqrt()


# ----------------------------------------------------------------------------------------------
# Deterministic sampling and inversion
# ----------------------------------------------------------------------------------------------

def initial_noise(n: int, seed: int) -> torch.Tensor:
    """``n`` standard normal x_T of shape (n, 1, 28, 28), the same for every model given ``seed``."""
    return torch.randn((n, 1, SIDE, SIDE), generator=torch.Generator().manual_seed(int(seed)))


def ddim_steps(denoiser: Denoiser, x: torch.Tensor, times: Sequence[int]) -> torch.Tensor:
    """DDIM (η = 0) along ``times`` (decreasing: sampling; increasing: inversion), x0 clipped to
    [−1, 1] when sampling as the data lies there."""
    sch = denoiser.schedule
    down = times[0] > times[-1]
    for a, b in zip(times[:-1], times[1:]):
        ab_a, ab_b = sch.ab(a), (sch.ab(b) if b > 0 else torch.tensor(1.0))
        if a == 0:
            eps = denoiser.eps(x, 1)  # inversion's first step: the noise prediction at the smallest t
            x0 = x
        else:
            eps = denoiser.eps(x, a)
            x0 = (x - (1 - ab_a).sqrt() * eps) / ab_a.sqrt()
            if down:
                x0 = x0.clamp(-1, 1)
                eps = (x - ab_a.sqrt() * x0) / (1 - ab_a).sqrt()
        x = ab_b.sqrt() * x0 + (1 - ab_b).sqrt() * eps
    return x


def ddim_sample(denoiser: Denoiser, noise: torch.Tensor, num_steps: int = 50, t_end: int | None = None) -> torch.Tensor:
    """x_T (or x at ``t_end``) -> x_0 with ``num_steps`` DDIM steps."""
    return ddim_steps(denoiser, noise, denoiser.schedule.grid(num_steps, t_end))


def ddim_invert(denoiser: Denoiser, x0: torch.Tensor, t_end: int, num_steps: int) -> torch.Tensor:
    """x_0 -> x at ``t_end`` by running DDIM's update backwards (the inversion Shallow Diffuse verifies by)."""
    return ddim_steps(denoiser, x0, denoiser.schedule.grid(num_steps, t_end)[::-1])
