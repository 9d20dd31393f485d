"""The vsock stream state machine and its credit accounting, without sockets or rings."""

from __future__ import annotations

import pytest

from bulkhead.vhost_vsock import connections
from bulkhead.vhost_vsock.connections import FIRST_HOST_PORT, Connection, State, VsockMux
from bulkhead.vhost_vsock.packets import (
    HEADER_SIZE,
    HOST_CID,
    SHUTDOWN_BOTH,
    SHUTDOWN_SEND,
    TYPE_STREAM,
    Header,
    Op,
    Packet,
)

CID = 42
BUF = 4096  # our receive buffer per connection, small to make credit visible
BIG = 1 << 20  # an rx buffer that never limits a packet


def guest(op: Op, src_port: int, dst_port: int, payload: bytes = b"", **kw: int) -> Packet:
    """A packet from the guest (defaults: a generous, untouched receive buffer)."""
    fields = {"flags": 0, "buf_alloc": 1 << 18, "fwd_cnt": 0, "src_cid": CID, "type": TYPE_STREAM}
    fields.update(kw)
    header = Header(
        fields["src_cid"], HOST_CID, src_port, dst_port, len(payload), fields["type"], op,
        fields["flags"], fields["buf_alloc"], fields["fwd_cnt"],
    )  # fmt: skip
    return Packet(header, payload)


def drain(mux: VsockMux, capacity: int = BIG) -> list[Packet]:
    out = []
    while (pkt := mux.next_packet(capacity)) is not None:
        out.append(pkt)
    return out


def ops(pkts: list[Packet]) -> list[Op]:
    return [Op(p.header.op) for p in pkts]


@pytest.fixture
def mux() -> VsockMux:
    return VsockMux(CID, buf_alloc=BUF)


def host_established(mux: VsockMux, guest_port: int = 1024, **credit: int) -> Connection:
    conn = mux.host_connect(guest_port)
    drain(mux)
    mux.on_guest_packet(guest(Op.RESPONSE, guest_port, conn.host_port, **credit))
    mux.take_dirty()
    return conn


# --- setting up -------------------------------------------------------------------


