"""Gaussian Shading (Yang et al., CVPR 2024): a bit message hidden in the signs of the initial noise.

Embedding (server scenario only — the watermark *is* the initial noise x_T, so an existing image
cannot be marked):

1. the key's message ``m`` (``payload_bits(mk, capacity)``) of shape ``(C/ch_copy, H/hw_copy,
   W/hw_copy)`` is tiled to the latent shape: ``ch_copy`` copies along channels and
   ``hw_copy × hw_copy`` along the spatial axes (``np.tile``, as the reference's ``repeat``);
2. the tiled bits are encrypted with ChaCha20 under the key's ``(key, nonce)`` (``chacha20_key_nonce``),
   which makes them look uniform, so the noise below is exactly N(0, 1) per element;
3. each element is drawn from the half of N(0, 1) its encrypted bit selects, by the inverse CDF:
   ``x = Φ⁻¹((u + bit) / 2)`` with ``u ~ U(0, 1)`` from a per-seed generator (bit 1: positive half).

Detection: encode, invert DDIM all the way to x_T, signs → bits, decrypt with each candidate key's
stream, majority vote over the copies → recovered message; ``k`` of ``n = capacity`` bits matching
the key's message gives the p-value ``P(Binomial(n, 1/2) ≥ k)``.

The ChaCha20 key and nonce come from the user key, not fresh per image (so the detector can decrypt).
Consequently every image made with one key starts from noise with the *same sign pattern*; only the
magnitudes (drawn from the seed) differ. The reference implementation does the same within a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from shallowmark.core.watermarks.base import Detection, LatentMethod, ModelEvals, bit_verdict, check_target_fpr
from shallowmark.errors import InvalidParameterError, check_int
from shallowmark.keys import MethodKey, chacha20_key_nonce, payload_bits

__all__ = ["GaussianShading", "GaussianShadingConfig"]

# u is kept inside (0, 1) so that Φ⁻¹ stays finite (|x| <= ~7.0).
_U_EPS = 1e-12
_MAX_CAPACITY = 4096  # what payload_bits can derive


@dataclass(frozen=True)
class GaussianShadingConfig:
    """Gaussian Shading's parameters (the reference's ``ch_copy=1, hw_copy=8``).

    num_steps: DDIM steps for generation and for the inversion in detection.
    ch_copy: copies of the message along the latent channels (must divide C).
    hw_copy: copies along each spatial axis (must divide H and W).
    """

    num_steps: int = 50
    ch_copy: int = 1
    hw_copy: int = 8

    def validate(self, latent_shape) -> None:
        if latent_shape is None:
            raise InvalidParameterError("gaussian-shading needs a diffusion backend")
        for name in ("num_steps", "ch_copy", "hw_copy"):
            check_int(name, getattr(self, name), 1)
        c, h, w = (int(v) for v in latent_shape)
        if c % self.ch_copy or h % self.hw_copy or w % self.hw_copy:
            raise InvalidParameterError(
                f"gaussian-shading: ch_copy ({self.ch_copy}) must divide the latent channels ({c}) and hw_copy "
                f"({self.hw_copy}) must divide the latent height and width ({h}×{w})")
        capacity = (c // self.ch_copy) * (h // self.hw_copy) * (w // self.hw_copy)
        if capacity > _MAX_CAPACITY:
            raise InvalidParameterError(
                f"gaussian-shading: capacity {capacity} bits exceeds {_MAX_CAPACITY}; raise ch_copy or hw_copy")


class GaussianShading(LatentMethod):
    """Gaussian Shading: encrypted message bits in the signs of x_T; detection by full DDIM inversion.

    Args:
        backend: the diffusion backend.
        config: a :class:`GaussianShadingConfig` (steps and copies); default the reference's.

    The message carries ``capacity = C/ch_copy · H/hw_copy · W/hw_copy`` bits (256 for a 4×64×64
    latent with the reference's ``ch_copy=1, hw_copy=8``), each repeated ``ch_copy · hw_copy²`` times.

    Raises:
        InvalidParameterError: bad ``num_steps``, ``ch_copy`` or ``hw_copy``, copies that do not divide
            the latent shape, or a capacity above 4096 bits.
    """

    name = "gaussian-shading"
    supports_embed = False
    config_class = GaussianShadingConfig

    def __init__(self, backend, config: GaussianShadingConfig | None = None):
        self._configure(backend, config)
        self.num_steps, self.ch_copy, self.hw_copy = self.config.num_steps, self.config.ch_copy, self.config.hw_copy
        c, h, w = (int(v) for v in backend.latent_shape)
        self.latent_shape = (c, h, w)
        self.message_shape = (c // self.ch_copy, h // self.hw_copy, w // self.hw_copy)
        self.capacity = int(np.prod(self.message_shape))
        self.copies = self.ch_copy * self.hw_copy * self.hw_copy

    def model_evals(self) -> ModelEvals:
        return ModelEvals(generate=self.num_steps, embed=0, verify=self.num_steps)

    # -- message, tiling and encryption -----------------------------------------------------------
    def message(self, key: MethodKey) -> np.ndarray:
        """The key's ``capacity`` message bits (uint8 0/1)."""
        return payload_bits(key, self.capacity)

    def _keystream(self, key: MethodKey) -> np.ndarray:
        """ChaCha20 keystream bits over the whole latent, shaped (C, H, W).

        Encrypting packed bits with ChaCha20 is XOR with this stream, so encryption and decryption
        are both ``bits ^ keystream``."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        n = int(np.prod(self.latent_shape))
        k, nonce = chacha20_key_nonce(key)
        enc = Cipher(algorithms.ChaCha20(k, nonce), mode=None).encryptor()
        stream = enc.update(bytes((n + 7) // 8)) + enc.finalize()
        return np.unpackbits(np.frombuffer(stream, dtype=np.uint8), bitorder="big")[:n].reshape(self.latent_shape)

    def tile(self, message: np.ndarray) -> np.ndarray:
        """Message bits (``capacity``) -> the latent-shaped (C, H, W) array of copies."""
        m = np.asarray(message, dtype=np.uint8).reshape(self.message_shape)
        return np.tile(m, (self.ch_copy, self.hw_copy, self.hw_copy))

    def vote(self, tiled: np.ndarray) -> np.ndarray:
        """Majority vote over the copies: (..., C, H, W) bits -> (..., capacity) bits (ties -> 0)."""
        t = np.asarray(tiled, dtype=np.int64)
        lead = t.shape[:-3]
        cm, hm, wm = self.message_shape
        t = t.reshape(*lead, self.ch_copy, cm, self.hw_copy, hm, self.hw_copy, wm)
        ones = t.sum(axis=(-6, -4, -2))
        return (2 * ones > self.copies).astype(np.uint8).reshape(*lead, self.capacity)

    def encrypted_bits(self, key: MethodKey) -> np.ndarray:
        """The (C, H, W) sign bits a key writes into x_T: tiled message XOR keystream."""
        return self.tile(self.message(key)) ^ self._keystream(key)

    def decrypt(self, sign_bits: np.ndarray, key: MethodKey) -> np.ndarray:
        """Sign bits (N, C, H, W) of x_T -> the message bits (N, capacity) recovered under ``key``."""
        return self.vote(np.asarray(sign_bits, dtype=np.uint8) ^ self._keystream(key))

    # -- noise ------------------------------------------------------------------------------------
    def _uniform(self, seed: int) -> np.ndarray:
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        u = torch.rand(self.latent_shape, generator=g, dtype=torch.float64).numpy()
        return np.clip(u, _U_EPS, 1.0 - _U_EPS)

    def watermarked_noise(self, keys: Sequence[MethodKey], seeds: Sequence[int]) -> torch.Tensor:
        """The watermarked x_T: per element ``Φ⁻¹((u + bit) / 2)``, ``u`` from the seed, ``bit`` the
        key's encrypted bit. Same key and seed, same noise, whatever the batch."""
        from scipy.stats import norm

        seeds = self.check_seeds(seeds)
        keys = self.check_keys(keys, n=len(seeds))
        cache: dict[MethodKey, np.ndarray] = {}
        out = []
        for k, s in zip(keys, seeds):
            if k not in cache:
                cache[k] = self.encrypted_bits(k)
            out.append(norm.ppf((self._uniform(s) + cache[k]) / 2.0))
        x = torch.from_numpy(np.stack(out).astype(np.float32))
        return x.to(self.backend.device, self.backend.dtype)

    # -- WatermarkMethod --------------------------------------------------------------------------
    def generate_latents(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> torch.Tensor:
        """Watermarked clean latents x_0 (before decoding)."""
        from shallowmark.core.ddim import denoise

        x = self.watermarked_noise(keys, seeds)
        cond = self.backend.encode_prompt(prompts, x.shape[0]) if prompts is not None else None
        with torch.no_grad():
            return denoise(self.backend, x, self.grid, self.grid.num_steps, 0, cond=cond)

    def reference(self, seeds: Sequence[int], prompts=None) -> np.ndarray:
        """Same-seed images from plain N(0, 1) noise (``backend.randn_latents``).

        Gaussian Shading replaces x_T itself (its signs are the key's encrypted bits, its magnitudes
        a different draw), so this "same-seed" image shares no noise with the watermarked one and
        differs far more than it does for the ring methods, which only perturb x_T's spectrum. Use it
        for distribution-level fidelity (FID/CLIP), not for a paired PSNR.
        """
        return super().reference(self.check_seeds(seeds), prompts)

    def embed(self, keys: Sequence[MethodKey], images: np.ndarray) -> np.ndarray:
        raise NotImplementedError(
            f"{self.name} cannot watermark an existing image: its watermark is the initial noise of "
            "generation. Use generate() (server scenario), or a method with supports_embed=True")

    def _score(self, x_t: torch.Tensor, keys: list[MethodKey], target_fpr: float) -> list[Detection]:
        """Sign bits of x_T, decrypted and voted under each key, against that key's message."""
        signs = (x_t.detach().float().cpu().numpy() > 0).astype(np.uint8)
        recovered = np.stack([self.decrypt(signs, k) for k in keys], axis=1)  # (N, K, capacity)
        expected = np.stack([self.message(k) for k in keys])                    # (K, capacity)
        return [bit_verdict(self.name, recovered[i], expected, keys, target_fpr, self.num_steps)
                for i in range(signs.shape[0])]

    @staticmethod
    def threshold_for_fpr(n_bits: int, fpr: float) -> float:
        """Smallest bit accuracy ``k/n`` with ``P(Binomial(n, 1/2) ≥ k) ≤ fpr``.

        Gives 167/256 at FPR 1e-6. The reference's τ = 166/256 comes from taking the smallest ``i``
        with ``P(X > i) ≤ fpr`` and then accepting ``accuracy ≥ i/n``, which lets ``k = i`` through
        although ``P(X ≥ 166) ≈ 1.18e-6 > 1e-6``; this helper keeps the FPR at or below the target.
        """
        from scipy.stats import binom

        n = check_int("n_bits", n_bits, 1)
        fpr = check_target_fpr(fpr)
        ks = np.arange(n + 2)
        tail = binom.sf(ks - 1, n, 0.5)  # P(X >= k); 0 at k = n + 1
        return float(ks[np.argmax(tail <= fpr)]) / n

    # -- helpers ----------------------------------------------------------------------------------
