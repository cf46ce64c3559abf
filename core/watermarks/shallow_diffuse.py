"""Shallow Diffuse (Li, Zhang, Qu, arXiv 2410.21088): inject a Fourier ring key at an intermediate
step t* ≈ 0.3T, where the posterior-mean Jacobian is low rank, and verify by DDIM inversion back
to t* only.

Server scenario (``generate``): x_T → DDIM → x_t* → inject the key → DDIM → x_0 → decode.
User scenario (``embed``): encode the image → invert to t* → inject → DDIM → x_0, returned either
as the decoded latent (``output="decode"``, the paper's; fidelity bounded by the autoencoder) or
as the original pixels plus the decoded difference D(z_wm) − D(z) (``output="residual"``).
Detection: undo the geometry the synchronisation template shows (pixel work) → encode → invert
0 → t* (``round(t*·N)`` model evaluations) → ring statistic, searched over the flips, right-angle
rotations and circular shifts of x_t* (no model work), the searches paid for in the p-value.

Geometric robustness (beyond the paper; ``sync_amplitude=0`` and ``shift_window=0`` turn it off):
every watermarked image also carries a faint pixel template (:mod:`shallowmark.core.sync`, about 45 dB on its own) from which verification estimates
a rotation, rescale, aspect change or mirror image, then from its cosines' phases the remaining
translation (a crop's offset), and undoes both before inverting; what the phases leave unsure is
left to the shift search on x_t*. Neither costs a model evaluation.

Options beyond the paper's code: ``injection="nullspace"`` projects the injected change onto the
null space of the Jacobian of the posterior mean at x_t* (top-r right singular subspace by subspace
iteration), which the theory says leaves the final image least changed; ``channel_averaging``
(the reference code's trick) takes the channels without the key from the unwatermarked path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from shallowmark.core import ddim
from shallowmark.core import sync
from shallowmark.core.images import to_tensor, to_uint8
from shallowmark.core.sync import SyncTemplate
from shallowmark.core.watermarks import rings
from shallowmark.core.watermarks.base import LatentMethod, ModelEvals
from shallowmark.errors import InvalidParameterError, check_choice
from shallowmark.keys import FamilyMember, KeyFamily, MethodKey, ring_variant_choice, ring_variants_seed

# how an existing image comes back: through the decoder, or its own pixels plus the decoded change
OUTPUT_MODES = ("decode", "residual")
GEOMETRIC_SEARCHES = ("dihedral", "none")


def _pixels_token(image: np.ndarray) -> bytes:
    """What identifies an uploaded image for its key variant: a hash of its shape and pixels."""
    import hashlib

    a = np.ascontiguousarray(image)
    return b"image:" + hashlib.sha256(repr(a.shape).encode() + a.tobytes()).digest()


def variant_bits(index: int, n_variants: int) -> np.ndarray:
    """A variant index as its ``ceil(log2 n_variants)`` bits, most significant first: the payload
    that ``key_variants`` variants carry per image (4 bits at 16)."""
    n_bits = max(1, int(np.ceil(np.log2(n_variants))))
    return np.array([(index >> (n_bits - 1 - b)) & 1 for b in range(n_bits)], dtype=np.uint8)


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and right-angle rotations of latents (…, H, W): rotations by 0, 90, 180 and 270
    degrees, each also mirrored left-right."""
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        out += [r, r.flip(-1)]
    return out


#: Key variants when ``ShallowDiffuseConfig.key_variants`` is None (and the statistic has as many dimensions).
DEFAULT_KEY_VARIANTS = 16


