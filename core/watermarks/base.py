"""The one interface every watermark method shares, and its calibrated result type.

A method works on uint8 RGB images (N×H×W×3 numpy) and on method-scoped keys
(:class:`shallowmark.keys.MethodKey`, never the master secret):

- ``generate(keys, seeds, prompts)``: the server scenario — new images that carry the keys;
- ``reference(seeds, prompts)``: the same-seed images without a watermark (for fidelity);
- ``embed(keys, images)``: the user scenario — watermark existing images, where the method can;
- ``detect(images, keys, target_fpr)``: one :class:`Detection` per image.

Every detector returns a p-value under "this image was not watermarked with this key" and a verdict
at the caller's target FPR, Bonferroni-corrected for the number of keys searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shallowmark.errors import InvalidImageError, InvalidParameterError, KeyMaterialError
from shallowmark.keys import MethodKey


@dataclass(frozen=True)
class Detection:
    """What a detector says about one image.

    ``score``: larger means more evidence of the best key (what ROC curves use).
    ``p_value``: the best key's p-value under "not watermarked with this key".
    ``p_value_corrected``: ``min(1, p_value × keys searched)``; ``detected`` is
    ``p_value_corrected <= target_fpr``. ``key_id``: the best-matching key. ``bits`` and
    ``bit_accuracy``: the decoded payload and its agreement with the best key's, for methods that
    carry bits. ``model_evals``: denoiser evaluations spent on this image.
    """

    method: str
    score: float
    p_value: float
    p_value_corrected: float
    detected: bool
    target_fpr: float
    key_id: str | None
    model_evals: int = 0
    bits: np.ndarray | None = None
    bit_accuracy: float | None = None
    per_key_p: dict = field(default_factory=dict)


def verdict(method: str, p_values: Sequence[float], scores: Sequence[float], keys: Sequence[MethodKey],
            target_fpr: float, model_evals: int, bits=None, bit_accuracies=None) -> Detection:
    """Pick the best key (smallest p-value, ties by score) and apply the corrected threshold."""
    best = int(np.lexsort((-np.asarray(scores, dtype=float), np.asarray(p_values, dtype=float)))[0])
    p = float(p_values[best])
    p_corr = min(1.0, p * len(keys))
    return Detection(method=method, score=float(scores[best]), p_value=p, p_value_corrected=p_corr,
                     detected=p_corr <= target_fpr, target_fpr=target_fpr, key_id=keys[best].key_id,
                     model_evals=model_evals, bits=bits,
                     bit_accuracy=None if bit_accuracies is None else float(bit_accuracies[best]),
                     per_key_p={k.key_id: float(pv) for k, pv in zip(keys, p_values)})


class WatermarkMethod:
    """Base class. Subclasses set ``name`` and ``supports_embed`` and implement the hooks."""

    name: str = "base"
    supports_embed: bool = True
    # ways :meth:`embed` can return an existing image (its ``output=`` argument); empty: one way only
    output_modes: tuple[str, ...] = ()
    min_image_size: int = 1

    # -- hooks ------------------------------------------------------------------------------------
    def generate(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> np.ndarray:
        raise NotImplementedError

    def reference(self, seeds: Sequence[int], prompts=None) -> np.ndarray:
        raise NotImplementedError

    def embed(self, keys: Sequence[MethodKey], images: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.name} cannot watermark an existing image")

    def detect(self, images: np.ndarray, keys: Sequence[MethodKey], target_fpr: float = 0.01) -> list[Detection]:
        raise NotImplementedError

    # -- input checks shared by all methods -------------------------------------------------------
    def check_keys(self, keys: Sequence[MethodKey], n: int | None = None) -> list[MethodKey]:
        keys = list(keys)
        if not keys:
            raise KeyMaterialError(f"{self.name}: at least one key is needed")
        for k in keys:
            if not isinstance(k, MethodKey):
                raise KeyMaterialError(f"{self.name}: expected a MethodKey (key.for_method({self.name!r})), "
                                       f"got {type(k).__name__}")
            if k.method != self.name:
                raise KeyMaterialError(f"key {k.key_id} was derived for method {k.method!r} and cannot be "
                                       f"used for {self.name!r}; derive it with key.for_method({self.name!r})")
        if n is not None and len(keys) not in (1, n):
            raise InvalidParameterError(f"{self.name}: give one key, or one key per image ({n}); got {len(keys)}")
        return keys if n is None or len(keys) == n else keys * n

    def check_images(self, images, size: int | None = None) -> np.ndarray:
        """uint8 RGB batch N×H×W×3; grayscale or RGBA is refused with a hint to convert."""
        arr = np.asarray(images)
        if arr.ndim == 3 and arr.shape[-1] in (3, 4):
            arr = arr[None]
        if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)) or (arr.ndim == 4 and arr.shape[-1] == 1):
            raise InvalidImageError(f"{self.name}: grayscale image of shape {arr.shape}; convert it to RGB "
                                    "(e.g. PIL Image.convert('RGB')) first")
        if arr.ndim != 4 or arr.shape[-1] != 3:
            what = "RGBA" if arr.ndim == 4 and arr.shape[-1] == 4 else f"shape {arr.shape}"
            raise InvalidImageError(f"{self.name}: expected RGB images (H, W, 3); got {what}. "
                                    "Drop or composite the alpha channel first")
        if arr.dtype != np.uint8:
            raise InvalidImageError(f"{self.name}: expected uint8 pixels; got {arr.dtype}")
        h, w = arr.shape[1:3]
        if min(h, w) < self.min_image_size:
            raise InvalidImageError(f"{self.name} needs images of at least {self.min_image_size}×"
                                    f"{self.min_image_size}; got {w}×{h}")
        if size is not None and (h, w) != (size, size):
            raise InvalidImageError(f"{self.name}: this model works on {size}×{size} images; got {w}×{h}. "
                                    "Resize or crop first")
        return arr


def check_target_fpr(target_fpr: float) -> float:
    if not 0.0 < float(target_fpr) < 1.0:
        raise InvalidParameterError(f"target_fpr must be in (0, 1); got {target_fpr}")
    return float(target_fpr)


class LatentMethod(WatermarkMethod):
    """A method that works on a diffusion backend's latents (``self.backend``, ``self.grid``):
    ``generate`` decodes :meth:`generate_latents`, and ``reference`` is plain DDIM sampling from the
    same seeds' noise, the fidelity baseline."""

    def generate_latents(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None):
        raise NotImplementedError

    def generate(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> np.ndarray:
        import torch

        from shallowmark.core.images import to_uint8

        with torch.no_grad():
            return to_uint8(self.backend.decode(self.generate_latents(keys, seeds, prompts)))

    def reference(self, seeds: Sequence[int], prompts=None) -> np.ndarray:
        import torch

        from shallowmark.core import ddim
        from shallowmark.core.images import to_uint8

        with torch.no_grad():
            cond = self.backend.encode_prompt(prompts, len(seeds)) if prompts is not None else None
            z = ddim.denoise(self.backend, self.backend.randn_latents(seeds), self.grid, self.grid.num_steps, 0,
                             cond=cond)
            return to_uint8(self.backend.decode(z))
