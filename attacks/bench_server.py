"""Server mode of ``shallowmark bench``: the same grid through the SDK against a running server.

An auditor without model access measures a deployment as its users meet it:

* **Watermarked images** come from the server's ``Embed`` with the fixed test keys: generated
  from the seeds (``positives="generate"``, the default), or, with ``positives="upload"``, the
  server's watermarked versions of the unwatermarked images themselves (the user scenario), for
  the methods that can embed into an existing image (the others still generate).
* **Unwatermarked images** are the auditor's own: crops of the photos bundled with scikit-image,
  scikit-learn and matplotlib (the default; one crop per seed, drawn from the seed), or the first
  ``n`` PNG/JPEG files of a folder (``negatives``), at their own sizes (the server maps any size
  onto its model's grid; nothing is resized here).
* **Attacks** run here, on numpy and Pillow (the ``regen`` attack needs the model, so it is left
  out of the default set and refused when asked for).
* **Detection** is the server's ``Verify`` with the method's test keys; the ROC uses
  ``VerifyResponse.method_score`` (the detector's statistic for the best key, the in-process
  ``score``), the verdicts the server's Bonferroni-corrected ``detected``.
* **Fidelity** is the user scenario: PSNR/SSIM of the server's watermarked version of an uploaded
  image against that upload, for the methods that can embed one.
* **Cost** is measured on this client (seconds per call, round trip included, ``batch`` calls in
  flight), plus the model evaluations the server reports.

Everything is checked before the first Embed or Verify: names and numbers
(:func:`~shallowmark.attacks.bench_config.validate_config`), then one ``GetInfo``: the server answers,
takes the token, serves the model and the methods. The cache is the in-process one's folder and
table, under names of their own (``images/via-server/...``, contexts hashed with ``"server"``): a
re-run only calls the server for what is missing. A server is identified by its version, model
description and attestation public key; clear the cache if its operator changes the model without
changing either.

This module imports no torch: it runs where only the SDK and the numeric packages are installed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from shallowmark.errors import InvalidImageError, InvalidParameterError, UnknownNameError

from shallowmark.imaging import decode_rgb

from .bench_cache import stable_hash
from .bench_config import (
    DEFAULT_ATTACKS,
    DEFINITIONS,
    BenchConfig,
    ServerModeUnavailableError,
    _negative_files,
    validate_config,
)
from .bench_grid import Grid, keyed_images, pair_fidelity, run_grid, verify_cost
from .bench_report import _sanitize, client_machine, versions
from .registry import get_attack

__all__ = ["run_server_bench", "photo_crops", "SERVER_DEFINITIONS"]

#: GetInfo needs no model work, so a server that does not answer within this many seconds is not there.
PROBE_TIMEOUT_S = 5.0
# Bump when photo_crops changes: the crops are part of the cache identity of the negatives.
_CROPS_VERSION = 1

SERVER_DEFINITIONS = {
    **DEFINITIONS,
    "score": "VerifyResponse.method_score: the detector's own statistic for the best of the searched keys (ring "
             "cosine for the ring methods, fraction of matching bits for the bit-carrying methods), as the "
             "server computed it.",
    "detected_pos": "Fraction of watermarked images the server's Verify flags (its Bonferroni-corrected p-value "
                    "of the best key ≤ target_fpr; no threshold fitted on the data).",
    "bit_accuracy": "Mean method_score of the watermarked images for the methods whose Verify returns payload "
                    "bits (there the statistic is the fraction of the best key's bits recovered).",
    "psnr_ssim": "User scenario: PSNR (dB) and SSIM of the server's watermarked version of an uploaded "
                 "unwatermarked image against that upload, averaged over the n images; only for methods that "
                 "can watermark an existing image (the others build the watermark into generation and have no "
                 "unwatermarked original to compare with).",
    "cost": "Measured on the client: embed_seconds per Embed that generates, upload_embed_seconds per Embed of an "
            "uploaded image, verify_seconds per Verify (clean images), each the wall time of a group of `batch` "
            "concurrent calls divided by its size, round trip included. Model evaluations as the server reports "
            "them: embed/upload_embed from GetInfo, verify from VerifyResponse.model_evals.",
}


def run_server_bench(config: BenchConfig, progress: bool = True, log=None, client=None) -> dict:
    """Run the grid of ``config`` against the server at ``config.server``; write the reports and
    return report.json's dict (see the module docstring for what is measured how).

    Args:
        config: the grid; ``server`` set, ``num_steps``/``method_config``/``model_options`` unset.
        progress: show a tqdm progress bar on stderr.
        log: optional ``log(message)`` for a few status lines.
        client: a :class:`shallowmark.client.Client` for ``config.server`` (TLS, token, timeout);
            default: a plaintext one with the token from ``$SHALLOWMARK_TOKEN``.

    Raises:
        UnknownNameError: an unknown method or attack, or a model or method the server does not offer.
        InvalidParameterError: bad numbers, an attack that needs the model, too few negatives.
        ServerModeUnavailableError: the server does not answer, refuses the token, or its model
            failed to load.
        ServerError: a call failed during the run (what was done so far stays in the cache).
    """
    method_names, attacks = validate_config(config)
    own = client is None
    if own:
        from shallowmark.client import Client

        client = Client(config.server, token=os.environ.get("SHALLOWMARK_TOKEN"))
    elif getattr(client, "address", None) != config.server:
        raise InvalidParameterError(f"client talks to {getattr(client, 'address', None)!r}, config.server is "
                                    f"{config.server!r}")
    try:
        return run_grid(Grid.build(config, method_names, attacks), ServerExecutor(config, client), progress, log)
    finally:
        if own:
            client.close()


# -- the server's side of validation -------------------------------------------------------------------
def _probe(client, address: str):
    """GetInfo, with the failures a person can fix turned into one clear error."""
    import grpc

    from shallowmark.client import ServerError

    try:
        return client.info(timeout=min(client.timeout, PROBE_TIMEOUT_S))
    except ServerError as e:
        if e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            reason = (f"no shallowmark server answered within {PROBE_TIMEOUT_S:g} s ({e.code.name}: {e.details}); "
                      "check the address, that the server is running, and --tls/--ca if it serves TLS")
        elif e.code == grpc.StatusCode.UNAUTHENTICATED:
            reason = f"the server refused the token ({e.details}); set SHALLOWMARK_TOKEN or pass --token"
        else:
            reason = str(e)
        raise ServerModeUnavailableError(address, reason) from None


def _server_setup(config: BenchConfig, method_names: Sequence[str], client, log):
    """GetInfo and every check against it: (info, model info, method infos)."""
    info = _probe(client, config.server)
    models = {m.name: m for m in info.models}
    if config.model not in models:
        raise UnknownNameError(f"model on the server {config.server}", config.model, models)
    if not models[config.model].loaded:
        log(f"model {config.model} is loading on the server; waiting up to {client.timeout:g} s")
        try:
            client.wait_until_ready(timeout=client.timeout)
        except Exception as e:  # noqa: BLE001 - the health check's message says why
            raise ServerModeUnavailableError(config.server, f"model {config.model} is not loaded ({e})") from None
        info = _probe(client, config.server)
        models = {m.name: m for m in info.models}
        if not models[config.model].loaded:
            raise ServerModeUnavailableError(config.server, f"model {config.model} failed to load on the server")
    offered = {m.name: m for m in info.methods}
    for name in method_names:
        if name not in offered:
            raise UnknownNameError(f"method on the server {config.server}", name, offered)
    if int(config.n_keys) > info.limits.max_keys_per_verify:
        raise InvalidParameterError(f"n_keys={config.n_keys}: the server checks at most "
                                    f"{info.limits.max_keys_per_verify} keys per Verify")
    return info, models[config.model], {name: offered[name] for name in method_names}


# -- the unwatermarked images ----------------------------------------------------------------------------
def _bundled_photos() -> dict[str, np.ndarray]:
    from shallowmark.core.photos import heldout_photo, training_photos

    photos = training_photos()
    photos["grace_hopper"] = heldout_photo()
    return photos


def photo_crops(seeds: Sequence[int], size: int, photos: Optional[dict] = None) -> dict[int, np.ndarray]:
    """One ``size``×``size`` crop per seed from the bundled photos (no torch, no download).

    The seed alone picks the photo (round-robin over the photos sorted by name, so consecutive
    seeds cover all of them evenly), the square's side (half the photo's short side up to all of
    it, never below ``size``) and its position; the square is resized with Lanczos. So image
    ``s`` is the same in every run, whatever ``n``.
    """
    from PIL import Image

    photos = _bundled_photos() if photos is None else photos
    names = sorted(photos)
    out = {}
    for s in seeds:
        rng = np.random.default_rng([zlib.crc32(b"bench-negatives"), int(s)])
        img = photos[names[int(s) % len(names)]]
        h, w = img.shape[:2]
        short = min(h, w)
        side = int(rng.integers(min(short, max(size, short // 2)), short + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(np.ascontiguousarray(img[top:top + side, left:left + side]))
        out[int(s)] = np.asarray(crop.resize((size, size), Image.LANCZOS), dtype=np.uint8)
    return out


def _negatives(config: BenchConfig, size: int) -> tuple[dict[int, np.ndarray], dict, str]:
    """(images by seed, their record for the report, their cache identity)."""
    files = _negative_files(config)
    seeds = config.seeds
    if files is None:
        photos = _bundled_photos()
        digest = hashlib.sha1()
        for name in sorted(photos):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(photos[name]).tobytes())
        ident = stable_hash(["photos", _CROPS_VERSION, int(size), digest.hexdigest()], 10)
        record = dict(source="photos", photos=sorted(photos), crops_version=_CROPS_VERSION, identity=ident)
        return photo_crops(seeds, size, photos), record, ident
    images, hashes = {}, []
    for s, path in zip(seeds, files):
        data = path.read_bytes()
        try:
            images[s] = decode_rgb(data)   # as it is: the server maps any size onto its model's grid
        except InvalidImageError as e:
            raise InvalidImageError(f"negatives: {path}: {e}") from None
        hashes.append([path.name, hashlib.sha256(data).hexdigest()])
    ident = stable_hash(["folder", 2, hashes], 10)   # 2: kept at their own size (1: centre-cropped)
    record = dict(source="folder", folder=str(Path(config.negatives)), files=[h[0] for h in hashes], identity=ident)
    return images, record, ident


# -- the server executor ----------------------------------------------------------------------------------
def _score_row(res) -> tuple:
    """A VerifyResult as the cache stores it (see :mod:`~shallowmark.attacks.bench_grid`). Bits
    are a payload, and method_score the fraction recovered, only for the methods whose key feeds
    payload bits: Shallow Diffuse's bits are the variant index it found, and its score a cosine."""
    from shallowmark.methods import method_spec

    best = res.best
    payload = res.num_bits and "payload_bits" in method_spec(best.method).derivations
    return (float(res.method_score), float(best.p_value), int(res.detected),
            float(res.method_score) if payload else None, int(res.model_evals), best.key_id)


