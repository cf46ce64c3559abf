"""shallowmark: Shallow Diffuse watermarking and provenance for diffusion-model images.

The SDK (this package) is light: it never imports torch. It holds the keys and keystore, the
result types and the client; the model stack lives in the ``core``/``server``/``attacks``
subpackages, installed with the ``server``, ``bench`` or ``all`` extras.
"""

from shallowmark.errors import (
    InvalidImageError,
    InvalidParameterError,
    InvalidShapeError,
    KeyMaterialError,
    KeystoreError,
    MissingDependencyError,
    ShallowmarkError,
    UnknownNameError,
)
from shallowmark.keys import (
    METHODS,
    MethodKey,
    WatermarkKey,
    chacha20_key_nonce,
    method_seed,
    payload_bits,
    ring_seed,
)
from shallowmark.keystore import KeyInfo, Keystore

__version__ = "0.1.0"

__all__ = [
    "METHODS", "KeyInfo", "Keystore", "MethodKey", "WatermarkKey",
    "chacha20_key_nonce", "method_seed", "payload_bits", "ring_seed",
    "InvalidImageError", "InvalidParameterError", "InvalidShapeError", "KeyMaterialError",
    "KeystoreError", "MissingDependencyError", "ShallowmarkError", "UnknownNameError",
]