@dataclass(frozen=True)
class ShallowDiffuseConfig:
    """Parameters, chosen on tiny-ldm (4×64×64 latents from 256² images, f=4).

    The key sits in channel 3 (the reference's choice; in the scan channel 2 costs 6.9 dB more) on
    the rings ``inner_radius..radius`` around the zero frequency, with complex ring values, written
    by shifting each ring's mean. Why, from the key scan
    (``shallowmark bench-key-scan``, docs/benchmarks/methods/key-scan):

    - at t* = 0.3T (ᾱ = 0.62) the signal power ᾱ·P(r) of generated latents stays below the noise
      power 1 − ᾱ = 0.38 from ring 8 outwards, so rings 8-16 are mostly noise and changing them
      barely shows, while a radius-4 px blur (σ = 1 latent px) keeps 73 % to 29 % of their
      amplitude (the Gaussian's transfer function). The reference code's Nyquist placement
      (``ring_centre="nyquist"``, ``inner_radius=0``, ``radius=10``, real values, ``ring_write=
      "replace"``, strength 4) suits Stable Diffusion's f=8 latents; with f=4 it is 1/8 cycle per
      pixel, and that blur erases it;
    - complex values give two numbers per ring (18 instead of 9): the exact p-value turns more
      numbers into a much stronger test at the same energy, so the strength can stay low;
    - ``ring_write="mean"`` moves only each ring's mean — what the detector reads — and keeps the
      variation inside the ring; on a real photo (user scenario) that variation is the photo's own
      detail, which overwriting (the paper's code) would erase.
    """

    # injection step as a fraction of T, or "auto": where the posterior-mean Jacobian's rank ratio
    # first comes near its minimum (core.t_star.auto_t_star; measured once per model, cached)
    t_star: float | str = 0.3
    num_steps: int = 50              # DDIM steps from T to 0
    channel: int = 3                 # latent channel that carries the key
    radius: int = 16                 # outermost key ring, in frequency bins
    inner_radius: int = 8            # innermost key ring (0: the whole disc)
    ring_centre: str = "dc"          # "dc" or "nyquist" (the reference code's placement)
    # where the ring pattern sits in space (rings.RingGeometry): "centre" of the latent, or "corner",
    # the FFT's origin (Tree-Ring's and the paper's placement). A rotation's fill, a zoom or a
    # platform crop removes the corners, where a corner pattern's energy is concentrated: with 16
    # key_variants at strength 1.05, the benchmark's 100 generations kept TPR 1.00 at 1 % FPR after a
    # 30° rotation, a zoom and a 4:5 crop when centred, 0.54-0.73 at the corner, and 9 keys of 9
    # kept every image (docs/reliability/forgery). An image verifies only under the origin it was
    # embedded with: the server records each embed's configuration and verifies under it.
    ring_origin: str = "centre"
    complex_key: bool = True         # complex ring values (2 numbers per ring) or real (Tree-Ring's)
    # "replace": overwrite the rings with the key (the paper's code); "mean": shift each ring's mean
    # to the key value, the smallest change that gives x_t* the key's ring profile (rings.set_ring_means)
    ring_write: str = "mean"
    # std of the real and imaginary parts of the ring values (ortho-FFT units; a N(0, 1) latent
    # has 1): the x_t* coefficients there have variance ≈ 0.4-1, so the key looks like fresh noise.
    # 1.05 with 16 key_variants: a variant is a random direction of the 18 numbers whose norm is
    # strength·√18, so 1.05 gives it the norm (4.45) of the benchmark key that the robustness
    # figures were first measured with at 0.8 (docs/reliability/forgery/README.md).
    strength: float = 1.05
    # strength when watermarking an existing image (user scenario). A photo is held to a stricter
    # bar (PSNR against the original itself) than a generated image, and the detector's cosine does
    # not depend on the scale of the key, so the verifier needs no flag. None: ``strength``.
    embed_strength: float | None = 0.6
    injection: str = "plain"         # "plain" (paper's code) or "nullspace"
    channel_averaging: bool = True   # other channels from the unwatermarked path
    output: str = "decode"           # user scenario: "decode" or "residual"
    nullspace_rank: int = 16         # r of the removed top singular subspace
    nullspace_iters: int = 3         # subspace iterations
    # Verification's search over where the key may have gone: "dihedral" scores the inverted x_t*
    # under the 8 flips and right-angle rotations (the latent follows them closely: on 4 images a
    # flipped or rotated copy scored p 1e-13..1e-19 once undone in the latent; without the search a
    # left-right flip scored 1e-8..1e-7, a top-bottom flip or a 90/180-degree rotation 0.02..1),
    # at no model cost, and pays for the 7 other views in the p-value (``identity_share``); "none": as is.
    geometric_search: str = "dihedral"
    # ... and over circular shifts of x_t* by up to this many latent pixels each way (0: none), for a
    # translated or off-centre cropped image (rings.shifted_cosines; no model cost). Paid for in the
    # p-value with a weighted Bonferroni bound (``identity_share``: ×4×8×(2w+1)² for all shifts).
    # 8: a 10 % translation moves the latent 6.4 px. Without ``whiten`` the bench key's verdict at
    # target 1 % fired on up to 10 % of 100 unwatermarked generations under attacks (README,
    # geometric run); whitened, the per-key rates spread as binomial sampling does.
    shift_window: int = 8
    # Share of the p-value's error budget (weighted Bonferroni) given to the image as the
    # synchronisation template left it, unshifted and unturned; the other views and the shifts,
    # fallbacks for when the template was not found (JPEG 25 erases it, busy photos hide it), share
    # the rest equally. The template undoes rotations, mirror images and translations before the
    # inversion, so the identity is where the key is expected: on the benchmark's 100 generations,
    # clean and under 21 attacks (flips and right-angle rotations included), the identity view
    # held the smallest unshifted p-value for 67-98 of them, the left-right mirror (which shares
    # much of the ring statistic) for most of the rest (docs/reliability/forgery/hypotheses).
    # 0.5 costs an untouched image ×2 where equal weights over the 8 views cost ×16, and a
    # fallback ×4 (instead of ×2) its family's size. Measured on the same images: brightness
    # jitter 6 went from TPR@1%FPR 0.93 to 0.95, crop + JPEG 50 (where the template is found
    # least often) from 1.00 to 0.99, every other attack stayed at 1.00.
    identity_share: float = 0.5
    # Amplitude (grey levels per peak) of the synchronisation template (core.sync) added to every
    # watermarked image on the model's grid, from which verification estimates and undoes a
    # rotation, rescale, aspect change or mirror image before inverting; 0: no template (and no
    # estimate at verification).
    # 0.8: a 45 dB template, found on generated images after crops, rotations and rescales.
    sync_amplitude: float = 0.8
    # ... and estimate a translation from the template's phases and undo it in pixel space too
    # (core.sync.estimate_shift): to a fraction of a pixel where the shift search on x_t* finds
    # whole latent pixels (8 pixels) only, and at the unshifted hypotheses' price (×16, not
    # ×16×(2w+1)²). On 16 generations cropped off-centre to 75 % of the area, median −log10 p
    # 2.5 -> 5.5 and TPR at 1 % 0.88 -> 1.00 (docs/benchmarks/geometric/shift). False: the shift
    # search alone.
    sync_shift: bool = True
    # Fill the exactly black regions touching the image's edge (a rotation's corners, a
    # translation's fill) with their nearest pixel before anything else at verification
    # (core.images.fill_black_borders; key-independent, so the p-value stays exact). Without it the
    # corners every rotated copy shares make some keys fire far more often than the target on
    # unwatermarked images: over 200 keys on 100 unwatermarked generations rotated by 30°, the
    # per-key verdict rates spread 2.08× binomial without it and 1.11× with it (15°: 1.30 -> 0.89),
    # at no measured cost in power (docs/benchmarks/geometric/rotate30).
    fill_borders: bool = True
    # Score each ring's mean in units of its own standard error, estimated from the same ring's
    # bins (rings.ring_profile): keeps the verdict calibrated for every key, not only on average
    # over keys, because an unwatermarked latent's inner rings vary several times more than its
    # outer ones at t*.
    whiten: bool = True
    # Per-image key diversity, against forgery and removal by averaging (docs/reliability/forgery):
    # each image carries one of this many variants of the key's ring values, mutually orthogonal
    # directions drawn from the key (rings.orthogonal_key_values, keys.ring_variants_seed), chosen
    # by a keyed hash of its seed or of its pixels (keys.ring_variant_choice). An average of many
    # watermarked images then holds many patterns, each weakly. Verification scores every variant
    # (no model cost) and pays ×key_variants in the p-value; the best variant's index is a
    # log2(key_variants)-bit per-image payload. At most the statistic's dimensions (18 by default).
    # None: 16, or every dimension when the statistic has fewer (smaller rings or latents).
    # 16: forgery by averaging 4, 16 or 64 watermarked images turned at most 2 of 99 targets at
    # every attacker PSNR >= 25 dB (docs/reliability/forgery). 1: every image carries the key's own
    # values (the paper's), and averaging 16 images forged all 24 targets.
    key_variants: int | None = None
    # Score the ring statistic on x_t* − √ᾱ(t*)·z0, the part of the inverted latent that the encoded
    # image z0 does not explain (the inversion's noise estimate, scaled), instead of on x_t* itself.
    # An unwatermarked image's own content gives its x_t* a ring profile of its own, and that
    # profile is shared by images alike (generations of one model, photos of one kind), so some keys
    # fired on several times their target FPR while others never did; the key, written at t* where
    # the denoiser treats those rings as noise, stays mostly out of z0 and so in the residual.
    noise_residual: bool = True

    def validate(self, latent_shape) -> None:
        if latent_shape is None:
            raise InvalidParameterError("shallow-diffuse needs a diffusion backend")
        if isinstance(self.t_star, str):
            check_choice("t_star", self.t_star, ("auto",))
        elif not 0.0 < self.t_star < 1.0:
            raise InvalidParameterError(f"t_star must be in (0, 1) or 'auto'; got {self.t_star}")
        check_choice("injection mode", self.injection, ("plain", "nullspace"))
        check_choice("output mode", self.output, OUTPUT_MODES)
        if not 0 <= self.channel < latent_shape[0]:
            raise InvalidParameterError(f"channel must be in [0, {latent_shape[0] - 1}]; got {self.channel}")
        check_choice("ring centre", self.ring_centre, rings.CENTRES)
        check_choice("ring write", self.ring_write, ("replace", "mean"))
        check_choice("geometric search", self.geometric_search, GEOMETRIC_SEARCHES)
        if self.strength <= 0:
            raise InvalidParameterError(f"strength must be > 0; got {self.strength}")
        if not 0.0 < self.identity_share < 1.0:
            raise InvalidParameterError(f"identity_share must be in (0, 1) (the other hypotheses share the rest of the "
                                        f"error budget); got {self.identity_share}")
        if not 0 <= self.shift_window <= latent_shape[-1] // 4:
            raise InvalidParameterError(f"shift_window must be in [0, {latent_shape[-1] // 4}]; got {self.shift_window}")
        self.sync_template().validate()
        dims = rings.RingGeometry(latent_shape[-1], self.radius, self.ring_centre, self.inner_radius,
                                  self.complex_key, self.ring_origin).dims
        if self.key_variants is not None and not 1 <= self.key_variants <= dims:
            raise InvalidParameterError(f"key_variants must be in [1, {dims}] (the variants are orthogonal directions "
                                        f"of the ring statistic's {dims} dimensions); got {self.key_variants}")
        if self.embed_strength is not None and self.embed_strength <= 0:
            raise InvalidParameterError(f"embed_strength must be > 0 or None; got {self.embed_strength}")


    def sync_template(self) -> SyncTemplate:
        return SyncTemplate(amplitude=self.sync_amplitude, max_shift=SyncTemplate.max_shift if self.sync_shift else 0.0)