def test_a_host_connect_is_a_request_then_an_ok_line(mux: VsockMux) -> None:
    conn = mux.host_connect(1024)
    assert conn.host_port == FIRST_HOST_PORT and conn.state is State.CONNECTING
    assert conn.host_read_budget() == 0  # nothing goes to the guest before its answer
    [req] = drain(mux)
    h = req.header
    assert (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (
        Op.REQUEST, HOST_CID, CID, FIRST_HOST_PORT, 1024,
    )  # fmt: skip
    assert h.type == TYPE_STREAM and h.buf_alloc == BUF and h.fwd_cnt == 0
    mux.on_guest_packet(guest(Op.RESPONSE, 1024, conn.host_port, buf_alloc=1000))
    assert conn.state is State.ESTABLISHED
    assert conn.greeting == f"OK {conn.host_port}\n".encode()
    assert conn in mux.take_dirty()
    assert conn.host_read_budget() == 1000


def test_a_refused_host_connect_closes_it(mux: VsockMux) -> None:
    conn = mux.host_connect(5555)
    drain(mux)
    mux.on_guest_packet(guest(Op.RST, 5555, conn.host_port))
    assert conn.closed and conn in mux.take_dirty()
    assert drain(mux) == []  # no RST in answer to an RST
    assert not mux.conns


def test_a_host_that_gives_up_while_connecting_resets_the_request(mux: VsockMux) -> None:
    conn = mux.host_connect(1024)
    mux.host_eof(conn)
    assert conn.closed
    # The REQUEST of the gone connection is not sent; its RST is (harmless if unseen).
    assert ops(drain(mux)) == [Op.RST]


def test_guest_connections_are_accepted_or_refused_by_the_host(mux: VsockMux) -> None:
    mux.on_guest_packet(guest(Op.REQUEST, 40000, 5000))
    [conn] = mux.take_dirty()
    assert conn.open_requested and not conn.from_host and conn.key == (5000, 40000)
    mux.guest_accepted(conn)
    assert mux.take_dirty() == [conn]
    [resp] = drain(mux)
    assert resp.header.op == Op.RESPONSE
    assert (resp.header.src_port, resp.header.dst_port) == (5000, 40000)

    mux.on_guest_packet(guest(Op.REQUEST, 40001, 5001))
    [other] = mux.take_dirty()
    mux.guest_refused(other)
    [rst] = drain(mux)
    assert rst.header.op == Op.RST and rst.header.dst_port == 40001
    assert other.closed and conn.state is State.ESTABLISHED


def test_ports_are_unique_among_many_connections(mux: VsockMux) -> None:
    conns = [mux.host_connect(1024) for _ in range(50)]
    assert len({c.host_port for c in conns}) == 50


def test_too_many_connections_are_refused(mux: VsockMux, monkeypatch) -> None:
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", 2)
    mux.host_connect(1)
    mux.host_connect(2)
    with pytest.raises(connections.MuxError):
        mux.host_connect(3)
    drain(mux)
    mux.on_guest_packet(guest(Op.REQUEST, 40000, 5000))
    assert ops(drain(mux)) == [Op.RST]


# --- credit -----------------------------------------------------------------------


def test_host_data_never_exceeds_the_guests_credit(mux: VsockMux) -> None:
    conn = host_established(mux, buf_alloc=1000)
    assert conn.host_read_budget() == 1000
    mux.host_data(conn, b"a" * 1000)
    assert conn.host_read_budget() == 0
    pkts = drain(mux, capacity=HEADER_SIZE + 300)  # like small guest rx buffers
    assert [len(p.payload) for p in pkts] == [300, 300, 300, 100]
    assert conn.tx_cnt == 1000 and conn.peer_credit() == 0
    # The guest's application reads 600 bytes; its next header says so.
    mux.on_guest_packet(guest(Op.CREDIT_UPDATE, 1024, conn.host_port, buf_alloc=1000, fwd_cnt=600))
    assert conn.peer_credit() == 600 and conn.host_read_budget() == 600
    assert conn in mux.take_dirty()  # so the backend reads the host socket again


def test_buffered_data_waits_for_credit(mux: VsockMux) -> None:
    conn = host_established(mux, buf_alloc=100)
    mux.host_data(conn, b"x" * 100)
    # The guest shrinks its buffer before we sent anything (SO_VM_SOCKETS_BUFFER_SIZE).
    mux.on_guest_packet(guest(Op.CREDIT_UPDATE, 1024, conn.host_port, buf_alloc=40))
    [pkt] = drain(mux)
    assert len(pkt.payload) == 40
    assert not mux.has_output()
    mux.on_guest_packet(guest(Op.CREDIT_UPDATE, 1024, conn.host_port, buf_alloc=40, fwd_cnt=40))
    assert mux.has_output()
    assert [len(p.payload) for p in drain(mux)] == [40]


def test_credit_survives_the_32_bit_counters_wrapping(mux: VsockMux) -> None:
    conn = host_established(mux, buf_alloc=1000)
    conn.tx_cnt = 0xFFFF_FF00
    mux.on_guest_packet(
        guest(Op.CREDIT_UPDATE, 1024, conn.host_port, buf_alloc=1000, fwd_cnt=0xFFFF_FF00)
    )
    mux.host_data(conn, b"y" * 1000)
    [pkt] = drain(mux)
    assert len(pkt.payload) == 1000 and conn.tx_cnt == 0x2E8  # wrapped
    assert conn.peer_credit() == 0
    mux.on_guest_packet(
        guest(Op.CREDIT_UPDATE, 1024, conn.host_port, buf_alloc=1000, fwd_cnt=0x2E8)
    )
    assert conn.peer_credit() == 1000


def test_a_bogus_fwd_cnt_gives_no_credit(mux: VsockMux) -> None:
    conn = host_established(mux, buf_alloc=1000)
    # fwd_cnt "ahead" of what we sent reads as a huge in-flight count, not extra credit.
    mux.on_guest_packet(guest(Op.CREDIT_UPDATE, 1024, conn.host_port, buf_alloc=1000, fwd_cnt=5))
    assert conn.peer_credit() == 0


def test_guest_data_is_limited_by_our_credit(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.on_guest_packet(guest(Op.RW, 1024, conn.host_port, b"z" * BUF))
    assert conn.to_host == b"z" * BUF and conn in mux.take_dirty()
    # One byte more than our buffer while the host has taken nothing: reset.
    mux.on_guest_packet(guest(Op.RW, 1024, conn.host_port, b"!"))
    assert conn.closed
    assert ops(drain(mux)) == [Op.RST]


def test_credit_updates_follow_what_the_host_consumed(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.on_guest_packet(guest(Op.RW, 1024, conn.host_port, b"q" * 2000))
    mux.host_delivered(conn, BUF // 4 - 1)
    assert drain(mux) == []  # not worth a packet yet
    mux.host_delivered(conn, 1)
    [update] = drain(mux)
    assert update.header.op == Op.CREDIT_UPDATE
    assert update.header.fwd_cnt == BUF // 4 and update.header.buf_alloc == BUF
    # Every packet carries the figures, so sending data counts as an update too.
    mux.host_delivered(conn, 100)
    mux.host_data(conn, b"r")
    [data] = drain(mux)
    assert data.header.fwd_cnt == BUF // 4 + 100
    assert conn.reported_fwd_cnt == conn.fwd_cnt


def test_a_credit_request_is_answered_once(mux: VsockMux) -> None:
    conn = host_established(mux)
    for _ in range(3):
        mux.on_guest_packet(guest(Op.CREDIT_REQUEST, 1024, conn.host_port))
    assert ops(drain(mux)) == [Op.CREDIT_UPDATE]


def test_connections_take_turns(mux: VsockMux) -> None:
    a = host_established(mux, 1024)
    b = host_established(mux, 1025)
    mux.host_data(a, b"a" * 300)
    mux.host_data(b, b"b" * 300)
    pkts = drain(mux, capacity=HEADER_SIZE + 100)
    assert [p.payload[:1] for p in pkts] == [b"a", b"b"] * 3


def test_control_packets_go_before_data(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.host_data(conn, b"data")
    mux.on_guest_packet(guest(Op.CREDIT_REQUEST, 1024, conn.host_port))
    assert ops(drain(mux)) == [Op.CREDIT_UPDATE, Op.RW]


def test_a_tiny_rx_buffer_gets_nothing() -> None:
    mux = VsockMux(CID)
    mux.host_connect(1)
    assert mux.next_packet(HEADER_SIZE - 1) is None
    assert mux.next_packet(HEADER_SIZE) is not None


# --- closing ----------------------------------------------------------------------


def test_host_eof_is_a_shutdown_after_the_data_then_the_guest_closes(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.host_data(conn, b"last words")
    mux.host_eof(conn)
    assert conn.host_read_budget() == 0
    pkts = drain(mux)
    assert ops(pkts) == [Op.RW, Op.SHUTDOWN]
    assert pkts[1].header.flags == SHUTDOWN_SEND
    # The guest's application closes: SHUTDOWN both ways; we answer RST and forget it.
    mux.on_guest_packet(guest(Op.SHUTDOWN, 1024, conn.host_port, flags=SHUTDOWN_BOTH))
    assert conn.closed and not mux.conns
    assert ops(drain(mux)) == [Op.RST]


def test_guest_shutdown_delivers_what_it_sent_first(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.on_guest_packet(guest(Op.RW, 1024, conn.host_port, b"bye"))
    mux.on_guest_packet(guest(Op.SHUTDOWN, 1024, conn.host_port, flags=SHUTDOWN_SEND))
    assert not conn.host_shutdown_due  # "bye" is still to be written
    mux.host_delivered(conn, 3)
    assert conn.host_shutdown_due
    mux.host_shut_down(conn)
    assert not conn.closed  # the host may still answer
    mux.host_data(conn, b"ok")
    mux.host_eof(conn)
    # With "ok" sent both directions are done: the RST ends the connection (the guest
    # still reads "ok", then EOF) and makes the SHUTDOWN that was due redundant.
    assert ops(drain(mux)) == [Op.RW, Op.RST]
    assert conn.closed


def test_guest_close_with_undelivered_data_waits_for_the_host(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.host_data(conn, b"never read")  # discarded: the guest takes no more
    mux.on_guest_packet(guest(Op.RW, 1024, conn.host_port, b"abc"))
    mux.on_guest_packet(guest(Op.SHUTDOWN, 1024, conn.host_port, flags=SHUTDOWN_BOTH))
    assert not conn.closed and conn.to_guest == b""
    mux.host_delivered(conn, 3)
    assert conn.closed
    assert ops(drain(mux)) == [Op.RST]


def test_a_guest_reset_ends_it_without_an_answer(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.on_guest_packet(guest(Op.RST, 1024, conn.host_port))
    assert conn.closed and drain(mux) == []


def test_a_host_failure_resets_the_guest_side(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.host_failed(conn, "broken pipe")
    assert conn.closed
    [rst] = drain(mux)
    assert rst.header.op == Op.RST and rst.header.dst_port == 1024


def test_reset_all_forgets_everything(mux: VsockMux) -> None:
    a = host_established(mux)
    b = mux.host_connect(7)
    mux.host_data(a, b"pending")
    mux.reset_all()
    assert a.closed and b.closed and not mux.conns
    assert drain(mux) == [] and not mux.has_output()
    assert set(mux.take_dirty()) >= {a, b}


# --- a guest breaking the protocol -------------------------------------------------


@pytest.mark.parametrize(
    "pkt",
    [
        guest(Op.RESPONSE, 1024, FIRST_HOST_PORT),  # answers a request it already answered
        guest(Op.REQUEST, 1024, FIRST_HOST_PORT),  # a second REQUEST
        guest(99, 1024, FIRST_HOST_PORT),  # type: ignore[arg-type]  # unknown op
        guest(Op.INVALID, 1024, FIRST_HOST_PORT),
        guest(Op.RW, 1024, FIRST_HOST_PORT, b"x", type=2),  # SEQPACKET: not negotiated
    ],
)
def test_protocol_violations_reset_the_connection(mux: VsockMux, pkt: Packet) -> None:
    conn = host_established(mux)
    assert conn.host_port == FIRST_HOST_PORT
    mux.on_guest_packet(pkt)
    assert conn.closed
    assert ops(drain(mux)) == [Op.RST]


def test_data_before_established_or_after_shutdown_resets(mux: VsockMux) -> None:
    conn = mux.host_connect(1024)
    drain(mux)
    mux.on_guest_packet(guest(Op.RW, 1024, conn.host_port, b"early"))
    assert conn.closed
    conn = host_established(mux, 1025)
    mux.on_guest_packet(guest(Op.SHUTDOWN, 1025, conn.host_port, flags=SHUTDOWN_SEND))
    mux.on_guest_packet(guest(Op.RW, 1025, conn.host_port, b"late"))
    assert conn.closed


def test_packets_for_unknown_connections_get_a_reset(mux: VsockMux) -> None:
    mux.on_guest_packet(guest(Op.RW, 33, 44, b"who?"))
    [rst] = drain(mux)
    h = rst.header
    assert (h.op, h.src_cid, h.dst_cid, h.src_port, h.dst_port) == (Op.RST, HOST_CID, CID, 44, 33)
    mux.on_guest_packet(guest(Op.RST, 33, 44))  # resets of unknown connections: ignored
    assert drain(mux) == []


def test_spoofed_source_cids_are_dropped_silently(mux: VsockMux) -> None:
    conn = host_established(mux)
    mux.on_guest_packet(guest(Op.RST, 1024, conn.host_port, src_cid=7))
    assert not conn.closed and drain(mux) == []
    assert mux.dropped_packets == 1


def test_a_flood_of_junk_queues_a_bounded_number_of_resets(mux: VsockMux) -> None:
    for port in range(5000):
        mux.on_guest_packet(guest(Op.RW, port, 1, b"x"))
    assert len(drain(mux)) == connections.MAX_ORPHAN_PACKETS
    # Once sent, there is room for answers again.
    mux.on_guest_packet(guest(Op.RW, 1, 1, b"x"))
    assert ops(drain(mux)) == [Op.RST]
