"""Post-hoc baselines from the ``invisible-watermark`` package (``imwatermark``): DwtDct, DwtDctSvd, RivaGAN.

All three write a bit string into a finished image, so ``generate`` is plain DDIM sampling followed
by :meth:`embed`, and ``reference`` is the same sampling without it. The bits are the key's
``payload_bits(mk, n_bits)``; detection decodes ``n_bits`` bits and, for each candidate key, counts
the matches k and takes the one-sided binomial p-value ``P(Binomial(n, 1/2) >= k)`` (an image not
watermarked with this key agrees with its payload on each bit with probability 1/2).

Capacity (``n_bits``): RivaGAN carries exactly 32 bits (its ONNX model is built for 32). DwtDct and
DwtDctSvd repeat the payload over the 4×4 blocks of the chroma (U) channel's DWT LL band; a 256×256
image has 1024 such blocks, so ``n_bits`` may be 1..1024. The default is 64 bits (16 copies of
each bit at 256×256): with the same bit accuracy, more bits give smaller p-values.

The package works on BGR uint8 (OpenCV's convention); this module converts from and to the public
RGB layout. It needs images of at least 256×256.

Known weakness of the upstream DwtDct (kept as is, it is the baseline): it quantises the largest
AC coefficient of each block, which is unstable on images with flat chroma; on such images
(many tiny-ldm samples among them) its bits come back at chance level and nothing is detected.
DwtDctSvd and RivaGAN do not have this problem.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shallowmark.core.watermarks.base import Detection, ModelEvals, WatermarkMethod, bit_verdict
from shallowmark.errors import InvalidParameterError, MissingDependencyError, check_int
from shallowmark.keys import MethodKey, payload_bits

__all__ = ["DwtDct", "DwtDctSvd", "RivaGAN", "DwtDctConfig", "RivaGANConfig"]

# 4×4 blocks in the 128×128 DWT LL band of a 256×256 image: one copy of each bit needs a block.
_MAX_DWT_BITS = 1024


@dataclass(frozen=True)
class DwtDctConfig:
    """DwtDct's and DwtDctSvd's payload length: 1..1024 bits (one 4×4 block of the 256² image's
    DWT LL band per copy); 64 by default (16 copies of each bit)."""

    n_bits: int = 64

    def validate(self, latent_shape=None) -> None:
        check_int("n_bits", self.n_bits, 1, _MAX_DWT_BITS)


@dataclass(frozen=True)
class RivaGANConfig:
    """RivaGAN's payload length: its ONNX model is built for exactly 32 bits."""

    n_bits: int = 32

    def validate(self, latent_shape=None) -> None:
        check_int("n_bits", self.n_bits, 32, 32)


def _imwatermark():
    try:
        import imwatermark
    except ImportError as exc:  # the package is in the 'bench' extra
        raise MissingDependencyError("the invisible-watermark baselines (dwtdct, dwtdctsvd, rivagan)",
                                     "bench", exc) from None
    return imwatermark


