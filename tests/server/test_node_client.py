"""The Node.js example (examples/node/verify.js) against the test server: GetInfo and Verify with the
committed proto, the token from the environment, and the attestation checked in Node.

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


def test_node_client_verifies_and_checks_the_attestation(server, embedded, keys, tmp_path):
    import base64

    image = tmp_path / "wm.png"
    image.write_bytes(embedded.image)
    k0, k1 = tmp_path / "k0.smk", tmp_path / "k1.smk"
    k0.write_bytes(keys[0].for_method("shallow-diffuse").to_bytes())                    # raw
    k1.write_bytes(base64.b64encode(keys[1].for_method("shallow-diffuse").to_bytes()))  # base64
    proc = _run(server, [image, k1, k0])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tenant"] == "a" and out["models"] == ["tiny-ldm"]
    assert out["detected"] and out["identified_key_id"] == keys[0].key_id_for("shallow-diffuse")
    assert [v["key_id"] for v in out["verdicts"]] == [keys[1].key_id_for("shallow-diffuse"), keys[0].key_id_for("shallow-diffuse")]
    assert out["image_sha256"] == embedded.image_sha256 and out["attestation_valid"] is True


def test_node_client_without_token_is_unauthenticated(server, embedded, keys, tmp_path):
    image = tmp_path / "wm.png"
    image.write_bytes(embedded.image)
    key = tmp_path / "k.smk"
    key.write_bytes(keys[0].for_method("shallow-diffuse").to_bytes())
    proc = _run(server, [image, key], token=None)
    assert proc.returncode == 2 and "UNAUTHENTICATED" in proc.stderr
