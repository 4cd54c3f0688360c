#!/usr/bin/env python3
"""Generate the Python protobuf/gRPC stubs from proto/*.proto.

This is the only supported way to (re)generate the stubs checked in under
client/onnxgate_client/pb/:

    python proto/generate.py            # writes client/onnxgate_client/pb/
    python proto/generate.py --out DIR  # writes DIR (used by the staleness test)

It runs grpc_tools.protoc with ``-I proto`` and then post-processes the
output in two ways:

* The generated absolute imports between the stubs
  (``import model_config_pb2 as ...``) become package-relative
  (``from . import model_config_pb2 as ...``) so the modules work inside the
  ``onnxgate_client.pb`` package.
* The stubs register their descriptors in a private ``DescriptorPool`` (owned
  by ``model_config_pb2`` and shared by ``grpc_service_pb2``) instead of the
  process-wide default pool. tritonclient registers Triton's own
  ``grpc_service.proto`` / ``model_config.proto`` (same file names, same
  ``inference.*`` symbols, different contents) in the default pool, and the
  protobuf runtime refuses a second, different definition, so without this
  our stubs and ``tritonclient.grpc`` could not be imported in the same
  process. The wire format is unaffected. (Anything that looks descriptors up
  in the default pool, such as gRPC server reflection, must be handed
  ``DESCRIPTOR.pool`` explicitly.)

All paths are resolved relative to the repository root (the parent of this
file's directory), never the current working directory.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "proto"
DEFAULT_OUT = REPO_ROOT / "client" / "onnxgate_client" / "pb"

# .proto files compiled to messages (+ .pyi), and the subset that defines a
# gRPC service (only those get a *_pb2_grpc.py module).
MESSAGE_PROTOS = ("grpc_service.proto", "model_config.proto")
SERVICE_PROTOS = ("grpc_service.proto",)

# Sibling modules whose absolute imports must become package-relative.
_MODULES = tuple(Path(p).stem + "_pb2" for p in MESSAGE_PROTOS)
_IMPORT_RE = re.compile(
    r"^(?P<indent>[ \t]*)import (?P<mod>" + "|".join(_MODULES) + r") as ",
    re.MULTILINE,
)
_FROM_RE = re.compile(
    r"^(?P<indent>[ \t]*)from (?P<mod>" + "|".join(_MODULES) + r") import ",
    re.MULTILINE,
)


def expected_files() -> list[str]:
    """Names of every file this script writes into the output directory."""
    names: list[str] = []
    for proto in MESSAGE_PROTOS:
        stem = Path(proto).stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    for proto in SERVICE_PROTOS:
        names.append(f"{Path(proto).stem}_pb2_grpc.py")
    return sorted(names)


def _protoc(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "grpc_tools.protoc", "-I", "proto", *args]
    # cwd=REPO_ROOT makes "-I proto" and the proto/ file arguments
    # independent of where the script is invoked from.
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"protoc failed ({result.returncode}): {' '.join(cmd)}")


# The stub that owns the private descriptor pool: it must not import any
# sibling stub, and every other stub must (transitively) import it.
_POOL_OWNER = "model_config_pb2"
_DEFAULT_POOL_ADD = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
_POOL_MARK = "# onnxgate: private descriptor pool, see proto/generate.py\n"


def _make_imports_relative(text: str) -> str:
    text = _IMPORT_RE.sub(r"\g<indent>from . import \g<mod> as ", text)
    return _FROM_RE.sub(r"\g<indent>from .\g<mod> import ", text)


def _use_private_pool(name: str, text: str) -> str:
    """Register the file's descriptors in the shared private pool."""
    if text.count(_DEFAULT_POOL_ADD) != 1:
        raise SystemExit(f"{name}: cannot find the descriptor pool registration")
    module = name.removesuffix(".py")
    if module == _POOL_OWNER:
        pool = "_descriptor_pool.DescriptorPool()"
    else:
        # protoc aliases "x_pb2" as "x__pb2" ("_" doubled) in generated code.
        alias = _POOL_OWNER.replace("_", "__")
        if f"from . import {_POOL_OWNER} as {alias}\n" not in text:
            raise SystemExit(f"{name}: does not import {_POOL_OWNER}")
        pool = f"{alias}.DESCRIPTOR.pool"
    return text.replace(_DEFAULT_POOL_ADD, f"{_POOL_MARK}DESCRIPTOR = {pool}.AddSerializedFile(")


def _postprocess(path: Path) -> None:
    text = _make_imports_relative(path.read_text(encoding="utf-8"))
    if path.name.endswith("_pb2.py"):
        text = _use_private_pool(path.name, text)
    path.write_text(text, encoding="utf-8")


def generate(out_dir: Path) -> list[Path]:
    """Generate all stubs into ``out_dir`` and return the written paths."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxgate-protoc-") as tmp:
        staging = Path(tmp)
        _protoc(
            [
                f"--python_out={staging}",
                f"--pyi_out={staging}",
                *(f"proto/{p}" for p in MESSAGE_PROTOS),
            ]
        )
        _protoc(
            [
                f"--grpc_python_out={staging}",
                *(f"proto/{p}" for p in SERVICE_PROTOS),
            ]
        )
        produced = sorted(p.name for p in staging.iterdir())
        if produced != expected_files():
            raise SystemExit(f"unexpected protoc output {produced}, expected {expected_files()}")
        written = []
        for name in produced:
            _postprocess(staging / name)
            dest = out_dir / name
            shutil.copyfile(staging / name, dest)
            written.append(dest)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output directory (default: client/onnxgate_client/pb)",
    )
    args = parser.parse_args(argv)
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    for path in generate(out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