class _InvisibleWatermark(WatermarkMethod):
    """Shared implementation; subclasses set ``name``, ``_iw_method`` and the capacity."""

    supports_embed = True
    min_image_size = 256
    config_class = DwtDctConfig
    _iw_method: str = ""

    def __init__(self, backend=None, config=None):
        self._configure(backend, config)
        self.n_bits = int(self.config.n_bits)

    def model_evals(self) -> ModelEvals:
        # generate is a plain 50-step DDIM sample, then the post-hoc embed; nothing else uses the model
        return ModelEvals(generate=50 if self.backend is not None else 0, embed=0, verify=0)

    # -- package access ---------------------------------------------------------------------------
    def _ensure_model(self) -> None:
        """Hook for methods with a model to load (RivaGAN)."""

    def _encode_one(self, rgb: np.ndarray, bits: np.ndarray) -> np.ndarray:
        iw = _imwatermark()
        enc = iw.WatermarkEncoder()
        enc.set_watermark("bits", [int(b) for b in bits])
        bgr = enc.encode(np.ascontiguousarray(rgb[..., ::-1]), self._iw_method)
        return np.ascontiguousarray(np.asarray(bgr, dtype=np.uint8)[..., ::-1])

    def _decode_one(self, rgb: np.ndarray) -> np.ndarray:
        iw = _imwatermark()
        dec = iw.WatermarkDecoder("bits", self.n_bits)
        bits = dec.decode(np.ascontiguousarray(rgb[..., ::-1]), self._iw_method)
        return np.asarray(bits).astype(np.uint8).reshape(self.n_bits)

    # -- WatermarkMethod --------------------------------------------------------------------------
    def embed(self, keys: Sequence[MethodKey], images: np.ndarray) -> np.ndarray:
        """Write each key's payload into its image (one key for all, or one per image).

        Returns uint8 RGB N×H×W×3 (a single H×W×3 image comes back as a batch of one).
        """
        imgs = self.check_images(images)
        keys = self.check_keys(keys, n=len(imgs))
        self._ensure_model()
        out = np.empty_like(imgs)
        for i, (im, mk) in enumerate(zip(imgs, keys)):
            out[i] = self._encode_one(im, payload_bits(mk, self.n_bits))
        return out

    def _sample(self, seeds: Sequence[int], prompts) -> np.ndarray:
        if self.backend is None:
            raise InvalidParameterError(f"{self.name}: generate/reference need a diffusion backend; build the "
                                        f"method with {type(self).__name__}(backend=load_backend(...))")
        seeds = self.check_seeds(seeds)
        from shallowmark.core import ddim
        from shallowmark.core.images import to_uint8

        b = self.backend
        cond = b.encode_prompt(prompts, len(seeds)) if prompts is not None else None
        grid = ddim.make_grid(b, 50)
        x = ddim.denoise(b, b.randn_latents(seeds), grid, grid.num_steps, cond=cond)
        return to_uint8(b.decode(x))

    def reference(self, seeds: Sequence[int], prompts=None) -> np.ndarray:
        """The backend's 50-step DDIM samples for ``seeds``, without a watermark."""
        return self._sample(seeds, prompts)

    def generate(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> np.ndarray:
        """:meth:`reference` then :meth:`embed` (one key for all seeds, or one per seed)."""
        self.check_keys(keys, n=len(list(seeds)))
        return self.embed(keys, self._sample(seeds, prompts))

    def invert(self, images, prompts=None):
        """The images to decode, as a list: each as it is, or, when its short side is below
        ``min_image_size`` (a crop, an aspect change or a 4:5 crop of a 256² image), scaled up
        (Lanczos, aspect kept) until it reaches it, since the decoder reads nothing smaller."""
        del prompts
        if not isinstance(images, (list, tuple)):
            arr = np.asarray(images)
            if arr.ndim == 3 and arr.shape[-1] in (3, 4):
                arr = arr[None]
            if arr.ndim != 4:
                self.check_images(arr)   # raises the error that names what is wrong (grayscale, shape)
            images = arr
        return [self._readable(im) for im in images]

    def _readable(self, image) -> np.ndarray:
        from PIL import Image

        im = np.asarray(image)
        if im.ndim == 3 and im.shape[-1] == 3 and im.dtype == np.uint8 and min(im.shape[:2]) < self.min_image_size:
            f = self.min_image_size / min(im.shape[:2])
            size = (max(self.min_image_size, round(im.shape[1] * f)), max(self.min_image_size, round(im.shape[0] * f)))
            im = np.asarray(Image.fromarray(im).resize(size, Image.LANCZOS), dtype=np.uint8)
        return self.check_images(im)[0]

    def _score(self, images: np.ndarray, keys: list[MethodKey], target_fpr: float) -> list[Detection]:
        """Decode ``n_bits`` bits per image and test them against every candidate key's payload."""
        payloads = np.stack([payload_bits(mk, self.n_bits) for mk in keys])  # K×n
        self._ensure_model()
        out = []
        for im in images:
            bits = self._decode_one(im)
            out.append(bit_verdict(self.name, np.broadcast_to(bits, payloads.shape), payloads, keys, target_fpr, 0))
        return out


class DwtDct(_InvisibleWatermark):
    """DWT-DCT watermark of ``invisible-watermark`` (``dwtDct``); 64 bits by default."""

    name = "dwtdct"
    _iw_method = "dwtDct"


class DwtDctSvd(_InvisibleWatermark):
    """DWT-DCT-SVD watermark of ``invisible-watermark`` (``dwtDctSvd``); 64 bits by default."""

    name = "dwtdctsvd"
    _iw_method = "dwtDctSvd"


class RivaGAN(_InvisibleWatermark):
    """RivaGAN (ONNX encoder/decoder shipped with ``invisible-watermark``); exactly 32 bits."""

    name = "rivagan"
    _iw_method = "rivaGan"
    config_class = RivaGANConfig

    _loaded = False
    _load_lock = threading.Lock()

    def _ensure_model(self) -> None:
        # Loading the two ONNX sessions takes a while: once per process, shared by all instances.
        cls = RivaGAN
        if cls._loaded:
            return
        with cls._load_lock:
            if not cls._loaded:
                try:
                    _imwatermark().WatermarkEncoder.loadModel()
                except ImportError as exc:  # onnxruntime missing
                    raise MissingDependencyError("the rivagan baseline", "bench", exc) from None
                cls._loaded = True
