"""The one interface every watermark method shares, and its calibrated result type.

A method works on uint8 RGB images (N×H×W×3 numpy) and on method-scoped keys
(:class:`shallowmark.keys.MethodKey`, never the master secret):

- ``generate(keys, seeds, prompts)``: the server scenario — new images that carry the keys;
- ``reference(seeds, prompts)``: the same-seed images without a watermark (for fidelity);
- ``embed(keys, images)``: the user scenario — watermark existing images, where the method can;
- ``detect(images, keys, target_fpr)``: one :class:`Detection` per image.

Detection is two steps, and every caller that shares or batches work (server batching, the
benchmark, the methods report) uses them instead of asking what a method is:

- ``invert(images)``: the model work of a verification. A latent method encodes and runs DDIM
  inversion up to its :attr:`~WatermarkMethod.inversion` stop (t* for Shallow Diffuse, T for the
  x_T methods); a post-hoc method returns the checked pixels;
- ``score(inverted, keys, target_fpr)``: the detector on that output, without model work.

``detect`` is ``score(invert(images))``, written once here. What each operation costs in
denoiser evaluations per image is data the method declares (:meth:`~WatermarkMethod.model_evals`).

Every detector returns a p-value under "this image was not watermarked with this key" and a verdict
at the caller's target FPR, Bonferroni-corrected for the number of keys searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from shallowmark.errors import InvalidImageError, InvalidParameterError, KeyMaterialError, check_int
from shallowmark.imaging import rgb_batch
from shallowmark.keys import FamilyMember, KeyFamily, MethodKey
from shallowmark.methods import LATENT, POST_HOC


@dataclass(frozen=True)
class ModelEvals:
    """Denoiser evaluations one image costs, per operation (0 where the method does not do it
    or needs no model)."""

    generate: int
    embed: int
    verify: int


@dataclass(frozen=True)
class InversionStop:
    """Where a latent method's verification inversion ends: grid position ``position`` of a
    ``num_steps``-step DDIM grid (0 is x_0, ``num_steps`` is x_T). Methods with the same grid
    share one inversion up to the furthest stop."""

    num_steps: int
    position: int


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
    #: For a :class:`~shallowmark.keys.KeyFamily` among the keys: the index of its best member, by the
    #: family's id (``per_key_p`` holds that member's p-value under the same id).
    per_key_member: dict = field(default_factory=dict)
    #: The best key's member index when it is a family's member, else None (``key_id`` is then the
    #: member's id, :meth:`~shallowmark.keys.KeyFamily.member_id`).
    member: int | None = None


@dataclass(frozen=True)
class KeyRows:
    """The keys one verification searches, one row per key and one per member of each
    :class:`~shallowmark.keys.KeyFamily`: a family of 100 000 is 100 000 rows of the score matrix
    and counts as 100 000 keys in the Bonferroni correction."""

    keys: tuple
    sizes: np.ndarray        # rows per key: a family's size, else 1
    starts: np.ndarray       # first row of each key

    @classmethod
    def of(cls, keys: Sequence[MethodKey]) -> "KeyRows":
        sizes = np.array([k.size if isinstance(k, KeyFamily) else 1 for k in keys], dtype=np.int64)
        return cls(tuple(keys), sizes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64))

    @property
    def total(self) -> int:
        """Keys searched (:func:`~shallowmark.keys.keys_searched`)."""
        return int(self.sizes.sum())

    @property
    def has_families(self) -> bool:
        return any(isinstance(k, KeyFamily) for k in self.keys)

    def owner(self, row: int) -> tuple[int, int | None]:
        """(index of the key, member index or None) of score row ``row``."""
        i = int(np.searchsorted(self.starts, row, side="right") - 1)
        return i, (int(row - self.starts[i]) if isinstance(self.keys[i], KeyFamily) else None)

    def row_id(self, row: int) -> str:
        i, member = self.owner(row)
        return self.keys[i].key_id if member is None else self.keys[i].member_id(member)


def best_key(p_values: Sequence[float], scores: Sequence[float]) -> int:
    """Index of the best key: smallest p-value, ties broken by the larger score."""
    return int(np.lexsort((-np.asarray(scores, dtype=float), np.asarray(p_values, dtype=float)))[0])


def rows_verdict(method: str, p_rows: np.ndarray, score_rows: np.ndarray, rows: KeyRows, target_fpr: float,
                 model_evals: int, bits=None) -> Detection:
    """:func:`verdict` over :class:`KeyRows`: the best row of all keys and family members, corrected
    for every row searched; ``per_key_p`` holds each key's (each family's best member's) p-value."""
    if not rows.has_families:
        return verdict(method, p_rows, score_rows, rows.keys, target_fpr, model_evals, bits=bits)
    p_rows, score_rows = np.asarray(p_rows, dtype=float), np.asarray(score_rows, dtype=float)
    best = best_key(p_rows, score_rows)
    p = float(p_rows[best])
    p_corr = min(1.0, p * rows.total)
    _, member = rows.owner(best)
    per_key_p, per_key_member = {}, {}
    for k, start, size in zip(rows.keys, rows.starts, rows.sizes):
        seg = p_rows[start:start + size]
        j = best_key(seg, score_rows[start:start + size])
        per_key_p[k.key_id] = float(seg[j])
        if isinstance(k, KeyFamily):
            per_key_member[k.key_id] = int(j)
    return Detection(method=method, score=float(score_rows[best]), p_value=p, p_value_corrected=p_corr,
                     detected=p_corr <= target_fpr, target_fpr=target_fpr, key_id=rows.row_id(best),
                     model_evals=model_evals, bits=bits, per_key_p=per_key_p, per_key_member=per_key_member,
                     member=member)


