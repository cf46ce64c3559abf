"""The Node.js example (examples/node/verify.js) against the test server: GetInfo and Verify with the
committed proto, the token from the environment, and the attestation checked in Node against a pinned
key (--trusted-key): format v2, signature, the image's SHA-256 and the nonce it sent.

Skipped unless ``node`` is on PATH and the example's dependencies are installed
(``cd examples/node && npm ci``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
TOKEN_A = "token-for-tenant-a"  # as in conftest.py

pytestmark = pytest.mark.skipif(
    shutil.which("node") is None or not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(),
    reason="needs node and the example's packages: cd examples/node && npm ci")


def _run(server, args, token=TOKEN_A):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHALLOWMARK_")}
    env["SHALLOWMARK_SERVER"] = server.address
    if token:
        env["SHALLOWMARK_TOKEN"] = token
    return subprocess.run(["node", str(EXAMPLE / "verify.js"), *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def _pinned_b64(server) -> str:
    import base64

    return base64.b64encode(server.signer.public_key_raw).decode()


def test_node_client_verifies_and_checks_the_attestation(server, embedded, keys, tmp_path):
    import base64

    image = tmp_path / "wm.png"
    image.write_bytes(embedded.image)
    k0, k1 = tmp_path / "k0.smk", tmp_path / "k1.smk"
    k0.write_bytes(keys[0].for_method("shallow-diffuse").to_bytes())                    # raw
    k1.write_bytes(base64.b64encode(keys[1].for_method("shallow-diffuse").to_bytes()))  # base64
    proc = _run(server, ["--trusted-key", _pinned_b64(server), image, k1, k0])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tenant"] == "a" and out["models"] == ["tiny-ldm"]
    assert out["detected"] and out["identified_key_id"] == keys[0].key_id_for("shallow-diffuse")
    assert [v["key_id"] for v in out["verdicts"]] == [keys[1].key_id_for("shallow-diffuse"), keys[0].key_id_for("shallow-diffuse")]
    assert out["image_sha256"] == embedded.image_sha256 and out["attestation_valid"] is True
    assert out["tenant_signed"] == "a"

    # the pinned key as a PEM file works the same; another key is refused (exit 3, no verdicts)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    pem = tmp_path / "server.pem"
    pem.write_bytes(Ed25519PublicKey.from_public_bytes(server.signer.public_key_raw).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    proc = _run(server, ["--trusted-key", pem, image, k0])
    assert proc.returncode == 0 and json.loads(proc.stdout)["attestation_valid"] is True, proc.stderr
    other = Ed25519PrivateKey.generate().public_key().public_bytes(serialization.Encoding.Raw,
                                                                   serialization.PublicFormat.Raw)
    proc = _run(server, ["--trusted-key", base64.b64encode(other).decode(), image, k0])
    assert proc.returncode == 3, proc.stderr
    out = json.loads(proc.stdout)
    assert out["attestation_valid"] is False and "different key" in out["attestation_error"] and "verdicts" not in out


def test_node_client_refuses_to_run_without_a_pinned_key(server, embedded, keys, tmp_path):
    image = tmp_path / "wm.png"
    image.write_bytes(embedded.image)
    key = tmp_path / "k.smk"
    key.write_bytes(keys[0].for_method("shallow-diffuse").to_bytes())
    proc = _run(server, [image, key])
    assert proc.returncode == 1 and "--trusted-key is required" in proc.stderr and not proc.stdout
    proc = _run(server, ["--trusted-key", "c2hvcnQ=", image, key])   # 5 bytes
    assert proc.returncode == 1 and "32 raw bytes" in proc.stderr


def test_node_attestation_check_refuses_another_image_nonce_or_format(tmp_path):
    """checkAttestation (exported by verify.js) on payloads signed here by a server Signer."""
    import hashlib

    from shallowmark.server.attestation import Signer, verify_payload

    signer = Signer.ephemeral()
    image, nonce = b"the image bytes", bytes(range(16))

    def case(fmt="shallowmark.verify.v2", signed_image=image, signed_nonce=nonce):
        payload = verify_payload(request_id="r", image_sha256=hashlib.sha256(signed_image).hexdigest(),
                                 model="tiny-ldm", target_fpr=0.01, detected=True, identified_key_id="c",
                                 method_score=1.0, bits_packed=b"", num_bits=0, verdicts=[], tenant="a",
                                 nonce=signed_nonce)
        payload["format"] = fmt
        data, sig = signer.sign(payload)
        return {"payload": data.hex(), "signature": sig.hex(), "format": fmt}

    cases = {"ok": case(), "v1": case(fmt="shallowmark.verify.v1"), "image": case(signed_image=b"other"),
             "nonce": case(signed_nonce=b"\x01" * 16)}
    script = tmp_path / "check.js"
    script.write_text(
        "const v = require(process.argv[2]);\n"
        "const cases = JSON.parse(process.argv[3]);\n"
        "const key = v.loadTrustedKey(process.argv[4]);\n"
        "const out = {};\n"
        "for (const [name, c] of Object.entries(cases)) {\n"
        "  const att = { payload: Buffer.from(c.payload, 'hex'), signature: Buffer.from(c.signature, 'hex'),\n"
        "                public_key: Buffer.alloc(0), payload_format: c.format };\n"
        "  try { v.checkAttestation(att, key, { imageSha256: process.argv[5], nonce: Buffer.from(process.argv[6], 'hex') });\n"
        "        out[name] = 'ok'; } catch (e) { out[name] = e.message; }\n"
        "}\n"
        "console.log(JSON.stringify(out));\n")
    proc = subprocess.run(["node", str(script), str(EXAMPLE / "verify.js"), json.dumps(cases),
                           signer.public_key_raw.hex(), hashlib.sha256(image).hexdigest(), nonce.hex()],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["ok"] == "ok"
    assert "format" in out["v1"] and "SHA-256 of the image sent" in out["image"] and "nonce" in out["nonce"]


def test_node_client_without_token_is_unauthenticated(server, embedded, keys, tmp_path):
    image = tmp_path / "wm.png"
    image.write_bytes(embedded.image)
    key = tmp_path / "k.smk"
    key.write_bytes(keys[0].for_method("shallow-diffuse").to_bytes())
    proc = _run(server, ["--trusted-key", _pinned_b64(server), image, key], token=None)
    assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr
