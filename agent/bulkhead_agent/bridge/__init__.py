"""Transport bridges: every host connection becomes a new connection to the gRPC socket.

- ``relay``: the byte pump shared by the stream transports.
- ``vsock``: AF_VSOCK listener (production), host CID only.
- ``tcp``: TCP listener (development only).
- ``serial`` + ``mux_session``: the virtio-serial port speaking ``bulkhead_proto.mux``.
"""

from __future__ import annotations

from typing import Protocol


class Bridge(Protocol):
    def stop_accepting(self) -> None:
        """Take no new transport connections; relayed ones keep flowing."""

    def close(self) -> None:
        """End every relayed connection and release the transport."""
