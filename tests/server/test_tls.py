"""TLS and mutual TLS with certificates made in the test (cryptography x509)."""

from __future__ import annotations

import datetime as dt
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shallowmark.client import Client, ServerError

TOKEN = "token-for-tenant-a"


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer_name, issuer_key, pub, *, ca=False, san=None, usage=None):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name).public_key(pub)
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem_key(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_cert(c):
    return c.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", _name("test CA"), ca_key, ca_key.public_key(), ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    srv = _cert("localhost", ca.subject, ca_key, srv_key.public_key(),
                san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                usage=ExtendedKeyUsageOID.SERVER_AUTH)
    cli_key = ec.generate_private_key(ec.SECP256R1())
    cli = _cert("platform-backend", ca.subject, ca_key, cli_key.public_key(), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    files = {"ca": _pem_cert(ca), "srv.crt": _pem_cert(srv), "srv.key": _pem_key(srv_key),
             "cli.crt": _pem_cert(cli), "cli.key": _pem_key(cli_key)}
    for name, data in files.items():
        (d / name).write_bytes(data)
    return d


def _app(tmp_path, make_config, loader, pki, client_ca):
    from shallowmark.server.app import ServerApp
    from shallowmark.server.config import TLSConfig

    tls = TLSConfig(cert=pki / "srv.crt", key=pki / "srv.key", client_ca=pki / "ca" if client_ca else None)
    return ServerApp(make_config(tmp_path, tls=tls), backend_loader=loader).start(load_models=False)


def test_tls_server(tmp_path, make_config, loader, pki):
    app = _app(tmp_path, make_config, loader, pki, client_ca=False)
    try:
        addr = f"localhost:{app.port}"
        with Client(addr, TOKEN, root_certificates=pki / "ca", retries=0, timeout=10) as c:
            assert c.info().tenant == "a"
        with Client(addr, TOKEN, retries=0, timeout=3) as plain, pytest.raises(ServerError) as e:
            plain.info()  # plaintext client against a TLS port
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        app.stop(0)


def test_mutual_tls_requires_a_client_certificate(tmp_path, make_config, loader, pki):
    app = _app(tmp_path, make_config, loader, pki, client_ca=True)
    try:
        addr = f"localhost:{app.port}"
        with Client(addr, TOKEN, root_certificates=pki / "ca", client_cert=pki / "cli.crt",
                    client_key=pki / "cli.key", retries=0, timeout=10) as c:
            assert c.info().tenant == "a"
        with Client(addr, TOKEN, root_certificates=pki / "ca", retries=0, timeout=3) as anon:
            with pytest.raises(ServerError) as e:
                anon.info()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        app.stop(0)


def test_client_cert_without_key_is_refused():
    from shallowmark.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="both"):
        Client("localhost:1", client_cert=b"pem")
