"""Request validation: turn untrusted bytes into checked values, or raise a shallowmark error whose
message tells the caller what to change.

Image decoding is the risky part. :func:`decode_image`:

- accepts PNG and JPEG only (Pillow's other decoders are never reached);
- reads the header first and refuses images above ``max_pixels`` (width x height) *before* any
  pixel is decoded, so a 20000 x 20000 "decompression bomb" costs nothing;
- refuses, from the same header, images whose decoded samples would exceed ``max_decode_bytes``
  (width x height x samples per pixel x bytes per sample: the PNG IHDR's colour type and bit
  depth, the JPEG frame header's components and precision). Pixels alone undercount: a 32 KB PNG
  can declare 4096 x 4096 16-bit gray, whose decoding took 0.8 s and 290 MB of peak memory each;
  16-bit samples are also reduced to 8 bits without widening them further;
- refuses empty, undecodable and truncated files, and palette images whose colours are unknown (no
  PLTE chunk, or pixels pointing past its end: Pillow would silently make those pixels black);
- turns the image upright by its EXIF orientation, as a viewer shows it (cameras store the
  sensor's pixels plus a rotation tag), and says so in ``notes``;
- converts every other pixel format to 8-bit RGB and says what it did in ``notes`` (grayscale,
  palette, alpha dropped, 16-bit reduced to 8-bit, CMYK, animated: first frame).

Everything here raises :class:`~shallowmark.errors.InvalidImageError`,
:class:`~shallowmark.errors.InvalidParameterError`, :class:`~shallowmark.errors.KeyMaterialError`
or :class:`~shallowmark.errors.UnknownNameError`; the servicer maps them to INVALID_ARGUMENT.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shallowmark.errors import InvalidImageError, InvalidParameterError, KeyMaterialError, shown
from shallowmark.keys import FamilyMember, KeyFamily, MethodKey, keys_searched, parse_key

__all__ = ["DecodedImage", "decode_image", "check_image_shape", "grid_notes", "on_grid", "parse_method_key", "parse_method_keys",
           "check_target_fpr", "check_request_id", "ACCEPTED_FORMATS"]

ACCEPTED_FORMATS = ("PNG", "JPEG")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, checked image: ``pixels`` is uint8 H x W x 3; ``notes`` lists conversions made."""

    pixels: np.ndarray
    format: str
    sha256: str
    notes: list[str] = field(default_factory=list)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def _png_bit_depth(data: bytes) -> int | None:
    # IHDR is always the first chunk: magic(8) length(4) type(4) width(4) height(4) depth(1).
    if data[:8] == _PNG_MAGIC and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


#: PNG colour type (IHDR byte 25) -> samples per pixel: gray, RGB, palette index, gray+alpha, RGBA.
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

#: Pillow's mode -> samples per pixel, for a header this module does not read itself.
_MODE_SAMPLES = {"1": 1, "L": 1, "P": 1, "I": 1, "F": 1, "LA": 2, "PA": 2, "RGB": 3, "YCbCr": 3, "LAB": 3,
                 "RGBA": 4, "RGBa": 4, "CMYK": 4}


def _declared_layout(data: bytes, im) -> tuple[int, int, str]:
    """``(samples per pixel, bytes per sample, what)`` the header declares, before decoding.

    PNG: the IHDR's colour type and bit depth (Pillow's mode hides 16-bit RGB, which it reduces to
    8 bits while decoding, but inflating and filtering work on the 16-bit rows). JPEG: the frame
    header's components and precision, which Pillow keeps as ``layers`` and ``bits``."""
    depth = _png_bit_depth(data)
    if depth is not None and len(data) > 25:
        samples = _PNG_SAMPLES.get(data[25], 4)
        kind = {1: "gray", 2: "gray+alpha", 3: "RGB", 4: "RGBA"}[samples] if data[25] != 3 else "palette"
        return samples, 2 if depth > 8 else 1, f"{depth}-bit {kind}"
    bits = int(getattr(im, "bits", 8) or 8)
    samples = int(getattr(im, "layers", 0) or _MODE_SAMPLES.get(im.mode, 4))
    return samples, 2 if bits > 8 else 1, f"{bits}-bit, {samples} channel{'s' if samples > 1 else ''}"


