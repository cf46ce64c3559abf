"""deploy/healthcheck.py, the image's HEALTHCHECK and the pods' probes, against real servers on
free loopback ports: plaintext, TLS and mutual TLS, before and after the models load, and draining."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SCRIPT = Path(__file__).parents[2] / "deploy" / "healthcheck.py"


def probe(config, *args, env=None):
    """Run the script as a probe does: its exit code and its output."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--config", str(config), *args], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    return r.returncode, r.stdout + r.stderr


def _cert(subject, issuer, issuer_key, key, *, ca=False, dns=(), usage=None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if dns:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for "shallowmark" (the Service name; not "localhost", which the
    probe would otherwise assume) and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = _cert("test CA", ca_name, ca_key, ca_key, ca=True)
    files = {"ca.crt": ca}
    for name, dns, usage in (("tls", ["shallowmark"], ExtendedKeyUsageOID.SERVER_AUTH),
                             ("client", [], ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{name}.crt"] = _cert(name, ca_name, ca_key, key, dns=dns, usage=usage)
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    for name, c in files.items():
        (d / name).write_bytes(c.public_bytes(serialization.Encoding.PEM))
    return d


@pytest.fixture
def start(tmp_path, tiny_ldm, request):
    """``start(tls=None, client_ca=None)``: a real server (no model loaded yet) and the server.toml a
    probe reads for it."""
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import ServerConfig, TLSConfig

    apps = []
    request.addfinalizer(lambda: [app.stop(0) for app in apps])

    def run(tls=None, client_ca=None):
        tls_config = TLSConfig(cert=tls / "tls.crt", key=tls / "tls.key", client_ca=client_ca) if tls else None
        app = ServerApp(ServerConfig(port=0, state_dir=tmp_path, tls=tls_config, grace_s=1.0),
                        backend_loader=lambda name, **options: tiny_ldm).start(load_models=False)
        apps.append(app)
        toml = f"port = {app.port}\n"
        if tls:
            toml += f'[tls]\ncert = "{tls / "tls.crt"}"\nkey = "{tls / "tls.key"}"\n'
            toml += f'client_ca = "{client_ca}"\n' if client_ca else ""
        (tmp_path / "server.toml").write_text(toml)
        return app, tmp_path / "server.toml"

    return run


def test_plaintext_not_serving_until_the_models_load_then_serving_then_stopped(start):
    app, cfg = start()
    rc, out = probe(cfg)
    assert rc == 1 and "NOT_SERVING" in out                    # readiness: not yet
    assert probe(cfg, "--alive") == (0, "NOT_SERVING\n")        # liveness: the process answers
    assert app.load_models()
    assert probe(cfg) == (0, "SERVING\n")
    assert probe(cfg, "--service", "") == (0, "SERVING\n")
    rc, out = probe(cfg, "--service", "no.such.Service")
    assert rc == 1 and "NOT_FOUND" in out
    app.stop(0)
    rc, out = probe(cfg, "--alive")
    assert rc == 1 and "UNAVAILABLE" in out


def test_tls_needs_the_ca_and_the_certificates_name(start, pki):
    app, cfg = start(tls=pki)
    rc, out = probe(cfg)
    assert rc == 1 and "give --ca" in out
    rc, out = probe(cfg, "--ca", str(pki / "ca.crt"))          # the certificate does not name "localhost"
    assert rc == 1 and "UNAVAILABLE" in out
    assert app.load_models()
    assert probe(cfg, "--ca", str(pki / "ca.crt"), "--server-name", "shallowmark") == (0, "SERVING\n")
    # the image's fixed HEALTHCHECK gets the same from the environment
    env = {"SHALLOWMARK_HEALTH_CA": str(pki / "ca.crt"), "SHALLOWMARK_HEALTH_SERVER_NAME": "shallowmark"}
    assert probe(cfg, env=env) == (0, "SERVING\n")


def test_mutual_tls_needs_the_client_certificate(start, pki):
    _, cfg = start(tls=pki, client_ca=pki / "ca.crt")
    args = ["--ca", str(pki / "ca.crt"), "--server-name", "shallowmark", "--alive"]
    rc, out = probe(cfg, *args)
    assert rc == 1 and "UNAVAILABLE" in out
    client = ["--client-cert", str(pki / "client.crt"), "--client-key", str(pki / "client.key")]
    assert probe(cfg, *args, *client) == (0, "NOT_SERVING\n")
