"""``containerd-shim-bulkhead-v2`` and ``python -m bulkhead_shim``."""

from bulkhead_shim.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
