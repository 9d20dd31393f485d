"""Development-only TCP listener: anyone who can reach the port controls the guest."""

from __future__ import annotations

import asyncio
import socket

from bulkhead_agent.bridge.relay import Relays
from bulkhead_init.log import Logger


class TcpBridge:
    def __init__(self, port: int, socket_path: str, log: Logger) -> None:
        self.port = port
        self._log = log
        self._relays = Relays("tcp", socket_path, log)
        self._server: asyncio.Server | None = None

    async def start(self) -> bool:
        try:
            # Our own socket: asyncio would resolve host=None through getaddrinfo
            # on an executor thread that then stays around for good.
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(
                    ("", self.port), family=socket.AF_INET6, dualstack_ipv6=True
                )
            else:
                sock = socket.create_server(("", self.port))
            sock.setblocking(False)
            self._server = await asyncio.start_server(self._handle, sock=sock)
        except OSError as exc:
            self._log.error(f"tcp: cannot listen on port {self.port}: {exc}; tcp transport off")
            return False
        self._log.warning(
            f"tcp: listening on port {self.port} WITHOUT authentication (development only)"
        )
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._relays.serve(reader, writer, writer.get_extra_info("peername"))

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        self.stop_accepting()
        self._relays.close()
