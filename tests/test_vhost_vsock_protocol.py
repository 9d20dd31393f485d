"""vhost-user message framing and payloads, and the virtio-vsock header."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from bulkhead.vhost_vsock import packets
from bulkhead.vhost_vsock import protocol as vu
from bulkhead.vhost_vsock.packets import HEADER_SIZE, Header, Op, PacketError
from bulkhead.vhost_vsock.qemu_args import device_args


def test_a_message_is_a_12_byte_header_and_its_payload() -> None:
    msg = vu.Message(vu.Request.SET_FEATURES, vu.VERSION | vu.FLAG_NEED_REPLY, vu.encode_u64(5))
    raw = msg.encode()
    assert raw[:12] == struct.pack("<III", 2, 0x9, 8)
    assert vu.decode_header(raw[:12]) == (2, 0x9, 8)
    assert msg.need_reply
    answer = vu.reply(msg, b"x")
    assert answer.flags == vu.VERSION | vu.FLAG_REPLY and answer.request == 2


def test_bad_headers_are_protocol_errors() -> None:
    with pytest.raises(vu.ProtocolError, match="version"):
        vu.decode_header(struct.pack("<III", 1, 0x2, 0))
    with pytest.raises(vu.ProtocolError, match="too big"):
        vu.decode_header(struct.pack("<III", 5, 0x1, 1 << 20))


def test_payload_structs_round_trip() -> None:
    addr = vu.VringAddr(1, 0, 0x1000, 0x3000, 0x2000, 0)
    assert vu.VringAddr.decode(addr.encode()) == addr
    assert len(addr.encode()) == 40
    state = vu.VringState(0, 256)
    assert vu.VringState.decode(state.encode()) == state
    regions = [vu.MemRegion(0, 0xA0000, 0x7F00_0000_0000, 0), vu.MemRegion(0x100000, 1, 2, 3)]
    table = vu.encode_mem_table(regions)
    assert len(table) == 8 + 2 * 32
    assert vu.decode_mem_table(table) == regions
    config = vu.ConfigSpace(0, 8, 0, b"\x2a" + bytes(7))
    assert vu.ConfigSpace.decode(config.encode()) == config
    assert vu.decode_u64(vu.encode_u64(2**64 - 1)) == 2**64 - 1


def test_short_or_oversized_payloads_are_refused() -> None:
    with pytest.raises(vu.ProtocolError):
        vu.decode_u64(b"\0" * 4)
    with pytest.raises(vu.ProtocolError):
        vu.VringAddr.decode(b"\0" * 39)
    with pytest.raises(vu.ProtocolError, match="regions"):
        vu.decode_mem_table(struct.pack("<II", 9, 0) + bytes(9 * 32))
    with pytest.raises(vu.ProtocolError):
        vu.decode_mem_table(struct.pack("<II", 2, 0) + bytes(32))  # says 2, carries 1


def test_receive_takes_descriptors_from_scm_rights() -> None:
    a, b = socket.socketpair()
    r, w = os.pipe()
    try:
        payload = vu.encode_u64(1)
        msg = vu.Message(vu.Request.SET_VRING_KICK, vu.VERSION, payload)
        socket.send_fds(a, [msg.encode()], [w])
        got = vu.receive(b)
        assert got is not None
        assert got.request == vu.Request.SET_VRING_KICK and got.payload == payload
        assert len(got.fds) == 1
        os.write(got.fds[0], b"!")  # the same pipe, our own descriptor for it
        assert os.read(r, 1) == b"!"
        os.close(got.fds[0])
        a.close()
        assert vu.receive(b) is None  # the front-end went away
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


def test_a_message_cut_short_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<III", 1, 1, 8) + b"1234")
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(vu.ProtocolError, match="inside a message"):
            vu.receive(b)


# --- the virtio-vsock header ----------------------------------------------------


def test_the_header_is_44_little_endian_bytes_in_spec_order() -> None:
    h = Header(2, 42, 1024, 5000, 3, packets.TYPE_STREAM, Op.RW, 0, 65536, 7)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE == 44
    assert raw[0:8] == (2).to_bytes(8, "little")  # src_cid
    assert raw[8:16] == (42).to_bytes(8, "little")  # dst_cid
    assert raw[24:28] == (3).to_bytes(4, "little")  # len
    assert raw[28:30] == (1).to_bytes(2, "little")  # type STREAM
    assert raw[30:32] == (5).to_bytes(2, "little")  # op RW
    assert raw[36:40] == (65536).to_bytes(4, "little")  # buf_alloc
    assert raw[40:44] == (7).to_bytes(4, "little")  # fwd_cnt
    assert Header.unpack(raw) == h
    pkt = packets.parse(raw + b"abc" + b"trailing bytes are ignored")
    assert pkt.header == h and pkt.payload == b"abc"


def test_bad_packets_are_refused() -> None:
    with pytest.raises(PacketError, match="shorter"):
        packets.parse(b"\0" * 43)
    h = Header(42, 2, 1, 1, 10, 1, Op.RW)
    with pytest.raises(PacketError, match="only 3 follow"):
        packets.parse(h.pack() + b"abc")
    huge = Header(42, 2, 1, 1, packets.MAX_PAYLOAD + 1, 1, Op.RW)
    with pytest.raises(PacketError, match="above"):
        packets.parse(huge.pack() + bytes(packets.MAX_PAYLOAD + 1))
    assert "op 99" in Header(42, 2, 1, 1, 0, 1, 99).describe()


def test_qemu_arguments_for_the_device() -> None:
    args = device_args("/run/x,y/vhost.sock")
    assert args == [
        "-chardev",
        "socket,id=bh-vsock,path=/run/x,,y/vhost.sock",
        "-device",
        "vhost-user-vsock-pci,chardev=bh-vsock",
    ]
    assert device_args("/s", machine="microvm")[-1].startswith("vhost-user-vsock-device,")


def test_build_command_adds_the_device_with_shared_memory() -> None:
    from pathlib import Path

    from bulkhead.qemu import QemuConfig, build_command

    cfg = QemuConfig(
        kernel=Path("/k"), initrd=Path("/i"), accel="tcg", shared_memory=True,
        vhost_user_vsock_socket=Path("/run/bh/vhost.sock"),
    )  # fmt: skip
    cmd = build_command(cfg, vhost_vsock=False)
    assert "memory-backend-memfd,id=ram,size=512M,share=on" in cmd
    assert (
        device_args("/run/bh/vhost.sock")
        == cmd[cmd.index("socket,id=bh-vsock,path=/run/bh/vhost.sock") - 1 :][:4]
    )
    # The backend replaces kernel vhost-vsock: a guest has one vsock transport.
    with_cid = QemuConfig.from_dict({**cfg.to_dict(), "vsock_cid": 9})
    assert with_cid.vhost_user_vsock_socket == Path("/run/bh/vhost.sock")  # survives state.json
    assert not any(
        "vhost-vsock-pci,guest-cid" in a for a in build_command(with_cid, vhost_vsock=True)
    )
    # Without shared RAM the backend could not map the rings.
    with pytest.raises(ValueError, match="shared_memory"):
        build_command(
            QemuConfig.from_dict({**cfg.to_dict(), "shared_memory": False}), vhost_vsock=False
        )