class ServerExecutor:
    """The grid's work done by a server through the SDK: Embed for the positives (from seeds, or
    of the negatives themselves with ``positives="upload"``), Verify for every score, ``batch`` calls
    in flight; attacks run here. Negatives are the auditor's own images."""

    mode = "server"
    ctx_tag = ["server"]
    definitions = SERVER_DEFINITIONS
    attack_context = None

    def __init__(self, config: BenchConfig, client):
        self.config, self.client = config, client
        self.pool = ThreadPoolExecutor(max_workers=int(config.batch), thread_name_prefix="bench-rpc")

    def prepare(self, grid, log) -> None:
        config = self.config
        self.info, self.model_info, self.method_infos = _server_setup(config, grid.method_names, self.client, log)
        size = int(self.model_info.image_size)
        self.neg_images, self.neg_record, self.neg_id = _negatives(config, size)
        log(f"server {config.server}: shallowmark {self.info.server_version}, model {config.model} ({size}×{size}), "
            f"methods {', '.join(grid.method_names)}; unwatermarked images: {self.neg_record['source']}")
        # -- nothing has been asked of the server but GetInfo so far --------------------------------------
        self.fingerprint = stable_hash([self.info.server_version, _model_record(self.model_info),
                                        self.info.attestation_public_key.hex()], 16)
        self.params = {n: {"class": "server", **dataclasses.asdict(self.method_infos[n])} for n in grid.method_names}
        self.can_upload = {n: bool(self.method_infos[n].supports_embed) for n in grid.method_names}
        self.source = {n: "upload" if config.positives == "upload" and self.can_upload[n] else "generate"
                       for n in grid.method_names}

    def folder(self, name: str, kind: str, key_id: str = "") -> str:
        from shallowmark import __version__

        base = f"via-server/{self.config.model}-{self.fingerprint}/{kind}-{name}-" \
               f"{stable_hash([__version__, self.params[name]], 10)}"
        if kind == "uploaded":
            base += f"-{self.neg_id}"  # the server's versions of these very negatives
        return base + (f"/{key_id[:16]}" if key_id else "")

    def images_id(self, name: str, kind: str) -> str:
        if kind != "pos":
            return f"negatives-{self.neg_id}"
        return self.folder(name, "uploaded" if self.source[name] == "upload" else "watermarked")

    def image_work(self, grid) -> int:
        return grid.n * (sum(self.can_upload.values()) + sum(v == "generate" for v in self.source.values()))

    def make_images(self, grid, cache, bar) -> tuple[dict, dict]:
        model = self.config.model

        def embedded(name: str, kind: str) -> dict:
            def call(key, s):
                if kind == "uploaded":
                    return self.client.embed(key, method=name, model=model, image=self.neg_images[s])
                return self.client.embed(key, method=name, model=model, seed=s)

            def make(key, chunk):   # a list: uploads come back at their own sizes
                return [r.to_array() for r in self.pool.map(lambda s: call(key, s), chunk)]

            return keyed_images(grid, cache, bar, name, lambda kid: self.folder(name, kind, kid), make,
                                "embed-upload" if kind == "uploaded" else "embed")

        self.uploaded = {name: embedded(name, "uploaded") for name in grid.method_names if self.can_upload[name]}
        positives = {name: self.uploaded[name] if self.source[name] == "upload" else embedded(name, "watermarked")
                     for name in grid.method_names}
        return self.neg_images, positives

    def detect(self, wanted: dict, images: np.ndarray, grid) -> dict:
        def verify(name, im):
            return self.client.verify(im, grid.keys[name], target_fpr=grid.target_fpr, model=self.config.model)

        return {name: [_score_row(r) for r in self.pool.map(lambda i: verify(name, images[i]), idx)]
                for name, idx in wanted.items()}

    def fidelity(self, grid, negatives: dict, positives: dict) -> list[dict]:
        out = []
        for name in grid.method_names:
            if not self.can_upload[name]:
                out.append(dict(method=name, psnr=None, ssim=None, reference=None,
                                note="the server cannot watermark an uploaded image with this method (the "
                                     "watermark is built into generation): no original to compare with"))
                continue
            out.append(dict(method=name, **pair_fidelity([(self.uploaded[name][s], negatives[s]) for s in grid.seeds]),
                            reference="upload",
                            note="user scenario: the server's watermarked version vs the uploaded original"))
        return out

    def cost(self, grid, cache, ctx_of) -> list[dict]:
        out = []
        for name in grid.method_names:
            mi = self.method_infos[name]
            verify_s, evals = verify_cost(grid, cache, ctx_of, name)
            out.append(dict(
                method=name, embed_seconds=cache.mean_timing("embed", [self.folder(name, "watermarked")], grid.seeds),
                verify_seconds=verify_s, verify_model_evals=evals, embed_model_evals=int(mi.generate_model_evals),
                upload_embed_seconds=cache.mean_timing("embed-upload", [self.folder(name, "uploaded")], grid.seeds),
                upload_embed_model_evals=int(mi.embed_model_evals) if self.can_upload[name] else None))
        return out

    def config_record(self, grid) -> dict:
        config = self.config
        left_out = [a for a in DEFAULT_ATTACKS if get_attack(a).context] if config.attacks == DEFAULT_ATTACKS else []
        return _config_record(config, list(grid.method_names), grid.attacks, self.params, grid.key_ids,
                              self.fingerprint, self.info, self.model_info, self.source, self.neg_record, left_out)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _model_record(m) -> dict:
    d = dataclasses.asdict(m)
    d.pop("loaded")  # a state, not part of the model's identity
    d["latent_shape"] = list(d["latent_shape"])
    return d


