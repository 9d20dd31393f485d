"""``python -m bulkhead_image [--force] [--cache-dir D] [--variant V]``: build the guest image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import build_image
from .variants import VARIANTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulkhead_image", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cache-dir", type=Path, help="default: $BULKHEAD_CACHE_DIR")
    parser.add_argument(
        "--variant", choices=list(VARIANTS), default="default", help="default: default"
    )
    args = parser.parse_args(argv)
    info = build_image(
        args.cache_dir,
        force=args.force,
        variant=args.variant,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    print(info.path)
    print(f"initramfs {info.initramfs.stat().st_size / 1e6:.1f} MB")
    print(f"kernel {info.manifest['kernel_release']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
