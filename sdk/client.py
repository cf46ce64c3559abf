"""The shallowmark client: talk to a shallowmark server from your backend (no torch needed).

Typical use::

    from shallowmark import Keystore
    from shallowmark.client import Client
    from shallowmark.attestation import verify_attestation

    ks = Keystore.open("keys.smks", passphrase)
    with Client("wm.internal:443", token=os.environ["SHALLOWMARK_TOKEN"], tls=True) as c:
        # the server key you pinned at deployment (stored from c.info().attestation_public_key then,
        # or from your operator), read from your config: not fetched again next to the result
        pinned = bytes.fromhex(os.environ["SHALLOWMARK_TRUSTED_KEY"])
        out = c.embed(ks.active(), seed=1234)             # generate a watermarked image
        out.save("image.png")
        res = c.verify(out.image, ks)                     # every key in the store, retired ones too
        if res.detected:
            print(res.identified_key_id, res.best.p_value)
        verify_attestation(res, pinned, image=out.image)  # raises AttestationError if forged

Only method-scoped key material (:class:`~shallowmark.keys.MethodKey`) leaves this process; the
master secret never does. Pass a :class:`~shallowmark.keys.WatermarkKey` and the client derives the
method key for you.

Transport: plaintext unless you ask for TLS (``tls=True`` for the system roots, or
``root_certificates=`` for a private CA); add ``client_cert=`` and ``client_key=`` for mutual TLS.
Sending a token in plaintext to a non-loopback address warns. Calls that fail with UNAVAILABLE
(model loading, server restarting, connection refused), or with a RESOURCE_EXHAUSTED the server
marks as passing (full, or the tenant over a limit; never an oversized message), are retried with exponential backoff and
jitter, within the call's timeout; every retry of one call carries the same ``x-request-id``, so an
``Embed`` is recorded in the ledger once. Other failures raise :class:`ServerError` at once.
"""

from __future__ import annotations

import io
import json
import os
import random
import secrets
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import grpc
import numpy as np

from shallowmark import __version__
from shallowmark._proto.shallowmark.v1 import watermark_pb2 as pb
from shallowmark._proto.shallowmark.v1 import watermark_pb2_grpc as pb_grpc
from shallowmark.errors import InvalidImageError, InvalidParameterError, KeyMaterialError, ShallowmarkError
from shallowmark.keys import MethodKey, WatermarkKey
from shallowmark.imaging import check_rgb, decode_rgb, encode_png

__all__ = [
    "Client", "ServerError", "EmbedResult", "VerifyResult", "KeyVerdict", "Attestation",
    "ServerInfo", "ModelInfo", "MethodInfo", "Limits", "LedgerEntry", "DEFAULT_METHOD", "replica_target",
]

#: The method used when a :class:`WatermarkKey` is given without ``method=``.
DEFAULT_METHOD = "shallow-diffuse"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


class ServerError(ShallowmarkError):
    """The server refused or failed a call.

    Attributes:
        code: the ``grpc.StatusCode`` (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED,
            RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, DATA_LOSS (the server's ledger is
            corrupt: not retried), INTERNAL...).
        details: the server's message (what to change, for INVALID_ARGUMENT).
        request_id: the id sent with the call (quote it to the operator).
    """

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str | None = None):
        self.code, self.details, self.request_id = code, details, request_id
        rid = f" [request {request_id}]" if request_id else ""
        super().__init__(f"{code.name}: {details}{rid}")


# -- result types ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyVerdict:
    """The verdict for one candidate key.

    Attributes:
        key_id: the key's public fingerprint.
        method: its watermark method.
        score: evidence, ``-log10(p_value)`` (2 means p = 0.01); comparable across methods.
        p_value: probability of this much evidence in an image *not* watermarked with this key.
        p_value_corrected: ``min(1, p_value x keys searched)``.
        detected: ``p_value_corrected <= target_fpr``.
        family_size: for a :class:`~shallowmark.keys.KeyFamily`, its size (``key_id`` is then the
            family's id and the p-values are its best member's); 0 for a single key.
        member, member_key_id: that best member's index and id (0 and "" for a single key).
    """

    key_id: str
    method: str
    score: float
    p_value: float
    p_value_corrected: float
    detected: bool
    family_size: int = 0
    member: int = 0
    member_key_id: str = ""


