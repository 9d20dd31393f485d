"""``python -m bulkhead.vhost_vsock --socket S --cid N --uds-path P``: run the backend.

The sockets exist once the process has logged "listening" (or, for a caller
that waits on the file system, once ``S`` exists): QEMU can be started then.
SIGTERM or SIGINT stops it, removing both sockets. SIGUSR1 logs each queue's state
(the ring in guest memory and the device's last pops and pushes).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .backend import Backend

log = logging.getLogger("bulkhead.vhost_vsock")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bulkhead.vhost_vsock",
        description="vhost-user-vsock backend with hybrid vsock unix sockets",
    )
    parser.add_argument("--socket", type=Path, required=True, help="vhost-user socket for QEMU")
    parser.add_argument("--cid", type=int, required=True, help="the guest's CID (3 or more)")
    parser.add_argument(
        "--uds-path",
        type=Path,
        required=True,
        help="hybrid vsock socket for host programs (CONNECT <port>); guest connections "
        "to host port N go to <uds-path>_N",
    )
    parser.add_argument("--buf-alloc", type=int, default=None, help="receive buffer per connection")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        backend = Backend(args.socket, args.cid, args.uds_path, buf_alloc=args.buf_alloc)
    except (OSError, ValueError) as exc:
        print(f"vhost_vsock: {exc}", file=sys.stderr)
        return 1

    def on_signal(signum: int, _frame: object) -> None:
        log.info("got %s: stopping", signal.Signals(signum).name)
        backend.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: backend.request_dump())
    signal.signal(signal.SIGINT, on_signal)
    log.info("listening: vhost-user %s, hybrid vsock %s, guest cid %d", args.socket,
             args.uds_path, args.cid)  # fmt: skip
    backend.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
