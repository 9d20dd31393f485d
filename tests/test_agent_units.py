"""Unit tests of the agent's small pieces: settings, guest facts, peer checks, the mux session."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import pytest

from bulkhead_agent.bridge import serial as serial_mod
from bulkhead_agent.bridge.mux_session import MuxSession
from bulkhead_agent.bridge.vsock import VsockBridge, peer_allowed
from bulkhead_agent.services import guest_facts
from bulkhead_agent.settings import Settings, from_config
from bulkhead_init.cmdline import parse
from bulkhead_init.log import Logger
from bulkhead_proto import mux
from bulkhead_proto.mux import FrameType

QUIET = Logger("agent", "error", fd=os.open(os.devnull, os.O_WRONLY))


# -- settings ---------------------------------------------------------------


def test_settings_follow_the_kernel_command_line() -> None:
    config, _ = parse("bulkhead.vsock_port=2000 bulkhead.serial_port=off bulkhead.tcp_port=5")
    settings, warnings = from_config(config, env={})
    assert warnings == []
    assert settings == Settings(vsock_port=2000, serial_port="", tcp_port=5)
    assert settings.socket_path == "/run/bulkhead/agent.sock"


def test_environment_overrides_and_bad_values() -> None:
    config, _ = parse("bulkhead.log=warning")
    env = {
        "BULKHEAD_RUN_DIR": "/tmp/x",
        "BULKHEAD_VSOCK_PORT": "0",
        "BULKHEAD_SERIAL_PORT": "my.port",
        "BULKHEAD_SERIAL_DEVICE": "/tmp/x/serial.sock",
        "BULKHEAD_TCP_PORT": "70000",
        "BULKHEAD_LOG": "DEBUG",
        "BULKHEAD_INIT_PID": "abc",
    }
    settings, warnings = from_config(config, env=env)
    assert settings.run_dir == "/tmp/x"
    assert settings.vsock_port == 0
    assert settings.serial_port == "my.port"
    assert settings.serial_device == "/tmp/x/serial.sock"
    assert settings.tcp_port == 0  # 70000 is out of range: the default stays
    assert settings.log == "debug"
    assert settings.init_pid == 1
    assert any("BULKHEAD_TCP_PORT" in w for w in warnings)
    assert any("BULKHEAD_INIT_PID" in w for w in warnings)


# -- guest facts ------------------------------------------------------------


def test_cgroup_version(tmp_path: Path) -> None:
    assert guest_facts.cgroup_version(str(tmp_path / "missing")) == 0
    (tmp_path / "unified").mkdir()
    assert guest_facts.cgroup_version(str(tmp_path)) == 0  # a hybrid's v2 mount alone
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "tasks").write_text("")
    assert guest_facts.cgroup_version(str(tmp_path)) == 1
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert guest_facts.cgroup_version(str(tmp_path)) == 2


def test_meminfo_and_uptime(tmp_path: Path) -> None:
    (tmp_path / "meminfo").write_text("MemTotal:       2048 kB\nMemFree: 1 kB\n")
    assert guest_facts.memory_total_bytes(str(tmp_path / "meminfo")) == 2048 * 1024
    assert guest_facts.memory_total_bytes(str(tmp_path / "nope")) == 0
    assert guest_facts.uptime_seconds() > 0


def test_init_version_from_the_manifest(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    assert guest_facts.init_version("0.1.0", str(manifest)) == "0.1.0"
    manifest.write_text('{"packages": {"bulkhead": "0.2.0"}}')
    assert guest_facts.init_version("0.1.0", str(manifest)) == "0.2.0"
    manifest.write_text('{"init_version": "0.3.0", "packages": {"bulkhead": "0.2.0"}}')
    assert guest_facts.init_version("0.1.0", str(manifest)) == "0.3.0"
    manifest.write_text("not json")
    assert guest_facts.init_version("0.1.0", str(manifest)) == "0.1.0"


def test_process_memory_of_this_process() -> None:
    figures = guest_facts.process_memory(os.getpid())
    assert figures is not None
    rss, uss, pss, threads = figures
    assert 0 < uss <= rss and pss > 0 and threads >= 1
    assert guest_facts.process_memory(2**22 + 1) is None


def test_env_helpers() -> None:
    env = {"MS": "12.5", "BAD": "x", "N": "4", "L": "a, b,,c"}
    assert guest_facts.env_ms(env, "MS") == 12.5
    assert guest_facts.env_ms(env, "BAD") == 0.0
    assert guest_facts.env_count(env, "N") == 4
    assert guest_facts.env_count(env, "missing") == 0
    assert guest_facts.env_list(env, "L") == ["a", "b", "c"]


# -- transports -------------------------------------------------------------


def test_only_the_host_cid_may_use_vsock() -> None:
    assert peer_allowed((2, 1234))
    assert not peer_allowed((3, 1234))  # another guest, or a container over loopback
    assert not peer_allowed((1, 1234))  # VMADDR_CID_LOCAL
    assert not peer_allowed(None)


def test_vsock_listener_starts_or_is_skipped() -> None:
    # Natively there may be no vsock transport: either way, no exception.
    async def scenario() -> None:
        bridge = VsockBridge(0xB0B0, "/nonexistent/agent.sock", QUIET)
        started = await bridge.start()
        assert started in (True, False)
        bridge.close()

    asyncio.run(scenario())


def test_find_port_by_name(tmp_path: Path) -> None:
    for dev, name in (("vport0p1", "org.qemu.guest_agent.0"), ("vport1p2", "bulkhead.agent")):
        (tmp_path / dev).mkdir()
        (tmp_path / dev / "name").write_text(name + "\n")
    assert serial_mod.find_port("bulkhead.agent", str(tmp_path)) == "/dev/vport1p2"
    assert serial_mod.find_port("other", str(tmp_path)) is None


class FakePort:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.discarded = 0

    def send(self, frame: bytes) -> None:
        self.sent.append(frame)

    def discard_output(self) -> None:
        self.discarded += 1

    def frames(self) -> list[mux.Frame]:
        return mux.Parser().feed(b"".join(self.sent))


def test_session_resyncs_on_a_hello_split_across_reads() -> None:
    async def scenario() -> None:
        port = FakePort()
        session = MuxSession(port, "/nonexistent/agent.sock", QUIET)
        session.begin()
        wire = b"\xb7\xff" + b"junk" * 5 + mux.hello(7) + mux.encode(FrameType.DATA, 9, b"x")
        for i in range(0, len(wire), 3):  # garbage and HELLO cut at odd places
            session.feed(wire[i : i + 3])
        frames = port.frames()
        # Our announcement, a new session after the garbage, our answer to the
        # host's HELLO (in that new session), and CLOSE for the unknown conn 9.
        assert [(f.type, f.conn) for f in frames] == [
            (FrameType.HELLO, 0),
            (FrameType.HELLO, 0),
            (FrameType.HELLO, 0),
            (FrameType.CLOSE, 9),
        ]
        sessions = [mux.hello_session(f) for f in frames[:3]]
        assert sessions[0] != sessions[1] == sessions[2] == session.session_id

    asyncio.run(scenario())


def test_session_ignores_a_bad_hello_and_closes_what_it_cannot_connect() -> None:
    async def scenario() -> None:
        port = FakePort()
        session = MuxSession(port, "/nonexistent/agent.sock", QUIET)
        session.feed(mux.encode(FrameType.HELLO, 0, b"\x02\0\0\0\1"))  # mux version 2
        assert port.sent == []
        session.feed(mux.encode(FrameType.OPEN, 4))
        await asyncio.sleep(0.05)  # the connect to a missing socket fails: CLOSE
        assert [(f.type, f.conn) for f in port.frames()] == [(FrameType.CLOSE, 4)]
        assert session.open_connections == 0

    asyncio.run(scenario())


def test_session_closes_connections_that_break_the_rules(tmp_path: Path) -> None:
    async def scenario() -> None:
        path = str(tmp_path / "s.sock")
        server = await asyncio.start_unix_server(lambda r, w: asyncio.sleep(5), path)
        port = FakePort()
        session = MuxSession(port, path, QUIET)
        session.feed(mux.encode(FrameType.OPEN, 1))
        session.feed(mux.encode(FrameType.OPEN, 2))
        # conn 1: one byte more than the window before any credit came back.
        for frame in mux.encode_data(1, b"z" * (mux.WINDOW + 1)):
            session.feed(frame)
        # conn 2: a CREDIT frame of the wrong size.
        session.feed(mux.encode(FrameType.CREDIT, 2, b"\1"))
        assert [(f.type, f.conn) for f in port.frames()] == [
            (FrameType.CLOSE, 1),
            (FrameType.CLOSE, 2),
        ]
        assert session.open_connections == 0
        server.close()

    asyncio.run(scenario())


def test_device_hangup_backs_off_on_the_same_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device whose host is away reads 0 forever: it must be polled on a timer."""

    async def scenario() -> None:
        ours, theirs = socket.socketpair()
        theirs.shutdown(socket.SHUT_WR)  # our reads now return 0 at once, like the port
        fd = ours.detach()  # the bridge owns and closes it
        bridge = serial_mod.SerialBridge("/dev/fake-vport", "/nonexistent/agent.sock", QUIET)
        opens = []

        def fake_open() -> None:
            opens.append(1)
            bridge._fd = fd  # a "device": no _sock, so the fd is kept open

        reads = []
        real_read = os.read

        def counting_read(fd: int, n: int) -> bytes:
            reads.append(fd)
            return real_read(fd, n)

        monkeypatch.setattr(bridge, "_open", fake_open)
        monkeypatch.setattr(serial_mod.os, "read", counting_read)
        bridge.start()
        await asyncio.sleep(1.0)
        bridge.close()
        theirs.close()
        assert opens == [1]
        # 10, 20, 40, 80, 160, then 200 ms apart: about 9 reads in a second, not thousands.
        assert 5 <= len(reads) <= 12, len(reads)

    asyncio.run(scenario())
