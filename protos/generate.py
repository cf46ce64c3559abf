"""Regenerate the Python gRPC stubs in ``sdk/_proto`` from ``protos/shallowmark/v1/*.proto``.

Run from the repository root after editing a ``.proto`` file, and commit the result::

    python protos/generate.py            # writes sdk/_proto
    python protos/generate.py --check    # exit 1 if the committed stubs are stale

It runs ``grpc_tools.protoc`` (the ``dev`` extra) with ``--python_out``, ``--pyi_out`` and
``--grpc_python_out``, then applies one post-processing step: protoc names imports after the
``.proto`` path (``from shallowmark.v1 import watermark_pb2``), but the stubs ship inside the SDK as
``shallowmark._proto.shallowmark.v1``, so those imports are rewritten to
``from shallowmark._proto.shallowmark.v1 import ...``. The descriptor names inside the stubs keep
the ``shallowmark/v1/...`` paths, so reflection and other languages see the normal proto layout.

``tests/sdk/test_proto_stubs.py`` calls :func:`generate` into a temporary folder and diffs it
against the committed stubs.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
STUBS = ROOT / "sdk" / "_proto"
#: Python package the stubs live in, relative to the proto package ``shallowmark.v1``.
IMPORT_PREFIX = "shallowmark._proto."

_INIT_DOC = '"""Generated gRPC stubs ({what}). Do not edit: run ``python protos/generate.py``."""\n'
_IMPORT = re.compile(r"^(from|import) (shallowmark\.v1)\b", re.MULTILINE)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """The ``.proto`` files to compile, relative to ``proto_root``, sorted."""
    return sorted(p.relative_to(proto_root) for p in (proto_root / "shallowmark").rglob("*.proto"))


def generate(out_dir: Path = STUBS, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile every proto under ``proto_root/shallowmark`` into ``out_dir``; return the files written.

    Raises:
        RuntimeError: protoc failed (its message is included) or grpcio-tools is missing.
    """
    try:
        import grpc_tools
        from grpc_tools import protoc
    except ImportError as e:  # pragma: no cover - dev extra missing
        raise RuntimeError("generating stubs needs grpcio-tools: pip install 'shallowmark[dev]'") from e

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p) for p in proto_files(proto_root)]
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {files} (see its message above)")

    written = []
    for path in sorted(out_dir.rglob("*.py")) + sorted(out_dir.rglob("*.pyi")):
        text = path.read_text()
        fixed = _IMPORT.sub(lambda m: f"{m.group(1)} {IMPORT_PREFIX}{m.group(2)}", text)
        if fixed != text:
            path.write_text(fixed)
        written.append(path)
    # Package markers so ``shallowmark._proto.shallowmark.v1`` imports as a regular package.
    for pkg, what in ((out_dir, "root"), (out_dir / "shallowmark", "shallowmark"),
                      (out_dir / "shallowmark" / "v1", "shallowmark.v1")):
        init = pkg / "__init__.py"
        init.write_text(_INIT_DOC.format(what=what))
        if init not in written:
            written.append(init)
    return sorted(written)


def stale_files(committed: Path = STUBS, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Relative paths whose committed stub differs from a fresh generation (or is missing/extra)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh, proto_root)
        names = {p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file()}
        have = {p.relative_to(committed).as_posix() for p in committed.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
        return sorted(n for n in names | have
                      if n not in names or n not in have
                      or not filecmp.cmp(fresh / n, committed / n, shallow=False))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if the stubs are stale")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: sdk/_proto/{name}")
        return 1 if stale else 0
    for path in generate():
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
