"""The CLI's service commands: keys new/list, embed and verify against the test server, and serve."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from shallowmark.cli import main

TOKEN_A = "token-for-tenant-a"  # as in conftest.py


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("SHALLOWMARK_PASSPHRASE", "cli test passphrase")
    monkeypatch.setenv("SHALLOWMARK_TOKEN", TOKEN_A)


def test_keys_embed_verify(server, env, tmp_path, capsys):
    ks = str(tmp_path / "keys.smks")
    assert main(["keys", "new", "--keystore", ks, "--label", "first"]) == 0
    first = capsys.readouterr().out.strip()
    assert main(["keys", "new", "--keystore", ks, "--rotate"]) == 0
    second = capsys.readouterr().out.strip()
    assert main(["keys", "list", "--keystore", ks, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["key_id"], r["retired"], r["active"]) for r in rows] == [(first, True, False), (second, False, True)]

    out = tmp_path / "wm.png"
    common = ["--server", server.address, "--keystore", ks]
    assert main(["embed", *common, "--key", first, "--seed", "4", "--out", str(out)]) == 2
    assert "retired" in capsys.readouterr().err and not out.exists()
    assert main(["embed", *common, "--seed", "4", "--out", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["key_id"] == second and out.read_bytes().startswith(b"\x89PNG")

    marked = tmp_path / "marked-upload.png"   # an upload, returned as its own pixels + the mark
    assert main(["embed", *common, "--image", str(out), "--output", "residual", "--out", str(marked)]) == 0
    assert marked.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert main(["embed", *common, "--seed", "4", "--output", "residual", "--out", str(tmp_path / "x.png")]) == 2
    assert "--output applies to --image" in capsys.readouterr().err and not (tmp_path / "x.png").exists()

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    # the attestation is checked against a pinned key, or skipped only when asked to
    assert main(["verify", *common, str(out), "--json"]) == 2
    assert "--trusted-key" in capsys.readouterr().err
    assert main(["verify", *common, str(out), "--no-attestation-check"]) == 0
    cap = capsys.readouterr()
    assert "NOT checked" in cap.err and "[attestation not checked]" in cap.out
    assert main(["verify", *common, str(out), "--trusted-key", "00" * 32]) == 2   # not the server's key
    assert "different key" in capsys.readouterr().err
    pinned = server.signer.public_key_raw
    key_file = tmp_path / "server.pub"
    key_file.write_text(pinned.hex() + "\n")
    assert main(["verify", *common, str(out), "--trusted-key", str(key_file)]) == 0
    cap = capsys.readouterr()
    assert "watermarked with" in cap.out and "not checked" not in cap.out

    assert main(["verify", *common, str(out), str(junk), "--json", "--trusted-key", pinned.hex()]) == 2   # one file failed
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["detected"] and lines[0]["key_id"] == second and lines[0]["method"] == "shallow-diffuse"
    assert lines[0]["p_value"] < 0.01 and lines[0]["attested"]
    assert {"score", "model", "image_sha256", "request_id", "p_value_corrected"} <= set(lines[0])  # VerifyResult.to_dict
    assert lines[1]["file"] == str(junk) and "INVALID_ARGUMENT" in lines[1]["error"]


def test_keys_without_passphrase_fail_clearly(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("SHALLOWMARK_PASSPHRASE", raising=False)
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    assert main(["keys", "list", "--keystore", str(tmp_path / "none.smks")]) == 2
    assert "SHALLOWMARK_PASSPHRASE" in capsys.readouterr().err


# 127.0.0.2: every 127.0.0.0/8 address is loopback, and development mode listens on any of them
@pytest.mark.parametrize("host", [None, "127.0.0.2"])
def test_serve_prints_a_dev_token_and_drains_on_sigterm(tmp_path, host):
    from shallowmark.client import Client

    cmd = [sys.executable, "-m", "shallowmark.cli", "serve", "--port", "0", "--state-dir", str(tmp_path)]
    cmd += ["--host", host] if host else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        addr = token = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and token is None:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"server on (\S+)", line)
            addr = m.group(1) if m else addr
            m = re.search(r"development token \(tenant 'dev'\): (\S+)", line)
            token = m.group(1) if m else token
        assert addr and token, proc.stderr.read() if proc.poll() is not None else "no token printed"
        assert addr.startswith(f"{host or '127.0.0.1'}:")
        with Client(addr, token, retries=0, timeout=30) as c:
            assert c.info().tenant == "dev"
        proc.send_signal(signal.SIGTERM)   # possibly while the model still loads
        rc = proc.wait(timeout=60)
        err = proc.stderr.read()
        assert rc == 0, err[-3000:]
        assert "stopped" in err
        assert (tmp_path / "attestation_ed25519.pem").exists() and (tmp_path / "ledger.sqlite3").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_ledger_url_flag_reaches_the_server(tmp_path, capsys):
    from shallowmark.cli import main

    # a bad URL is refused before anything listens, with the valid forms in the message
    assert main(["serve", "--port", "0", "--state-dir", str(tmp_path), "--ledger-url", "mysql://db/x"]) == 2
    err = capsys.readouterr().err
    assert "unknown ledger URL scheme" in err and "postgresql://" in err
    assert not (tmp_path / "ledger.sqlite3").exists()