def verdict(method: str, p_values: Sequence[float], scores: Sequence[float], keys: Sequence[MethodKey],
            target_fpr: float, model_evals: int, bits=None, bit_accuracies=None) -> Detection:
    """Pick the best key (:func:`best_key`) and apply the corrected threshold."""
    best = best_key(p_values, scores)
    p = float(p_values[best])
    p_corr = min(1.0, p * len(keys))
    return Detection(method=method, score=float(scores[best]), p_value=p, p_value_corrected=p_corr,
                     detected=p_corr <= target_fpr, target_fpr=target_fpr, key_id=keys[best].key_id,
                     model_evals=model_evals, bits=bits,
                     bit_accuracy=None if bit_accuracies is None else float(bit_accuracies[best]),
                     per_key_p={k.key_id: float(pv) for k, pv in zip(keys, p_values)})


def bit_verdict(method: str, recovered: np.ndarray, expected: np.ndarray, keys: Sequence[MethodKey],
                target_fpr: float, model_evals: int) -> Detection:
    """The verdict of a bit-carrying method on one image.

    ``recovered[k]``: the n bits read under key k (the same row for every key where reading needs
    no key), ``expected[k]``: key k's payload. k matching bits of n give the exact one-sided p-value
    ``P(Binomial(n, 1/2) >= k)``: an image not watermarked with that key agrees with its payload on
    each bit with probability 1/2. ``score`` and ``bit_accuracy`` are the fraction that match.
    """
    from scipy.stats import binom

    recovered, expected = np.asarray(recovered), np.asarray(expected)
    n = expected.shape[1]
    matches = (recovered == expected).sum(axis=1)
    p = binom.sf(matches - 1, n, 0.5)
    acc = matches / n
    best = best_key(p, acc)
    return verdict(method, p.tolist(), acc.tolist(), keys, target_fpr, model_evals,
                   bits=recovered[best].copy(), bit_accuracies=acc.tolist())


