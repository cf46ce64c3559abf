"""Offline training and evaluation photos: they ship inside the scikit-image, scikit-learn and
matplotlib wheels, so the default model can be retrained anywhere without a download.

``grace_hopper`` (matplotlib) is held out of training and used only to measure the autoencoder.
"""

from __future__ import annotations

import numpy as np

from shallowmark.errors import MissingDependencyError

# The scikit-image photos that are bundled in its wheel (checked offline); the rest of
# skimage.data is fetched on demand and so is unusable here.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle")
SKLEARN_PHOTOS = ("china", "flower")
HELDOUT_PHOTO = "grace_hopper"


def training_photos() -> dict[str, np.ndarray]:
    """The training photos as uint8 RGB arrays, keyed by name (about 5 MPix in all)."""
    try:
        import skimage.data as skd
        from sklearn.datasets import load_sample_images
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("the bundled training photos (scikit-image, scikit-learn)", "audit", e)
    photos: dict[str, np.ndarray] = {}
    for name in SKIMAGE_PHOTOS:
        img = getattr(skd, name)()
        if name == "stereo_motorcycle":  # (left, right, disparity): both views are photos
            photos["stereo_motorcycle_left"], photos["stereo_motorcycle_right"] = img[0], img[1]
            continue
        photos[name] = img
    sk = load_sample_images()
    for name, img in zip(SKLEARN_PHOTOS, sk.images):
        photos[name] = img
    return {k: _rgb_uint8(v) for k, v in photos.items()}


def heldout_photo() -> np.ndarray:
    """matplotlib's ``grace_hopper.jpg`` (uint8 RGB), never seen in training."""
    try:
        import matplotlib.cbook as cbook
    except ImportError as e:  # pragma: no cover
        raise MissingDependencyError("the held-out photo (matplotlib)", "audit", e)
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return _rgb_uint8(np.asarray(Image.open(f).convert("RGB")))


def center_crop(image: np.ndarray, size: int = 256) -> np.ndarray:
    """Resize the short side to ``size`` (Lanczos) and take the centre ``size``×``size`` square."""
    from PIL import Image

    h, w = image.shape[:2]
    s = size / min(h, w)
    im = Image.fromarray(image).resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
    w2, h2 = im.size
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def _rgb_uint8(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip(img * (255.0 if img.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])