def decode_image(data: bytes, max_pixels: int, max_decode_bytes: int | None = None) -> DecodedImage:
    """Decode PNG/JPEG ``data`` into 8-bit RGB, refusing anything unsafe or unusable.

    Args:
        max_pixels: most width x height.
        max_decode_bytes: most width x height x samples per pixel x bytes per sample as the header
            declares them (``None``: 4 bytes per pixel of ``max_pixels``, an 8-bit RGBA image).

    Raises:
        InvalidImageError: empty, not PNG/JPEG, corrupt or truncated, zero-sized, larger than
            ``max_pixels`` or ``max_decode_bytes``, or a pixel format that cannot be converted
            (the message says which).
    """
    if max_decode_bytes is None:
        max_decode_bytes = 4 * max_pixels
    from PIL import Image, UnidentifiedImageError

    data = bytes(data)
    if not data:
        raise InvalidImageError("image is empty (0 bytes); send the PNG or JPEG file's bytes")
    digest = hashlib.sha256(data).hexdigest()
    notes: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"image is too large: {e}. This server accepts at most {max_pixels} pixels "
                                "(width x height); resize it first") from None
    except UnidentifiedImageError:
        raise InvalidImageError(f"cannot decode the image ({len(data)} bytes): it is not a PNG or JPEG file, "
                                "or its header is corrupt. Send PNG (preferred) or JPEG bytes") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InvalidImageError(f"cannot decode the image: {e}") from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise InvalidImageError(f"image has zero size ({w}x{h})")
        if w * h > max_pixels:
            raise InvalidImageError(f"image is {w}x{h} = {w * h} pixels, more than this server's limit of "
                                    f"{max_pixels} pixels; resize it first")
        samples, sample_bytes, layout = _declared_layout(data, im)
        decoded = w * h * samples * sample_bytes
        if decoded > max_decode_bytes:
            raise InvalidImageError(
                f"image is {w}x{h} {layout}, {decoded} bytes once decoded, more than this server's limit of "
                f"{max_decode_bytes} decoded bytes (max_decode_bytes); save it as 8-bit RGB, or resize it first")
        n_frames = getattr(im, "n_frames", 1)
        if n_frames > 1:
            notes.append(f"animated image with {n_frames} frames: used the first frame")
        try:
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            msg = str(e) or type(e).__name__
            hint = " (the file is cut short; send the complete file)" if "truncated" in msg else ""
            raise InvalidImageError(f"cannot decode the {im.format} image: {msg}{hint}") from None
        _check_palette(im)
        fmt = im.format or "unknown"
        pixels = _to_rgb8(_upright(im, notes), notes, _png_bit_depth(data))
    return DecodedImage(pixels=pixels, format=fmt, sha256=digest, notes=notes)


def _check_palette(im) -> None:
    """Refuse a palette image whose colours are not all given (see the module docstring)."""
    if im.mode != "P":
        return
    palette = im.getpalette() or []  # [r, g, b, r, g, b, ...]
    if not palette:
        raise InvalidImageError(f"the {im.format} image is a palette image without a palette (no PLTE chunk), so "
                                "its colours are unknown; re-save it as an RGB PNG")
    entries = len(palette) // 3
    used = int(np.asarray(im).max(initial=0)) + 1
    if used > entries:
        raise InvalidImageError(f"the {im.format} image uses palette index {used - 1} but its palette has only "
                                f"{entries} colours, so some pixels have no colour; re-save it as an RGB PNG")


#: EXIF orientation tag values -> what turning the image upright did (ImageOps.exif_transpose).
_ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180 degrees", 4: "mirrored top-bottom",
                 5: "mirrored along its main diagonal", 6: "rotated 90 degrees clockwise",
                 7: "mirrored along its anti-diagonal", 8: "rotated 90 degrees counter-clockwise"}
_EXIF_ORIENTATION = 0x0112