class WatermarkMethod:
    """Base class. Subclasses set ``name``, ``kind``, ``supports_embed`` and ``config_class`` (a
    frozen dataclass with ``validate(latent_shape)``; ``latent_shape`` is None for a post-hoc
    method built without a backend) and implement the hooks."""

    name: str = "base"
    kind: str = POST_HOC
    #: Whether :class:`~shallowmark.keys.KeyFamily` and its members are accepted as keys.
    supports_families: bool = False
    supports_embed: bool = True
    config_class: type | None = None
    #: Options that differ from today's defaults in what the versions before the server recorded
    #: each embed's configuration used: a ledger record without a configuration is verified with
    #: these (and the server's options on top). Empty where the defaults did not change.
    unrecorded_options: dict = {}
    # ways :meth:`embed` can return an existing image (its ``output=`` argument); empty: one way only
    output_modes: tuple[str, ...] = ()
    min_image_size: int = 1

    def _configure(self, backend, config) -> None:
        """Set ``backend`` and a validated ``config`` (the config class's defaults when None)."""
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise InvalidParameterError(f"{self.name}: config must be a {self.config_class.__name__}; "
                                        f"got {type(config).__name__}")
        config.validate(None if backend is None else tuple(int(s) for s in backend.latent_shape))
        self.backend, self.config = backend, config

    def effective_config(self):
        """The config with every value the method resolved at build time filled in (what the
        server records per embed and hashes into attestations, so that a later change of how a
        default resolves cannot make a recorded configuration mean something else)."""
        return self.config

    # -- hooks ------------------------------------------------------------------------------------
    def generate(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> np.ndarray:
        raise NotImplementedError

    def reference(self, seeds: Sequence[int], prompts=None) -> np.ndarray:
        raise NotImplementedError

    def embed(self, keys: Sequence[MethodKey], images: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.name} cannot watermark an existing image")

    def model_evals(self) -> ModelEvals:
        """Denoiser evaluations per image of generate, embed and verify."""
        raise NotImplementedError

    @property
    def inversion(self) -> InversionStop | None:
        """Where :meth:`invert` stops on the DDIM grid; None for methods that need no inversion."""
        return None

    def invert(self, images: np.ndarray, prompts=None):
        """The model work of a verification, for a whole batch whatever its keys; :meth:`score`
        reads its output. Post-hoc methods need none: the checked pixels come back (a list of
        images of their own sizes stays a list)."""
        if isinstance(images, (list, tuple)):
            return [self.check_images(im)[0] for im in images]
        return self.check_images(images)

    def _score(self, inverted, keys: list[MethodKey], target_fpr: float) -> list[Detection]:
        raise NotImplementedError

    # -- detection, written once ------------------------------------------------------------------
    def score(self, inverted, keys: Sequence[MethodKey], target_fpr: float = 0.01) -> list[Detection]:
        """One :class:`Detection` per item of :meth:`invert`'s output; no model evaluation."""
        keys = self.check_keys(keys)
        target_fpr = check_target_fpr(target_fpr)
        if self.inversion is not None:
            self.backend.check_latents(inverted)
        return self._score(inverted, keys, target_fpr)

    def detect(self, images: np.ndarray, keys: Sequence[MethodKey], target_fpr: float = 0.01,
               prompts=None) -> list[Detection]:
        """One :class:`Detection` per image: :meth:`invert`, then :meth:`score`."""
        target_fpr = check_target_fpr(target_fpr)
        keys = self.check_keys(keys)
        return self.score(self.invert(images, prompts), keys, target_fpr)

    # -- input checks shared by all methods -------------------------------------------------------
    def check_keys(self, keys: Sequence[MethodKey], n: int | None = None) -> list[MethodKey]:
        keys = list(keys)
        if not keys:
            raise KeyMaterialError(f"{self.name}: at least one key is needed")
        for k in keys:
            if not isinstance(k, MethodKey):
                raise KeyMaterialError(f"{self.name}: expected a MethodKey (key.for_method({self.name!r})), "
                                       f"got {type(k).__name__}")
            if isinstance(k, (KeyFamily, FamilyMember)) and not self.supports_families:
                raise KeyMaterialError(f"{self.name} does not take key families (a {type(k).__name__}); they are for "
                                       "the ring methods shallow-diffuse, tree-ring and ringid")
            if k.method != self.name:
                raise KeyMaterialError(f"key {k.key_id} was derived for method {k.method!r} and cannot be "
                                       f"used for {self.name!r}; derive it with key.for_method({self.name!r})")
        if n is not None and any(isinstance(k, KeyFamily) for k in keys):
            raise KeyMaterialError(f"{self.name}: a KeyFamily only verifies; embed with one of its members "
                                   "(family.member(index))")
        if n is not None and len(keys) not in (1, n):
            raise InvalidParameterError(f"{self.name}: give one key, or one key per image ({n}); got {len(keys)}")
        return keys if n is None or len(keys) == n else keys * n

    def check_seeds(self, seeds) -> list[int]:
        """One seed or a non-empty sequence of integer seeds, as a list of ints."""
        import numbers

        seeds = [seeds] if isinstance(seeds, numbers.Integral) and not isinstance(seeds, bool) else list(seeds)
        if not seeds:
            raise InvalidParameterError(f"{self.name}: at least one seed is needed")
        return [check_int(f"{self.name}: seed", s) for s in seeds]

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
        arr = rgb_batch(arr, f"{self.name}: images")
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
    ``generate`` decodes :meth:`generate_latents`, ``reference`` is plain DDIM sampling from the
    same seeds' noise (the fidelity baseline), and :meth:`invert` encodes and inverts DDIM up to
    :attr:`inversion_position`."""

    kind = LATENT

    def _configure(self, backend, config) -> None:
        """As :meth:`WatermarkMethod._configure`, and ``grid``: the DDIM grid of ``config.num_steps``
        (every latent method's config has one)."""
        from shallowmark.core import ddim

        super()._configure(backend, config)
        self.grid = ddim.make_grid(backend, self.config.num_steps)

    @property
    def inversion_position(self) -> int:
        """Grid position where verification's inversion stops (``grid.num_steps``: x_T)."""
        return int(self.grid.num_steps)

    @property
    def inversion(self) -> InversionStop:
        return InversionStop(int(self.grid.num_steps), self.inversion_position)

    def generate_latents(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None):
        raise NotImplementedError

    def on_grid(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(the checked images, the same on the model's grid: their centre squares, resized): an image
        of any size and shape within :func:`~shallowmark.core.resolution.check_shape`'s limits is
        accepted, and a list of images of different sizes too (the checked images stay a list)."""
        from shallowmark.core import resolution

        if isinstance(images, (list, tuple)):  # images of their own sizes, one at a time
            grids = [self.on_grid(im)[1] for im in images]
            return [self.check_images(im)[0] for im in images], np.concatenate(grids)
        images = self.check_images(images)
        size = int(self.backend.image_size)
        if images.shape[1:3] != (size, size):
            resolution.check_shape(*images.shape[1:3])
        return images, resolution.to_grid(images, size)

    def model_input(self, images) -> np.ndarray:
        """What the encoder sees at verification: the images on the model's grid (:meth:`on_grid`).
        A method that undoes a geometric transform first overrides this."""
        return self.on_grid(images)[1]

    def invert(self, images: np.ndarray, prompts=None):
        """x at :attr:`inversion_position` of each image (on the model's grid, encoded, inverted
        0 → stop), one batched call.
        Verification normally passes no prompt (the verifier does not know it): the empty prompt,
        as the references do."""
        import torch

        from shallowmark.core import ddim
        from shallowmark.core.images import to_tensor

        images = self.model_input(images)
        with torch.no_grad():
            cond = self.backend.encode_prompt(prompts, len(images)) if prompts is not None else None
            z0 = self.backend.encode(to_tensor(images).to(self.backend.device))
            return self.from_inversion(z0, ddim.invert(self.backend, z0, self.grid, 0, self.inversion_position, cond=cond))

    def from_inversion(self, z0, x):
        """What :meth:`score` reads, from the encoded images ``z0`` and their inversion ``x`` at
        :attr:`inversion_position`: ``x`` itself unless a method says otherwise."""
        return x

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


def invert_shared(methods: dict, images: np.ndarray) -> dict:
    """Every method's :meth:`~WatermarkMethod.invert` output for one batch, sharing the model work:
    latent methods on the same backend and DDIM grid whose :meth:`~LatentMethod.model_input` is the
    same are encoded once and inverted once, stage by stage, up to the furthest stop (Shallow Diffuse's x_t* on the way to the x_T methods' x_T).

    Returns ``{name: inverted}`` for the keys of ``methods`` (name -> method)."""
    import torch

    from shallowmark.core import ddim
    from shallowmark.core.images import to_tensor

    out: dict = {}
    groups: dict[tuple[int, int, int], list[str]] = {}
    inputs: list[np.ndarray] = []   # distinct model inputs: methods that undo a transform see their own
    for name, m in methods.items():
        if m.inversion is None:
            out[name] = m.invert(images)
            continue
        pixels = m.model_input(images)
        which = next((i for i, p in enumerate(inputs) if p.shape == pixels.shape and np.array_equal(p, pixels)), None)
        if which is None:
            inputs.append(pixels)
            which = len(inputs) - 1
        groups.setdefault((id(m.backend), m.inversion.num_steps, which), []).append(name)
    for (_, _, which), names in groups.items():
        first = methods[names[0]]
        backend = first.backend
        with torch.no_grad():
            x = z0 = backend.encode(to_tensor(inputs[which]).to(backend.device))
        cur, at = 0, {}
        for pos in sorted({methods[n].inversion.position for n in names}):
            with torch.no_grad():
                x = ddim.invert(backend, x, first.grid, cur, pos)
            at[pos], cur = x, pos
        for n in names:
            out[n] = methods[n].from_inversion(z0, at[methods[n].inversion.position])
    return out
