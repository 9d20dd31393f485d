"""Benchmark only: a byte source without gRPC, the baseline of ``bench/containers.py``.

Off unless the kernel command line says ``bulkhead.bench=1``. Then the agent listens on
``bench-raw.sock`` in its run directory (like the gRPC socket: 0600, in a directory no
container sees), and the serial bridge relays a host connection there instead of to the
gRPC server when the connection's first bytes are ``RAW_MAGIC``, which no HTTP/2 client
sends (they begin with ``PRI * HTTP/2.0``).

A client sends ``RAW_MAGIC``, a byte count and a newline; it gets that many zero bytes,
then EOF. They travel the same way container output does (unix socket, bridge, mux,
virtio-serial, the host's monitor and relay) but skip gRPC and the agent's stdio handling:
what is left is the channel itself. With vsock the agent also relays its vsock port + 1
(1025) here, for the host only, so that each transport has its raw baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from bulkhead_init.log import Logger

RAW_MAGIC = b"BULKHEAD-BENCH-RAW\n"
SOCKET_NAME = "bench-raw.sock"
MAX_BYTES = 1 << 40
_ZEROS = bytes(64 * 1024)


class RawSource:
    def __init__(self, run_dir: str, log: Logger) -> None:
        self.path = os.path.join(run_dir, SOCKET_NAME)
        self._log = log
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> bool:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by an agent that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)  # before listen(): until then nobody can connect
            sock.listen()
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        except OSError as exc:
            sock.close()
            self._log.error(f"bench: cannot listen on {self.path}: {exc}")
            return False
        self._log.warning(f"bench: raw byte source on {self.path} (bulkhead.bench=1)")
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            magic = await reader.readexactly(len(RAW_MAGIC))
            line = await reader.readline()
            count = int(line) if magic == RAW_MAGIC and line.strip().isdigit() else -1
            if not 0 <= count <= MAX_BYTES:
                self._log.warning("bench: bad raw request; closing")
                return
            view = memoryview(_ZEROS)
            while count > 0:
                n = min(count, len(_ZEROS))
                writer.write(view[:n])
                count -= n
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass  # the host went away: nothing to clean up but the socket
        finally:
            writer.close()

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    def close(self) -> None:
        self.stop_accepting()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
