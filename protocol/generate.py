"""Regenerate (or, with --check, verify) the committed protobuf/gRPC code.

    python protocol/generate.py          # rewrite the generated *_pb2*.py(i)
    python protocol/generate.py --check  # exit 1 if the committed code is stale

Two sets are generated: the guest agent API (bulkhead_proto/v1, with gRPC stubs) and the
shim's copy of containerd's wire types (shim/bulkhead_shim/api, messages only: the shim
speaks ttrpc, not gRPC, so stubs would be dead code).

The generated files are committed so the guest image and the host client need
no protoc at run time; CI runs --check so a .proto edit cannot ship without them.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass(frozen=True)
class ProtoSet:
    root: Path  # the -I root; generated files land beside the .proto files under it
    package: str  # directory of the .proto files, relative to root
    grpc: bool
    # The shim's protos import google/protobuf/*.proto, which grpc_tools ships but does
    # not put on the include path when protoc.main is called directly.
    well_known: bool

    def protos(self) -> list[Path]:
        return sorted((self.root / self.package).rglob("*.proto"))


SETS = (
    ProtoSet(root=HERE, package="bulkhead_proto", grpc=True, well_known=False),
    ProtoSet(root=REPO / "shim", package="bulkhead_shim/api", grpc=False, well_known=True),
)


def generate(proto_set: ProtoSet, out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev-only dependency

    args = ["protoc", f"-I{proto_set.root}"]
    if proto_set.well_known:
        args.append(f"-I{Path(protoc.__file__).resolve().parent / '_proto'}")
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    if proto_set.grpc:
        args.append(f"--grpc_python_out={out_dir}")
    args += [str(p.relative_to(proto_set.root)) for p in proto_set.protos()]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out_dir.rglob("*_pb2*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    opts = parser.parse_args()
    stale = []
    for proto_set in SETS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            fresh = generate(proto_set, out)
            for new in fresh:
                rel = new.relative_to(out)
                old = proto_set.root / rel
                if opts.check:
                    if not old.exists() or not filecmp.cmp(old, new, shallow=False):
                        stale.append(str(old.relative_to(REPO)))
                else:
                    old.write_bytes(new.read_bytes())
                    print(f"wrote {old.relative_to(REPO)}")
            if opts.check:
                # A generated file whose .proto is gone is stale too.
                expected = {proto_set.root / new.relative_to(out) for new in fresh}
                committed = (proto_set.root / proto_set.package).rglob("*_pb2*")
                stale += [
                    str(p.relative_to(REPO))
                    for p in sorted(committed)
                    if p.suffix in (".py", ".pyi") and p not in expected
                ]
    if stale:
        print("generated protocol code is stale: " + ", ".join(stale), file=sys.stderr)
        print("run: python protocol/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
