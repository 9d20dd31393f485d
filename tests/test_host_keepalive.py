"""Keepalive on the host client's channel, against a real agent started natively.

A stream has no deadline, so a channel that goes silent (a hung guest, a broken vsock ring)
must be noticed by pinging: the stream then fails with ``Unavailable`` and the caller can
reattach. And the agent must bear those pings on a stream that carries nothing for a long
time, or it would cut off the very streams keepalive is for. Between client and agent runs a
relay, like the sandbox monitor's, that counts the client's HTTP/2 PING frames and can go
silent on command (it stops forwarding but keeps both sockets open).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_agent_support import Agent, short_tmpdir, start_agent, wait_for

from bulkhead.client import AgentClient
from bulkhead.errors import Unavailable

pytestmark = pytest.mark.timeout(120)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_PING, FLAG_ACK = 6, 1


class SilenceableRelay:
    """A unix-socket relay to ``target`` that counts PINGs and can stop forwarding."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path, self.target = path, target
        self.pings = 0
        self.silent = threading.Event()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            agent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            agent.connect(str(self.target))
            self._socks += [client, agent]
            threading.Thread(target=self._pump, args=(client, agent, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(agent, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        pending = bytearray()
        skip = len(PREFACE) if from_client else 0
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if from_client:
                pending += data
                if skip:
                    cut = min(skip, len(pending))
                    del pending[:cut]
                    skip -= cut
                # Frames: a 24-bit length, a type, flags, a stream id, then the payload.
                while len(pending) >= 9:
                    length = int.from_bytes(pending[:3], "big")
                    if len(pending) < 9 + length:
                        break
                    if pending[3] == FRAME_PING and not pending[4] & FLAG_ACK:
                        self.pings += 1
                    del pending[: 9 + length]
            if self.silent.is_set():
                self._closed.wait()  # like a hung guest: nothing goes through, nothing closes
                return
            try:
                dst.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for sock in self._socks:
            sock.close()


@pytest.fixture
def agent() -> Iterator[Agent]:
    with short_tmpdir() as workdir:
        agent = start_agent(workdir, tcp=False)
        yield agent
        agent.stop()


@pytest.fixture
def relay(agent: Agent) -> Iterator[SilenceableRelay]:
    relay = SilenceableRelay(agent.socket_path.parent / "relay.sock", agent.socket_path)
    yield relay
    relay.close()


def read_in_background(client: AgentClient) -> tuple[threading.Thread, list[object]]:
    """The event feed, read in a thread: nothing happens in this agent, so it stays quiet."""
    outcome: list[object] = []
    stream = client.events()

    def read() -> None:
        try:
            outcome.append(next(stream))
        except Exception as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader, outcome


def test_a_quiet_stream_is_pinged_and_the_agent_keeps_it_open(relay: SilenceableRelay) -> None:
    with AgentClient(relay.path, keepalive=0.2) as client:
        reader, outcome = read_in_background(client)
        # gRPC's default server answers the third early ping with GOAWAY (too_many_pings).
        wait_for(
            lambda: relay.pings >= 10 or not reader.is_alive(),
            30,
            "ten keepalive pings on a quiet stream",
        )
        assert reader.is_alive() and outcome == [], f"the stream ended: {outcome}"
        assert client.health(timeout=10) == "SERVING"  # and the channel is as good as new


def test_a_stream_on_a_channel_gone_silent_fails_within_two_keepalives(
    relay: SilenceableRelay,
) -> None:
    keepalive = 1.0
    with AgentClient(relay.path, keepalive=keepalive) as client:
        reader, outcome = read_in_background(client)
        wait_for(lambda: relay.pings >= 1, 30, "the stream's first ping")
        relay.silent.set()
        started = time.monotonic()
        reader.join(2 * keepalive + 15)
        elapsed = time.monotonic() - started
        assert not reader.is_alive(), "the stream on a silent channel never ended"
        assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
        # One interval to the next ping, one for its answer, and some slack for the timers.
        assert elapsed < 2 * keepalive + 5, f"took {elapsed:.1f}s"