class ShallowDiffuse(rings.RingKeyed, LatentMethod):
    name = "shallow-diffuse"
    supports_embed = True
    output_modes = OUTPUT_MODES
    config_class = ShallowDiffuseConfig
    # the defaults until the forgery defence became the default (docs/reliability/forgery)
    unrecorded_options = {"key_variants": 1, "strength": 0.8, "ring_origin": "corner"}

    def __init__(self, backend, config: ShallowDiffuseConfig | None = None):
        self._configure(backend, config)
        if self.config.t_star == "auto":
            from shallowmark.core.t_star import auto_t_star

            self.t_star = auto_t_star(backend, num_steps=self.config.num_steps)
        else:
            self.t_star = float(self.config.t_star)
        self.k_star = self.grid.position(self.t_star)
        self.geom = rings.RingGeometry(backend.latent_shape[-1], self.config.radius, self.config.ring_centre,
                                       self.config.inner_radius, self.config.complex_key, self.config.ring_origin)
        self.template = self.config.sync_template() if self.config.sync_amplitude > 0 else None
        #: the variants a plain key has (the config's key_variants, resolved)
        self.key_variants = self.config.key_variants or min(DEFAULT_KEY_VARIANTS, self.geom.dims)

    def effective_config(self) -> ShallowDiffuseConfig:
        """The config with ``key_variants`` resolved (None: 16, or the statistic's dimensions)."""
        return dataclasses.replace(self.config, key_variants=self.key_variants)

    @property
    def inversion_position(self) -> int:
        return self.k_star

    def from_inversion(self, z0, x):
        """x_t*, or with ``noise_residual`` x_t* − √ᾱ(t*)·z0 (see the config)."""
        if not self.config.noise_residual:
            return x
        return x - float(self.grid.alphas[self.k_star]) ** 0.5 * z0.to(x)

    def _score(self, x: torch.Tensor, keys, target_fpr: float) -> list:
        """The ring statistic, searched over the dihedral transforms of x_t* and, when configured,
        over its circular shifts (:func:`geometric_p_values`). The score is −log10 of the p-value, so
        ROC curves rank images the way the verdict does."""
        if self.config.geometric_search == "none" and self.config.shift_window == 0 and self.key_variants == 1:
            return super()._score(x, keys, target_fpr)
        from shallowmark.core.watermarks.base import KeyRows, best_key, rows_verdict

        p, found = self.variant_p_values(x, keys)
        score = -np.log10(np.clip(p, 1e-300, 1.0))
        evals = self.model_evals().verify
        rows = KeyRows.of(keys)
        out = []
        for i in range(len(p)):
            # With several variants, the best key's variant index is the image's payload (its bits,
            # most significant first); which variant an image got is not secret from its key holder.
            # A family member has no variants, hence no payload.
            row = best_key(p[i], score[i])
            n_var = self.variants_of(rows.keys[rows.owner(row)[0]])
            bits = None if n_var == 1 else variant_bits(int(found[i, row]), n_var)
            out.append(rows_verdict(self.name, p[i], score[i], rows, target_fpr, evals, bits=bits))
        return out

    def geometric_p_values(self, x: torch.Tensor, keys) -> np.ndarray:
        """(batch, rows) p-values (a row per key, one per member of a family), valid under "not
        watermarked with this key" whatever was searched (:meth:`variant_p_values` without the variants)."""
        return self.variant_p_values(x, keys)[0]

    def variant_p_values(self, x: torch.Tensor, keys) -> tuple[np.ndarray, np.ndarray]:
        """((batch, rows) p-values, (batch, rows) index of each row's best-matching variant); a row per
        key, one per member of a key family.

        Every variant of every key (``key_variants`` of them, :meth:`variant_values`) is scored, and
        a key's p-value is its best variant's times the number of variants (Bonferroni).

        Hypotheses, in three families: x_t* as it is (the identity: the image as the synchronisation
        left it), the 7 other flips and right-angle rotations of x_t* ("dihedral"), and every view
        under every circular shift within ``shift_window``. Weighted Bonferroni: with shares s_f of
        the error budget (:meth:`hypothesis_shares`), p = min_f h_f·p_f/s_f, p_f the smallest
        p-value of family f and h_f its size; valid for any shares that sum to 1."""
        views = dihedral(x) if self.config.geometric_search == "dihedral" else [x]
        blocks = [self.variant_values(k) for k in keys]    # per key: (rows·variants, n_values)
        values = torch.cat(blocks)
        dims, w = self.geom.dims, self.config.shift_window
        wh, ch = self.whitened, self.config.channel
        s_id, s_views, s_shift = self.hypothesis_shares()
        c = torch.stack([rings.cosines(v.contiguous(), ch, values, self.geom, wh) for v in views])
        p = rings.p_values(c[0], dims) / s_id
        if len(views) > 1:
            p = np.minimum(p, rings.p_values(c[1:].max(0).values, dims) * (len(views) - 1) / s_views)
        if w:
            # every view's shifts as one set of hypotheses: one pass over the keys, however many
            profiles = torch.cat([rings.shift_profiles(v.contiguous(), ch, self.geom, w, wh) for v in views], 2)
            cs = rings.max_cosines(profiles, self.geom, values)
            p = np.minimum(p, rings.p_values(cs, dims) * len(views) * (2 * w + 1) ** 2 / s_shift)
        out_p, out_j, at = [], [], 0
        for k, block in zip(keys, blocks):
            # a family is one row per member, each its own pattern; a plain key one row of n variants
            n = self.variants_of(k)
            kp = p[:, at:at + len(block)].reshape(p.shape[0], -1, n)
            out_p.append(np.minimum(1.0, kp.min(axis=2) * n))
            out_j.append(kp.argmin(axis=2))
            at += len(block)
        return np.concatenate(out_p, axis=1), np.concatenate(out_j, axis=1)

    def hypothesis_shares(self) -> tuple[float, float, float]:
        """Shares of the error budget of the identity, the other dihedral views and the shifts
        (:meth:`variant_p_values`): ``identity_share`` to the identity, the rest split equally
        between the fallbacks that are searched (0 for one that is not)."""
        views = self.config.geometric_search == "dihedral"
        shifts = self.config.shift_window > 0
        if not views and not shifts:
            return 1.0, 0.0, 0.0
        s = float(self.config.identity_share)
        rest = (1.0 - s) / (int(views) + int(shifts))
        return s, rest if views else 0.0, rest if shifts else 0.0

    def variants_of(self, key: MethodKey) -> int:
        """How many variants ``key`` has: ``key_variants`` for a plain key, 1 for a key family or
        one of its members, whose members are already one pattern each (variants would multiply a
        100 000-member family's rows by their number). Averaging images of one member works as it
        does with one variant (SECURITY.md)."""
        return 1 if isinstance(key, (KeyFamily, FamilyMember)) else self.key_variants

    def variant_values(self, key: MethodKey) -> torch.Tensor:
        """The ring values of each of the key's variants: (variants_of(key), n_values); a family's
        rows are its members (one variant each)."""
        if self.variants_of(key) == 1:
            return self.key_rows(key)
        return rings.orthogonal_key_values(ring_variants_seed(key), self.geom, self.key_variants,
                                           self.config.strength)

    def variant_for(self, key: MethodKey, token: bytes) -> int:
        """The variant an image identified by ``token`` carries (0 with one variant)."""
        n = self.variants_of(key)
        return 0 if n == 1 else ring_variant_choice(key, token, n)

    def _variant_values(self, keys: Sequence[MethodKey], variants: Sequence[int] | None) -> torch.Tensor:
        if self.key_variants == 1:
            return self._values(keys)
        variants = [0] * len(keys) if variants is None else variants
        return torch.stack([self.variant_values(k)[int(j)] for k, j in zip(keys, variants)])

    def model_evals(self) -> ModelEvals:
        # generate: T → t*, then t* → 0 on the watermarked and the reference path (one batched call
        # per step, counted once); embed: invert 0 → t*, then both paths t* → 0; verify: 0 → t*.
        n, k = int(self.grid.num_steps), int(self.k_star)
        return ModelEvals(generate=n + k, embed=3 * k, verify=k)

    # -- the injection at t* ------------------------------------------------------------------------
    def inject(self, x_star: torch.Tensor, keys: Sequence[MethodKey], scale: float = 1.0,
               variants: Sequence[int] | None = None) -> torch.Tensor:
        """x_t* with each image's key written in; ``variants``: each image's key variant (None: the
        first, which with one variant is the key's own values)."""
        values = scale * self._variant_values(keys, variants)
        if self.config.ring_write == "replace":
            marked = rings.inject(x_star, self.config.channel, torch.stack([rings.pattern(self.geom, v) for v in values]),
                                  self.geom)
        else:
            marked = rings.set_ring_means(x_star, self.config.channel, values, self.geom)
        if self.config.injection == "plain":
            return marked
        from shallowmark.core import jacobian

        t = self.grid.timesteps[self.k_star - 1]
        out = []
        for i in range(x_star.shape[0]):
            sub = jacobian.top_subspace(self.backend, x_star[i:i + 1], t, self.config.nullspace_rank,
                                        self.config.nullspace_iters, cond=None, seed=i)
            delta = jacobian.nullspace_project(marked[i:i + 1] - x_star[i:i + 1], sub)
            out.append(x_star[i:i + 1] + delta)
        return torch.cat(out)

    def _finish(self, x_star, keys, scale: float = 1.0, variants=None):
        """Inject at t*, denoise both paths to 0, average channels. Returns (z_wm, z_ref).

        From t* to 0 both paths are denoised without the prompt (no classifier-free guidance), as
        the reference code does: the layout is fixed by t*, guidance there would double the UNet
        work, and the verifier inverts without the prompt, so the unguided model is the one whose
        steps it retraces (the nullspace projection uses the same model's Jacobian)."""
        x_wm = self.inject(x_star, keys, scale, variants)
        both = ddim.denoise(self.backend, torch.cat([x_wm, x_star]), self.grid, self.k_star, 0, cond=None)
        z_wm, z_ref = both.chunk(2)
        if self.config.channel_averaging:
            keep = [c for c in range(z_wm.shape[1]) if c != self.config.channel]
            z_wm = z_wm.clone()
            z_wm[:, keep] = z_ref[:, keep]
        return z_wm, z_ref

    # -- server scenario ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate_latents(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> torch.Tensor:
        """Watermarked clean latents x_0 (before decoding)."""
        keys = self.check_keys(keys, len(seeds))
        cond = self.backend.encode_prompt(prompts, len(seeds)) if prompts is not None else None
        x_star = ddim.denoise(self.backend, self.backend.randn_latents(seeds), self.grid,
                              self.grid.num_steps, self.k_star, cond=cond)
        variants = [self.variant_for(k, b"seed:%d" % int(s)) for k, s in zip(keys, seeds)]
        z_wm, _ = self._finish(x_star, keys, variants=variants)
        return z_wm

    def with_template(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoded images (N×3×size×size in [−1, 1]) with the synchronisation template added."""
        if self.template is None:
            return decoded
        return decoded + torch.from_numpy(sync.pattern(self.template, decoded.shape[-1]) / 127.5).to(decoded)

    @torch.no_grad()
    def generate(self, keys: Sequence[MethodKey], seeds: Sequence[int], prompts=None) -> np.ndarray:
        return to_uint8(self.with_template(self.backend.decode(self.generate_latents(keys, seeds, prompts))))

    def model_input(self, images) -> np.ndarray:
        """The images on the model's grid, with a rotation, rescale, aspect change or mirror image
        undone where the synchronisation template shows one (:func:`~shallowmark.core.sync.synchronise`;
        pixel work only, about 0.25 s per image on one CPU core)."""
        grid = self.on_grid(images)[1]
        if self.config.fill_borders:
            from shallowmark.core.images import fill_black_borders

            grid = np.stack([fill_black_borders(im) for im in grid])
        return grid if self.template is None else sync.synchronise(grid, self.template)[0]

    def resolve_output(self, output: str | None, shape) -> str:
        """The output mode an embed of an image of ``shape`` (height, width) uses: ``output``, or the
        config's at the model's size and "residual" at any other.

        Raises:
            UnknownNameError: not one of :data:`OUTPUT_MODES`.
            InvalidParameterError: "decode" for an image that is not at the model's size.
        """
        s = int(self.backend.image_size)
        native = tuple(int(v) for v in shape) == (s, s)
        output = check_choice("output mode", output or (self.config.output if native else "residual"), OUTPUT_MODES)
        if output == "decode" and not native:
            raise InvalidParameterError(
                f"output 'decode' returns the model's own {s}x{s} decoding and cannot keep a "
                f"{shape[1]}x{shape[0]} image's size; use output 'residual' (the default for images that are "
                f"not {s}x{s})")
        return output

    # -- user scenario ------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, keys: Sequence[MethodKey], images: np.ndarray, prompts=None, output: str | None = None) -> np.ndarray:
        """Watermark existing images of any size (:mod:`~shallowmark.core.resolution`'s limits);
        they come back at their own size. ``output`` ("decode" or "residual") overrides the config's
        ``output`` for this call (the service sets it per request). "decode" returns the model's own
        decoding, so it exists only at the model's size; for other sizes the default is "residual":
        the watermark's change, computed on the image's centre square mapped onto the model's grid,
        resized back and added to the image's own pixels there."""
        from shallowmark.core import resolution

        images, grid_images = self.on_grid(images)
        output = self.resolve_output(output, images.shape[1:3])
        keys = self.check_keys(keys, len(images))
        cond = self.backend.encode_prompt(prompts, len(images)) if prompts is not None else None
        z0 = self.backend.encode(to_tensor(grid_images).to(self.backend.device))
        x_star = ddim.invert(self.backend, z0, self.grid, 0, self.k_star, cond=cond)
        scale = (self.config.embed_strength or self.config.strength) / self.config.strength
        variants = [self.variant_for(k, _pixels_token(im)) for k, im in zip(keys, images)]
        z_wm, z_ref = self._finish(x_star, keys, scale, variants)
        if output == "decode":
            return to_uint8(self.with_template(self.backend.decode(z_wm)))
        # only the watermark's change: the key's and the template's
        diff = self.with_template(self.backend.decode(z_wm)) - self.backend.decode(z_ref)
        diff = resolution.carry_change(diff.cpu(), *images.shape[1:3])
        return to_uint8(to_tensor(images) + diff)