@dataclass(frozen=True)
class Attestation:
    """The server's Ed25519 signature over a Verify result; check it with
    :func:`shallowmark.attestation.verify_attestation`."""

    payload: bytes
    signature: bytes
    public_key: bytes
    payload_format: str


@dataclass(frozen=True)
class VerifyResult:
    """What ``Client.verify`` returns.

    Attributes:
        detected: True if any candidate key is detected at ``target_fpr``.
        identified_key_id: the detected key with the smallest p-value, or ``None``; for a key family's
            member, the member's id (:meth:`~shallowmark.keys.KeyFamily.member_id`).
        identified_member: that member's index in its family, or ``None`` (no family member identified).
        verdicts: one :class:`KeyVerdict` per candidate key, in the order given.
        method_score: the detector's own statistic for the best key (not comparable across methods).
        bits_packed, num_bits: payload bits decoded with the best key (bit-carrying methods only).
        target_fpr, model, image_sha256, request_id: as the server used them.
        notes: conversions the server made to the image (e.g. "RGBA converted to RGB").
        model_evals: denoiser evaluations spent.
        attestation: the server's signature over all of the above.
        nonce: the random nonce this client sent; :func:`~shallowmark.attestation.verify_attestation`
            checks that the attestation signs it (so it was made for this call, not replayed).
    """

    detected: bool
    identified_key_id: str | None
    verdicts: tuple[KeyVerdict, ...]
    method_score: float
    bits_packed: bytes
    num_bits: int
    target_fpr: float
    model: str
    image_sha256: str
    request_id: str
    notes: tuple[str, ...]
    model_evals: int
    attestation: Attestation | None
    nonce: bytes = b""
    identified_member: int | None = None

    @property
    def best(self) -> KeyVerdict:
        """The verdict with the smallest p-value (detected or not)."""
        return min(self.verdicts, key=lambda v: v.p_value)

    @property
    def bits(self) -> np.ndarray | None:
        """Decoded payload bits as a uint8 array of 0/1, or ``None`` for methods without a payload."""
        if not self.num_bits:
            return None
        return np.unpackbits(np.frombuffer(self.bits_packed, dtype=np.uint8), bitorder="big")[:self.num_bits]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary: what ``shallowmark verify --json`` prints for each image, between
        the file name and ``"attested": true``."""
        best = self.best
        return {"detected": self.detected, "key_id": self.identified_key_id, "member": self.identified_member,
                "p_value": best.p_value,
                "p_value_corrected": best.p_value_corrected, "method": best.method, "score": best.score,
                "model": self.model, "image_sha256": self.image_sha256, "request_id": self.request_id}


@dataclass(frozen=True)
class EmbedResult:
    """What ``Client.embed`` returns.

    Attributes:
        image: the watermarked image, PNG bytes (keep it lossless; JPEG weakens the watermark).
        key_id, method, model: what was used.
        image_sha256: SHA-256 of ``image``, as recorded in the server's ledger.
        request_id: the call's id (also in the ledger).
        notes: what the server did to the input (conversions, ignored prompt).
        model_evals: denoiser evaluations spent.
    """

    image: bytes
    key_id: str
    method: str
    model: str
    image_sha256: str
    request_id: str
    notes: tuple[str, ...]
    model_evals: int

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the PNG bytes to ``path`` unchanged and return the path."""
        path = Path(path)
        path.write_bytes(self.image)
        return path

    def to_array(self) -> np.ndarray:
        """The image as uint8 H x W x 3."""
        return decode_rgb(self.image)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    image_size: int
    latent_shape: tuple[int, ...]
    conditional: bool
    loaded: bool


@dataclass(frozen=True)
class MethodInfo:
    name: str
    supports_embed: bool
    generate_model_evals: int
    embed_model_evals: int
    verify_model_evals: int


@dataclass(frozen=True)
class Limits:
    max_image_pixels: int
    max_message_bytes: int
    max_batch: int
    max_keys_per_verify: int


@dataclass(frozen=True)
class ServerInfo:
    """What ``Client.info`` returns: models, methods, limits, and the key that signs Verify results."""

    models: tuple[ModelInfo, ...]
    methods: tuple[MethodInfo, ...]
    limits: Limits
    default_model: str
    attestation_public_key: bytes
    server_version: str
    tenant: str