def _config_record(config, method_names, attacks, params, key_ids, server_fp, info, model_info, source,
                   neg_record, left_out) -> dict:
    generated = [m for m in method_names if source[m] == "generate"]
    uploads = [m for m in method_names if source[m] == "upload"]
    note = "generated by the server from the seeds (Embed with a seed)" if not uploads else (
        f"the server's watermarked versions of the unwatermarked images (Embed of an upload) for "
        f"{', '.join(uploads)}" + (f"; generated from the seeds for {', '.join(generated)} (no upload embed)"
                                   if generated else ""))
    if neg_record["source"] == "photos":
        unwatermarked = ("crops of the photos bundled with scikit-image, scikit-learn and matplotlib, one per seed "
                         "(photo, size and position drawn from the seed), resized to the model's size")
    else:
        unwatermarked = f"the first n PNG/JPEG files of {neg_record['folder']} by name, at their own sizes"
    server_info = dict(
        address=config.server, server_version=info.server_version, tenant=info.tenant,
        default_model=info.default_model, models=[dataclasses.asdict(m) for m in info.models],
        methods=[dataclasses.asdict(m) for m in info.methods], limits=dataclasses.asdict(info.limits),
        attestation_public_key=info.attestation_public_key.hex(),
        methods_note="GetInfo lists the methods of the server's default model")
    vers = versions()
    vers["shallowmark-server"] = info.server_version
    return _sanitize(dict(
        mode="server", methods=list(method_names),
        attacks=[dict(label=a.label, name=a.name, strength=a.value, scale=get_attack(a.name).scale) for a in attacks],
        attacks_left_out=left_out,
        n=int(config.n), n_watermarked_per_method=int(config.n), n_unwatermarked=int(config.n),
        seeds=config.seeds, n_keys=int(config.n_keys), key_ids=key_ids,
        keys_note="fixed test keys WatermarkKey.from_hex(f'{i:064x}'), i = 1..n_keys, derived per method and sent "
                  "as method keys; image i carries key i mod n_keys and every Verify searches all n_keys keys",
        target_fpr=float(config.target_fpr), model=config.model, model_options={},
        model_fingerprint=server_fp, num_steps=None, method_params=params, method_config={},
        batch=int(config.batch), out_dir=str(config.out_dir), cache_dir=str(config.resolved_cache_dir()),
        server=config.server, quick=bool(config.quick), server_info=server_info,
        positives=dict(source), positives_requested=config.positives, positives_note=note,
        negatives=neg_record, unwatermarked_images=unwatermarked,
        attack_rng="numpy default_rng([crc32(name|strength|pos-or-neg|method), seed]) per image",
        command=config.command or " ".join(sys.argv), versions=vers, machine=client_machine(),
    ))