def _upright(im, notes: list[str]):
    """``im`` as a viewer shows it: its EXIF orientation applied (a note says how)."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION)
    except (OSError, ValueError, SyntaxError, TypeError) as e:  # a corrupt EXIF block
        raise InvalidImageError(f"cannot read the {im.format} image's EXIF block, which may rotate the image: "
                                f"{str(e) or type(e).__name__}; re-save the image without EXIF") from None
    if orientation not in _ORIENTATIONS:  # 1 (upright), missing, or a value no viewer applies
        return im
    w, h = im.size
    upright = ImageOps.exif_transpose(im)
    notes.append(f"EXIF orientation {orientation} applied: the {w}x{h} pixels were {_ORIENTATIONS[orientation]}, "
                 f"so the image was read upright as {upright.width}x{upright.height}")
    return upright


def _to_rgb8(im, notes: list[str], png_depth: int | None) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        if png_depth == 16:
            notes.append("16-bit RGB reduced to 8 bits per channel")
        return np.asarray(im, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # in the samples' own type (uint16 for the I;16 modes, int32 for "I"): widening them to
        # int64 first made a 4096 x 4096 16-bit image cost 128 MB more per request
        arr = np.asarray(im)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise InvalidImageError("32-bit integer grayscale images are not supported; save it as 8-bit RGB PNG")
        if mode == "I" and png_depth not in (16, None):
            gray = arr.astype(np.uint8)  # an 8-bit image Pillow widened to mode "I"
            notes.append("grayscale converted to RGB")
        else:
            gray = (arr >> 8).astype(np.uint8)
            notes.append("16-bit grayscale converted to 8-bit RGB")
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        raise InvalidImageError("floating-point images are not supported; save it as 8-bit RGB PNG")
    what = {
        "L": "grayscale converted to RGB",
        "1": "1-bit image converted to RGB",
        "P": "palette image converted to RGB",
        "LA": "grayscale+alpha converted to RGB (alpha dropped)",
        "PA": "palette+alpha image converted to RGB (alpha dropped)",
        "RGBA": "RGBA converted to RGB (alpha dropped)",
        "RGBa": "RGBA converted to RGB (alpha dropped)",
        "CMYK": "CMYK converted to RGB",
        "YCbCr": "YCbCr converted to RGB",
        "LAB": "Lab converted to RGB",
    }.get(mode)
    if what is None:
        raise InvalidImageError(f"unsupported pixel format {mode!r}; save the image as 8-bit RGB PNG")
    if mode == "P" and "transparency" in im.info:
        what = "palette image with transparency converted to RGB (alpha dropped)"
    if png_depth == 16:
        what += "; 16-bit reduced to 8 bits per channel"
    notes.append(what)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def check_image_shape(image: DecodedImage, method) -> DecodedImage:
    """Refuse an image whose shape ``method`` cannot serve, before any model work: a latent method
    takes any size within :func:`shallowmark.core.resolution.check_shape` (short side >= 64,
    aspect ratio <= 4:1); a post-hoc method its own minimum side as well.

    Raises:
        InvalidImageError: naming the limit and the image's size.
    """
    from shallowmark.core.resolution import MIN_SIDE, check_shape

    min_side = max(MIN_SIDE, int(method.min_image_size))
    try:
        check_shape(image.height, image.width, min_side=min_side)
    except InvalidImageError as e:
        raise InvalidImageError(f"{method.name}: {e}") from None
    return image


def grid_notes(image: DecodedImage, method, size: int) -> list[str]:
    """What the server says when a latent method saw the image at another size than its own."""
    if method.inversion is None or (image.width, image.height) == (size, size):
        return []
    from shallowmark.core.resolution import centre_square

    top, left, side = centre_square(image.height, image.width)
    return [f"{image.width}x{image.height} image: the model saw its centre {side}x{side} square (from x={left}, "
            f"y={top}) at {size}x{size}"]


def on_grid(image: DecodedImage, method, size: int) -> np.ndarray:
    """The pixels a Verify job of ``method`` gets: on the model's grid for a latent
    method (so that requests of any size share a batch), as they are for a post-hoc one."""
    if method.inversion is None:
        return image.pixels
    from shallowmark.core.resolution import to_grid

    return to_grid(image.pixels[None], size)[0]


def parse_method_key(data: bytes, where: str = "method_key", family: bool = False) -> MethodKey:
    """Parse one serialized :class:`MethodKey` (or a :class:`~shallowmark.keys.FamilyMember`, or with
    ``family`` a :class:`~shallowmark.keys.KeyFamily`); its ``key_id`` is replaced by its
    :attr:`~shallowmark.keys.MethodKey.commitment`, derived from the material.

    Raises:
        KeyMaterialError: empty, wrong length or magic, a family where one key is needed (message
            says what to send).
        InvalidParameterError: a family size or member index out of range.
        UnknownNameError: the method inside is unknown.
    """
    if not data:
        raise KeyMaterialError(f"{where} is empty; send MethodKey.to_bytes() from the shallowmark SDK "
                               "(key.for_method(method).to_bytes())")
    try:
        sent = parse_key(data)
    except (KeyMaterialError, InvalidParameterError) as e:
        kind = {b"SMF1": "KeyFamily", b"SMM1": "FamilyMember"}.get(bytes(data[:4]), "MethodKey")
        raise type(e)(f"{where}: {e}; send {kind}.to_bytes() from the shallowmark SDK") from None
    if isinstance(sent, KeyFamily) and not family:
        raise KeyMaterialError(f"{where} is a KeyFamily, which only verifies; embed with one member, "
                               "family.member(index).to_bytes()")
    # The key id on the wire fingerprints a master secret this server never sees, so nothing ties it to
    # the material: any tenant could label its own material with another tenant's id. Name the key by
    # the commitment recomputed from the material instead; everything downstream (ledger, verdicts,
    # attestation, duplicate check) then sees only ids the caller cannot choose.
    if isinstance(sent, KeyFamily):
        return KeyFamily(method=sent.method, key_id=sent.commitment, material=sent.material, size=sent.size)
    if isinstance(sent, FamilyMember):
        # a member keeps its index; its id is the member id, derived from the material and index
        return FamilyMember(method=sent.method, key_id=sent.commitment, material=sent.material, index=sent.index)
    return MethodKey(method=sent.method, key_id=sent.commitment, material=sent.material)


#: Most entries in one Verify's ``method_keys``: more keys than this go as a KeyFamily.
MAX_KEY_ENTRIES = 1024


def parse_method_keys(items: Sequence[bytes], max_keys: int) -> list[MethodKey]:
    """Parse the candidate keys of a Verify request: 1..:data:`MAX_KEY_ENTRIES` entries, no
    duplicates, at most ``max_keys`` keys searched (every member of a family counted)."""
    if not items:
        raise KeyMaterialError("method_keys is empty; send at least one candidate key")
    if len(items) > MAX_KEY_ENTRIES:
        raise InvalidParameterError(f"{len(items)} entries in method_keys, more than {MAX_KEY_ENTRIES}; send many "
                                    "keys as one KeyFamily (key.family(method, size)), which stands for all its members")
    keys = [parse_method_key(b, f"method_keys[{i}]", family=True) for i, b in enumerate(items)]
    for i, k in enumerate(keys):
        if isinstance(k, KeyFamily) and k.size > max_keys:
            raise InvalidParameterError(f"method_keys[{i}] is a key family of {k.size} members, more than this server's "
                                        f"limit of {max_keys} keys per Verify; use families of at most {max_keys} "
                                        "members here (members beyond it cannot be searched on this server)")
    total = keys_searched(keys)
    if total > max_keys:
        raise InvalidParameterError(f"{total} keys to search (key family members counted), more than this server's "
                                    f"limit of {max_keys}; split the entries over several calls")
    seen = set()
    for i, k in enumerate(keys):
        if (k.method, k.key_id) in seen:
            raise InvalidParameterError(f"method_keys[{i}] repeats key {k.key_id} for {k.method}")
        seen.add((k.method, k.key_id))
    return keys


#: Longest verifier nonce accepted; 16-32 random bytes are plenty against replay.
MAX_NONCE_BYTES = 64


def check_nonce(value: bytes) -> bytes:
    """A ``VerifyRequest.nonce``: empty (none) or 1..:data:`MAX_NONCE_BYTES` bytes, signed back as given."""
    if len(value) > MAX_NONCE_BYTES:
        raise InvalidParameterError(f"nonce is {len(value)} bytes, more than {MAX_NONCE_BYTES}; send 16 random bytes")
    return bytes(value)


def check_target_fpr(value: float, default: float = 0.01) -> float:
    """``0`` means ``default``; otherwise the value must be in (0, 1)."""
    if value == 0:
        return default
    if not (0.0 < value < 1.0):  # also refuses NaN
        raise InvalidParameterError(f"target_fpr must be in (0, 1), or 0 for the default {default}; got {value}")
    return float(value)


def check_output_mode(value: str, method) -> str:
    """An ``EmbedRequest.output``: empty (the method's configured mode) or one of the method's
    ``output_modes``."""
    if not value:
        return ""
    modes = method.output_modes
    if not modes:
        raise InvalidParameterError(f"{method.name} has no output modes: leave 'output' empty")
    if value not in modes:
        raise InvalidParameterError(f"output must be one of {', '.join(modes)} (or empty for the server's "
                                    f"setting); got {shown(value)}")
    return value


def check_request_id(value: str | None) -> str | None:
    """A client-supplied ``x-request-id``: 1..64 of ``[A-Za-z0-9._-]``, or ``None``."""
    if value is None:
        return None
    if not _REQUEST_ID.match(value):
        raise InvalidParameterError("x-request-id must be 1..64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")
    return value
