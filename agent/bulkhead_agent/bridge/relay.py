"""Byte relay between a transport connection and a fresh gRPC-socket connection.

Each direction is a read/write/drain loop, so at most one chunk plus the
transport's write high-water mark is ever buffered per direction. EOF in one
direction is forwarded as a half-close; the relay ends when both directions
have ended, or at once when either side fails.
"""

from __future__ import annotations

import asyncio
import contextlib

from bulkhead_init.log import Logger

CHUNK = 64 * 1024


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
    else:
        writer.close()


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    """Pump bytes both ways between ``a`` and ``b`` until both directions end."""
    tasks = [asyncio.ensure_future(_pump(a[0], b[1])), asyncio.ensure_future(_pump(b[0], a[1]))]
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                break  # a reset or broken pipe: the other direction is meaningless now
    finally:
        for t in tasks:
            t.cancel()
        for _, writer in (a, b):
            writer.close()
        await asyncio.gather(*tasks, return_exceptions=True)


class Relays:
    """The relays of one listener, so that they can be ended together."""

    def __init__(self, name: str, socket_path: str, log: Logger) -> None:
        self.name = name
        self.socket_path = socket_path
        self.log = log
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: object
    ) -> None:
        """Relay one accepted connection (called from the listener's handler)."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                local = await asyncio.open_unix_connection(self.socket_path)
            except OSError as exc:
                self.log.error(f"{self.name}: cannot reach the gRPC socket for {peer}: {exc}")
                writer.close()
                return
            self.log.debug(f"{self.name}: connection from {peer}")
            with contextlib.suppress(ConnectionError, OSError):
                await relay((reader, writer), local)
            self.log.debug(f"{self.name}: connection from {peer} ended")
        finally:
            self._tasks.discard(task)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
