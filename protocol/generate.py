"""Regenerate (or, with --check, verify) the committed protobuf/gRPC code.

    python protocol/generate.py          # rewrite bulkhead_proto/v1/*_pb2*.py(i)
    python protocol/generate.py --check  # exit 1 if the committed code is stale

The generated files are committed so the guest image and the host client need
no protoc at run time; CI runs --check so a .proto edit cannot ship without them.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTOS = sorted((HERE / "bulkhead_proto").rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc  # dev-only dependency

    args = [
        "protoc",
        f"-I{HERE}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(HERE)) for p in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p for p in out_dir.rglob("*_pb2*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        stale = []
        for new in generate(out):
            rel = new.relative_to(out)
            old = HERE / rel
            if opts.check:
                if not old.exists() or not filecmp.cmp(old, new, shallow=False):
                    stale.append(str(rel))
            else:
                old.write_bytes(new.read_bytes())
                print(f"wrote {old.relative_to(HERE.parent)}")
        if stale:
            print("generated protocol code is stale: " + ", ".join(stale), file=sys.stderr)
            print("run: python protocol/generate.py", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
