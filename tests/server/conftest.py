"""A real gRPC server on a free localhost port, tiny-ldm with 10 DDIM steps, two tenants.

The backend is the session's ``tiny_ldm`` fixture (loaded once), handed to the server through its
``backend_loader`` hook; everything else (gRPC, auth, validation, ledger, signing) is the real thing.
"""

from __future__ import annotations

import pytest

TOKEN_A = "token-for-tenant-a"
TOKEN_B = "token-for-tenant-b"
STEPS = {m: {"num_steps": 10} for m in ("shallow-diffuse", "tree-ring", "ringid")}
STEPS["gaussian-shading"] = {"num_steps": 10}


def make_config(tmp_path, **kw):
    from shallowmark.server.config import ServerConfig, token_digest

    base = dict(host="127.0.0.1", port=0, tokens={TOKEN_A: "a", token_digest(TOKEN_B): "b"},
                state_dir=tmp_path, method_options=STEPS, max_message_bytes=4 * 1024 * 1024, grace_s=1.0,
                workers=4)
    base.update(kw)
    return ServerConfig(**base)


@pytest.fixture(scope="session", name="make_config")
def make_config_fixture():
    """``make_config(tmp_path, **overrides)``: the test server's ServerConfig."""
    return make_config


@pytest.fixture(scope="session")
def token_a():
    return TOKEN_A


@pytest.fixture(scope="session")
def loader(tiny_ldm):
    def load(name, **options):
        assert name == "tiny-ldm"
        return tiny_ldm

    return load


@pytest.fixture(scope="session")
def server(tmp_path_factory, loader):
    from shallowmark.server.app import ServerApp

    app = ServerApp(make_config(tmp_path_factory.mktemp("server")), backend_loader=loader).start()
    assert app.wait_until_ready(120)
    yield app
    app.stop(1.0)


@pytest.fixture(scope="session")
def client_a(server):
    from shallowmark.client import Client

    with Client(server.address, TOKEN_A, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def client_b(server):
    from shallowmark.client import Client

    with Client(server.address, TOKEN_B, timeout=120, retries=0) as c:
        yield c


@pytest.fixture(scope="session")
def keys():
    from shallowmark.keys import WatermarkKey

    # Fixed keys: a test run must not depend on the draw (a random draw made one round trip flaky).
    return [WatermarkKey.from_hex(f"{0xA11CE + i:064x}", label=f"k{i}") for i in range(3)]


@pytest.fixture(scope="session")
def embedded(client_a, keys):
    """One shallow-diffuse image generated for keys[0] by tenant a."""
    return client_a.embed(keys[0], method="shallow-diffuse", seed=7)