@dataclass(frozen=True)
class LedgerEntry:
    """One embed recorded by the server (no secrets)."""

    tenant: str
    key_id: str
    method: str
    model: str
    image_sha256: str
    created_at: datetime
    request_id: str
    source: str


# -- helpers ---------------------------------------------------------------------------------------


def _read_bytes(value: bytes | str | os.PathLike[str] | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as e:
        raise InvalidParameterError(f"cannot read {what} {value}: {e}") from None


def _image_bytes(image: Any) -> bytes:
    """PNG/JPEG bytes from bytes, a file path, a uint8 array (H x W x 3) or a PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            return Path(image).read_bytes()
        except OSError as e:
            raise InvalidImageError(f"cannot read image file {image}: {e}") from None
    from PIL import Image

    if isinstance(image, np.ndarray):
        return encode_png(check_rgb(image, "an image array"))
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise InvalidImageError(f"image must be bytes, a path, a uint8 array or a PIL image; got {type(image).__name__}")


def _method_key(key: Any, method: str | None) -> MethodKey:
    if isinstance(key, MethodKey):
        if method and method != key.method:
            raise KeyMaterialError(f"key {key.key_id} was derived for {key.method!r}, not {method!r}")
        return key
    if isinstance(key, WatermarkKey):
        return key.for_method(method or DEFAULT_METHOD)
    raise KeyMaterialError(f"expected a WatermarkKey or MethodKey; got {type(key).__name__}")


def is_loopback_host(host: str) -> bool:
    """True if ``host`` can only reach this machine: ``localhost``, any address in 127.0.0.0/8,
    ``::1`` (brackets allowed) or an IPv4-mapped one (``::ffff:127.0.0.1``). The server uses it
    too, for what it may serve without TLS. Other names are not resolved, so ``127.example.com``
    is not loopback."""
    import ipaddress

    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])  # without an IPv6 zone ("::1%lo")
    except ValueError:
        return False
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _is_loopback(address: str) -> bool:
    if address.startswith("unix:"):
        return True
    if address.startswith(("ipv4:", "ipv6:")):   # a replica list: loopback if every replica is
        return all(_is_loopback(a) for a in address[5:].split(","))
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return is_loopback_host(host.split("///")[-1])


def _retry_after(e) -> float | None:
    """Seconds the server asked a RESOURCE_EXHAUSTED caller to wait (its ``retry-after-ms`` trailer),
    or None when it sent none: then the refusal is not one a retry can pass (gRPC's own, for a
    message over the size limit)."""
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # noqa: BLE001 - an RpcError raised before any response has none
        return None
    for k, v in trailers:
        if k == "retry-after-ms":
            try:
                return max(0.0, float(v) / 1000.0)
            except ValueError:
                return None
    return None


def _health_status(raw: bytes) -> int:
    # grpc.health.v1.HealthCheckResponse has one field: status = 1 (varint). 1 = SERVING.
    return raw[1] if len(raw) >= 2 and raw[0] == 0x08 else 0


#: The service whose health gRPC's client-side health checking asks each replica for.
HEALTH_SERVICE = "shallowmark.v1.Watermark"


def _service_config() -> str:
    # round_robin: each call goes to the next ready replica (pick_first would pin every call to
    # one). healthCheckConfig: a replica counts as ready only while its health service says SERVING,
    # so one that is loading its models, draining on SIGTERM or has found its ledger corrupt gets
    # no calls, while its connection stays up.
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                       "healthCheckConfig": {"serviceName": HEALTH_SERVICE}})


def replica_target(addresses: Sequence[str]) -> str:
    """One gRPC target naming every replica: ``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,...``), which
    round_robin balances over.

    Raises:
        InvalidParameterError: no address, one that is not ``IP:port``, or IPv4 and IPv6 mixed.
    """
    import ipaddress

    if not addresses:
        raise InvalidParameterError("give at least one replica address (host:port)")
    families = set()
    for a in addresses:
        host, sep, port = str(a).rpartition(":")
        try:
            ip = ipaddress.ip_address(host[1:-1] if host.startswith("[") and host.endswith("]") else host)
            ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536
        except ValueError:
            ok = False
        if not ok:
            raise InvalidParameterError(
                f"replica address {a!r} is not IP:port; give each replica's IP address and port (e.g. "
                f"10.0.0.5:50051 or [fd00::5]:50051), or one DNS name that resolves to every replica "
                f"(dns:///wm.internal:50051)")
        families.add(ip.version)
    if len(families) > 1:
        raise InvalidParameterError("replica addresses mix IPv4 and IPv6; gRPC takes one family per target")
    return f"ipv{families.pop()}:" + ",".join(str(a) for a in addresses)


# -- the client ------------------------------------------------------------------------------------


class Client:
    """A connection to one shallowmark server. Thread-safe; reuse one per process.

    Args:
        address: ``host:port`` (or any gRPC target, e.g. ``dns:///wm.internal:443``), or a list of
            replicas' ``IP:port``. With a list, or a ``dns:`` name (which may resolve to several
            replicas), calls are spread over the replicas with gRPC's ``round_robin`` policy and
            go only to those whose health says SERVING; a call that fails because its replica
            went away is retried on another (see ``retries``). Retrying an Embed is safe: the
            retry carries the same request id, and the ledger records one embed per tenant and
            request id across replicas.
        token: bearer token for the ``authorization`` header (the server maps it to your tenant).
        tls: ``True`` for TLS with the system's root certificates; ``None`` (default) means TLS
            exactly when ``root_certificates`` or a client certificate is given.
        root_certificates: PEM of the CA that signed the server certificate (bytes or a path).
        client_cert, client_key: PEM certificate chain and private key for mutual TLS.
        timeout: default deadline per call in seconds, retries included.
        retries: how many times to retry a call that failed with UNAVAILABLE, or with a
            RESOURCE_EXHAUSTED carrying the server's ``retry-after-ms`` trailer (waiting at least that long).
        backoff: first retry delay in seconds; doubles per retry (with jitter), capped at ``max_backoff``.
        max_message_bytes: largest message sent or received.

    Raises:
        InvalidParameterError: unreadable certificate files, or a client certificate without its key.
    """

    def __init__(self, address: str | Sequence[str], token: str | None = None, *, tls: bool | None = None,
                 root_certificates: bytes | str | os.PathLike[str] | None = None,
                 client_cert: bytes | str | os.PathLike[str] | None = None,
                 client_key: bytes | str | os.PathLike[str] | None = None,
                 timeout: float = 120.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 8.0,
                 max_message_bytes: int = 64 * 1024 * 1024):
        if (client_cert is None) != (client_key is None):
            raise InvalidParameterError("mutual TLS needs both client_cert and client_key")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise InvalidParameterError("timeout must be > 0, retries and backoff >= 0")
        if not isinstance(address, str):
            address = replica_target(list(address))
        self.address, self.timeout = address, float(timeout)
        self.retries, self.backoff, self.max_backoff = int(retries), float(backoff), float(max_backoff)
        self._token = token
        root = _read_bytes(root_certificates, "root certificates")
        cert = _read_bytes(client_cert, "client certificate")
        key = _read_bytes(client_key, "client key")
        if tls is None:
            tls = root is not None or cert is not None
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes),
                   ("grpc.primary_user_agent", f"shallowmark-python/{__version__}")]
        if address.startswith(("ipv4:", "ipv6:", "dns:")):
            options.append(("grpc.service_config", _service_config()))
        if tls:
            creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(address, creds, options=options)
        else:
            if cert is not None:
                raise InvalidParameterError("client certificates need TLS; do not pass tls=False with them")
            if token and not _is_loopback(address):
                warnings.warn(f"sending a bearer token without TLS to {address}; pass tls=True or "
                              "root_certificates=... unless a trusted proxy terminates TLS", stacklevel=2)
            self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.WatermarkStub(self._channel)
        self._health = self._channel.unary_unary("/grpc.health.v1.Health/Check")

    # -- plumbing --------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, rpc, request, timeout: float | None, request_id: str | None = None):
        rid = request_id or uuid.uuid4().hex
        metadata = [("x-request-id", rid)]
        if self._token:
            metadata.append(("authorization", f"Bearer {self._token}"))
        deadline = time.monotonic() + (self.timeout if timeout is None else float(timeout))
        attempt = 0
        while True:
            left = deadline - time.monotonic()
            try:
                return rpc(request, timeout=max(left, 0.001), metadata=metadata), rid
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
                details = (e.details() if hasattr(e, "details") else str(e)) or ""
                wait = _retry_after(e) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if (code in _RETRYABLE or wait is not None) and attempt < self.retries:
                    delay = min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                    delay = max(delay, wait or 0.0)
                    if time.monotonic() + delay < deadline:
                        attempt += 1
                        time.sleep(delay)
                        continue
                raise ServerError(code, details, rid) from None

    # -- API -------------------------------------------------------------------------------------
    def embed(self, key: WatermarkKey | MethodKey, *, method: str | None = None, model: str = "",
              seed: int | None = None, prompt: str | None = None, image: Any = None,
              output: str | None = None, timeout: float | None = None,
              request_id: str | None = None) -> EmbedResult:
        """Watermark an image: generate one from ``seed`` (and ``prompt``), or mark ``image``.

        Args:
            key: a :class:`WatermarkKey` (the method key is derived here; only it is sent), a
                :class:`MethodKey`, or a key family's member (``family.member(i)``; the result's
                ``key_id`` is then the member's id).
            method: watermark method; default the ``MethodKey``'s, or ``"shallow-diffuse"``.
            model: server model name; empty for the server's default.
            seed: seed of the initial noise (generate mode); 0 .. 2**64-1.
            prompt: text prompt (conditional models only; others ignore it and say so in ``notes``).
            image: existing image to watermark: bytes, a path, a uint8 H x W x 3 array or a PIL image,
                exactly the model's size.
            output: how a marked ``image`` comes back (shallow-diffuse): ``"residual"`` keeps your
                pixels and adds only the watermark's change (about 38 dB PSNR on photos with
                tiny-ldm), ``"decode"`` returns the model's decoding (about 25 dB). Default: the
                server's setting ("decode" unless configured). Only with ``image``. Use
                ``"decode"`` to mark an image the model generated itself: there the residual mark
                comes out weak.
            timeout: seconds for this call, retries included (default: the client's).
            request_id: your id for the call (1..64 of ``[A-Za-z0-9._-]``); default a random one.

        Raises:
            ServerError: the server refused (INVALID_ARGUMENT with what to change, ...).
            InvalidParameterError: neither or both of ``seed`` and ``image``; ``output`` with ``seed``.
            KeyMaterialError: a key for another method, or a retired :class:`WatermarkKey`.
        """
        if isinstance(key, WatermarkKey) and key.retired:
            raise KeyMaterialError(f"key {key.key_id} is retired (rotated out): it still verifies but should not "
                                   "embed; use the keystore's active key")
        mk = _method_key(key, method)
        req = pb.EmbedRequest(method=mk.method, model=model, method_key=mk.to_bytes())
        if (seed is None) == (image is None):
            raise InvalidParameterError("give exactly one of seed= (generate a new image) or image= (watermark it)")
        if image is not None:
            if prompt:
                raise InvalidParameterError("prompt= applies to generation (seed=), not to image=")
            req.image = _image_bytes(image)
            req.output = output or ""
        else:
            if output:
                raise InvalidParameterError("output= applies to image= (a marked upload), not to seed=")
            if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
                raise InvalidParameterError(f"seed must be an int in 0..2**64-1; got {seed!r}")
            req.generate.seed = int(seed)
            req.generate.prompt = prompt or ""
        resp, _ = self._call(self._stub.Embed, req, timeout, request_id)
        return EmbedResult(image=resp.image, key_id=resp.key_id, method=resp.method, model=resp.model,
                           image_sha256=resp.image_sha256, request_id=resp.request_id, notes=tuple(resp.notes),
                           model_evals=resp.model_evals)

    def verify(self, image: Any, keys: Any, *, method: str | None = None, target_fpr: float = 0.01,
               model: str = "", timeout: float | None = None, request_id: str | None = None) -> VerifyResult:
        """Detect whether ``image`` carries a watermark from one of ``keys``, and which one.

        Args:
            image: bytes (PNG/JPEG), a path, a uint8 H x W x 3 array or a PIL image.
            keys: a key, a list of keys (:class:`WatermarkKey` and/or :class:`MethodKey`), or a
                :class:`~shallowmark.keystore.Keystore` (all its keys, retired ones included). A
                :class:`~shallowmark.keys.KeyFamily` (``key.family(method, size)``) counts as all its
                members: one call can search 100 000 keys (``Limits.max_keys_per_verify``), and
                ``identified_member`` says which member marked the image.
            method: method for :class:`WatermarkKey` entries (default ``"shallow-diffuse"``).
            target_fpr: accepted false-positive rate, corrected for the number of keys.

        Raises:
            ServerError: the server refused (see :class:`ServerError`).
            KeyMaterialError: no keys, or a key of the wrong type.
        """
        if hasattr(keys, "verification_keys"):
            keys = keys.verification_keys()
        elif isinstance(keys, (WatermarkKey, MethodKey)):
            keys = [keys]
        mks = [_method_key(k, method) if isinstance(k, WatermarkKey) else _method_key(k, None) for k in keys]
        if not mks:
            raise KeyMaterialError("verify needs at least one key")
        # a fresh nonce per call: the signed payload echoes it, so an old attestation cannot be replayed
        nonce = secrets.token_bytes(16)
        req = pb.VerifyRequest(image=_image_bytes(image), method_keys=[k.to_bytes() for k in mks],
                               target_fpr=float(target_fpr), model=model, nonce=nonce)
        r, _ = self._call(self._stub.Verify, req, timeout, request_id)
        att = None
        if r.HasField("attestation"):
            a = r.attestation
            att = Attestation(payload=a.payload, signature=a.signature, public_key=a.public_key,
                              payload_format=a.payload_format)
        return VerifyResult(
            detected=r.detected, identified_key_id=r.identified_key_id or None,
            verdicts=tuple(KeyVerdict(v.key_id, v.method, v.score, v.p_value, v.p_value_corrected, v.detected,
                                      v.family_size, v.member, v.member_key_id) for v in r.verdicts),
            identified_member=r.identified_member if r.HasField("identified_member") else None,
            method_score=r.method_score, bits_packed=r.bits, num_bits=r.num_bits, target_fpr=r.target_fpr,
            model=r.model, image_sha256=r.image_sha256, request_id=r.request_id, notes=tuple(r.notes),
            model_evals=r.model_evals, attestation=att, nonce=nonce)

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        """Models, methods, limits, the attestation public key, and your tenant."""
        r, _ = self._call(self._stub.GetInfo, pb.GetInfoRequest(), timeout)
        return ServerInfo(
            models=tuple(ModelInfo(m.name, m.image_size, tuple(m.latent_shape), m.conditional, m.loaded)
                         for m in r.models),
            methods=tuple(MethodInfo(m.name, m.supports_embed, m.generate_model_evals, m.embed_model_evals,
                                     m.verify_model_evals) for m in r.methods),
            limits=Limits(r.limits.max_image_pixels, r.limits.max_message_bytes, r.limits.max_batch,
                          r.limits.max_keys_per_verify),
            default_model=r.default_model, attestation_public_key=r.attestation_public_key,
            server_version=r.server_version, tenant=r.tenant)

    def list_embeds(self, *, key_id: str | None = None, page_size: int = 100, tenant: str = "",
                    timeout: float | None = None) -> Iterator[LedgerEntry]:
        """Your tenant's ledger entries, newest first (pages are fetched as you iterate)."""
        token = ""
        while True:
            req = pb.ListEmbedsRequest(tenant=tenant, key_id=key_id or "", page_size=page_size, page_token=token)
            r, _ = self._call(self._stub.ListEmbeds, req, timeout)
            for e in r.entries:
                yield LedgerEntry(e.tenant, e.key_id, e.method, e.model, e.image_sha256,
                                  e.created_at.ToDatetime(tzinfo=_utc()), e.request_id, e.source)
            token = r.next_page_token
            if not token:
                return

    def wait_until_ready(self, timeout: float = 60.0, poll: float = 0.2) -> None:
        """Block until the server's health check says SERVING (models loaded).

        Raises:
            ServerError: UNAVAILABLE if it is not serving within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                raw = self._health(b"", timeout=max(min(2.0, deadline - time.monotonic()), 0.001))
                if _health_status(raw) == 1:
                    return
                last = "NOT_SERVING (models loading)"
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
            time.sleep(poll)
        raise ServerError(grpc.StatusCode.UNAVAILABLE, f"server {self.address} not ready after {timeout:.0f} s ({last})")


def _utc():
    from datetime import timezone

    return timezone.utc
