"""The committed stubs in sdk/_proto are what protos/generate.py makes from the .proto files."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("shallowmark_protos_generate", ROOT / "protos" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_stubs_match_the_proto():
    pytest.importorskip("grpc_tools", reason="needs grpcio-tools (the dev extra)")
    from importlib.metadata import version

    committed = (ROOT / "sdk/_proto/shallowmark/v1/watermark_pb2_grpc.py").read_text()
    made_with = re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", committed).group(1)
    if version("grpcio-tools") != made_with:
        pytest.skip(f"stubs were generated with grpcio-tools {made_with}; {version('grpcio-tools')} is installed")
    gen = _generator()
    stale = gen.stale_files()
    assert not stale, f"stale stubs {stale}: run `python protos/generate.py` and commit sdk/_proto"


def test_stub_imports_point_inside_the_package(tmp_path):
    pytest.importorskip("grpc_tools")
    files = _generator().generate(tmp_path)
    grpc_file = next(p for p in files if p.name == "watermark_pb2_grpc.py")
    text = grpc_file.read_text()
    assert "from shallowmark._proto.shallowmark.v1 import watermark_pb2" in text
    assert not re.search(r"^from shallowmark\.v1", text, re.M)
    for init in ("__init__.py", "shallowmark/__init__.py", "shallowmark/v1/__init__.py"):
        assert (tmp_path / init).exists()
