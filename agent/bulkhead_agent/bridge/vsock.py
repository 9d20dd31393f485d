"""AF_VSOCK listener: the production transport. Only the host (CID 2) may connect.

Containers can reach vsock too (e.g. vsock loopback), so the peer CID is the
control channel's access check.
"""

from __future__ import annotations

import asyncio
import socket

from bulkhead_agent.bridge.relay import Relays
from bulkhead_init.log import Logger

VMADDR_CID_HOST = 2


def peer_allowed(peer: object) -> bool:
    """True if ``peer`` (a vsock ``(cid, port)`` address) is the host."""
    return isinstance(peer, tuple) and len(peer) == 2 and peer[0] == VMADDR_CID_HOST


class VsockBridge:
    def __init__(self, port: int, socket_path: str, log: Logger) -> None:
        self.port = port
        self._log = log
        self._relays = Relays("vsock", socket_path, log)
        self._server: asyncio.Server | None = None

    async def start(self) -> bool:
        family = getattr(socket, "AF_VSOCK", None)
        if family is None:
            self._log.warning("vsock: AF_VSOCK is not available; vsock transport off")
            return False
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._log.warning(f"vsock: cannot create a socket: {exc}; vsock transport off")
            return False
        try:
            # Without a vsock transport (no virtio-vsock device) bind fails: not fatal.
            sock.bind((socket.VMADDR_CID_ANY, self.port))
            sock.listen(64)
            sock.setblocking(False)
            self._server = await asyncio.start_server(self._handle, sock=sock)
        except OSError as exc:
            sock.close()
            self._log.warning(f"vsock: cannot listen on port {self.port}: {exc}; vsock off")
            return False
        self._log.info(f"vsock: listening on port {self.port}")
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if not peer_allowed(peer):
            cid = peer[0] if isinstance(peer, tuple) and peer else peer
            self._log.warning(f"refused vsock connection from cid {cid}")
            writer.transport.abort()
            return
        await self._relays.serve(reader, writer, peer)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        self.stop_accepting()
        self._relays.close()
