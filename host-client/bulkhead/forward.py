"""One guest connection relayed to a host TCP service: ``python -m bulkhead.forward HOST PORT``.

QEMU's user-mode network runs this for every connection the guest makes to a ``guestfwd``
address (see ``nics``), with the connection as its stdin and stdout. It connects to
``HOST:PORT`` and copies both ways until both directions are done, passing each end's EOF
on as a half-close. Nothing may be written to stderr: it is the same connection.
"""

from __future__ import annotations

import selectors
import socket
import sys

CHUNK = 65536


def relay(guest: socket.socket, host: socket.socket) -> None:
    selector = selectors.DefaultSelector()
    peers = {guest: host, host: guest}
    for sock in peers:
        selector.register(sock, selectors.EVENT_READ)
    open_ends = 2
    while open_ends:
        for key, _ in selector.select():
            source: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = source.recv(CHUNK)
            except ConnectionError:
                data = b""
            target = peers[source]
            if data:
                try:
                    target.sendall(data)
                    continue
                except OSError:
                    return  # the other end is gone: nothing more can be delivered
            selector.unregister(source)
            open_ends -= 1
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        return 2
    host, port = argv[0], int(argv[1])
    guest = socket.socket(fileno=0)  # stdin and stdout: the same socket
    try:
        upstream = socket.create_connection((host, port), timeout=10)
    except OSError:
        return 1  # the guest sees its connection closed
    upstream.settimeout(None)
    with upstream:
        relay(guest, upstream)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
