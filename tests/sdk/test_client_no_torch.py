"""The client side of the SDK (client, attestation check, generated stubs) imports without torch."""

import subprocess
import sys


def test_client_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"  # any import fails
            "import shallowmark, shallowmark.client, shallowmark.attestation, shallowmark.cli\n"
            "from shallowmark._proto.shallowmark.v1 import watermark_pb2, watermark_pb2_grpc\n"
            "c = shallowmark.client.Client('127.0.0.1:1', token='t'); c.close()\n"
            "bad = {'torch', 'diffusers', 'shallowmark.core', 'shallowmark.server'} & {\n"
            "    m for m, v in sys.modules.items() if v is not None}\n"
            "sys.exit(f'imported {sorted(bad)}' if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
