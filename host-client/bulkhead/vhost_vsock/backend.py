"""The backend: one thread, one selector, vhost-user on one side and host sockets on the other.

Everything happens on the thread that runs ``serve_forever``: front-end
messages, queue kicks (eventfds), the hybrid-vsock listener and every host
connection. Each round of the loop handles the ready descriptors, then lets
the connections that changed act on their host sockets (``_settle``) and
fills the guest's rx queue while there is something to send and a buffer to
put it in. Nothing polls: the loop sleeps in ``select`` until a descriptor is
ready, except when a queue still had work after a bounded batch (then the
next round does not wait) or a CONNECT line is overdue.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import protocol as vu
from .connections import Connection, MuxError, State, VsockMux
from .memory import GuestMemory, GuestMemoryError, close_fds
from .packets import HEADER_SIZE, MAX_PAYLOAD, PacketError, parse
from .virtqueue import ChainError, QueueError, Virtqueue

log = logging.getLogger(__name__)

RX_QUEUE, TX_QUEUE, EVENT_QUEUE = 0, 1, 2
NUM_QUEUES = 3
FEATURES = vu.VIRTIO_F_VERSION_1 | vu.VHOST_USER_F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = vu.PROTOCOL_F_CONFIG | vu.PROTOCOL_F_REPLY_ACK
MAX_CONFIG_SIZE = 256  # the largest config read the spec allows
MAX_MEM_SLOTS = 8

# How long a host client may take to send its CONNECT line, and how long it may be.
CONNECT_LINE_TIMEOUT = 10.0
MAX_CONNECT_LINE = 64
MAX_PENDING_LINES = 128
# What a host client may send after its CONNECT line before the guest has answered.
MAX_EARLY = 64 * 1024
# Front-end messages come whole; a peer that stalls inside one is broken.
FRONTEND_TIMEOUT = 5.0
_READ_CHUNK = 64 * 1024


@dataclass(eq=False)
class Vring:
    index: int
    num: int = 0
    base: int = 0
    addr: vu.VringAddr | None = None
    kick: int | None = None
    call: int | None = None
    enabled: bool = False
    queue: Virtqueue | None = None
    broken: bool = False  # a QueueError: not touched again until reconfigured

    def close(self) -> None:
        for fd in (self.kick, self.call):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.kick = self.call = None
        self.queue = None


@dataclass(eq=False)
class HostSocket:
    """A host-side unix connection: first its CONNECT line, then a vsock connection's bytes."""

    sock: socket.socket
    conn: Connection | None = None
    line: bytearray = field(default_factory=bytearray)
    deadline: float = 0.0
    early: bytes = b""  # bytes that came after the CONNECT line
    mask: int = 0


class Backend:
    """A vhost-user-vsock device for guest ``cid``.

    ``socket_path`` is where QEMU's chardev connects; ``uds_path`` is the
    hybrid-vsock socket for host programs (and the prefix of the
    ``<uds_path>_<port>`` sockets guest connections go to). Both sockets are
    created (mode 0600) here, so QEMU can be started once this returns.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        cid: int,
        uds_path: str | os.PathLike[str],
        *,
        buf_alloc: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cid < 3 or cid >= 0xFFFFFFFF:
            raise ValueError(f"guest CID must be 3..{0xFFFFFFFF - 1}, not {cid}")
        self.socket_path = Path(socket_path)
        self.uds_path = Path(uds_path)
        self.cid = cid
        self.clock = clock
        self.mux = VsockMux(cid) if buf_alloc is None else VsockMux(cid, buf_alloc=buf_alloc)
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self.frontend: socket.socket | None = None
        self.memory: GuestMemory | None = None
        self.features = 0
        self.protocol_features = 0
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        self._again: set[int] = set()  # queues with work left after a batch
        self._dump_asked = False
        self._hosts: dict[Connection, HostSocket] = {}
        self._lines: dict[socket.socket, HostSocket] = {}
        self._masks: dict[object, int] = {}
        self._vu_listener = _listen(self.socket_path)
        try:
            self._uds_listener = _listen(self.uds_path)
        except BaseException:
            self._vu_listener.close()
            raise
        self._watch(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._watch(self._vu_listener, selectors.EVENT_READ, ("vu-listen", None))
        self._watch(self._uds_listener, selectors.EVENT_READ, ("uds-listen", None))

    def __repr__(self) -> str:
        return f"Backend(cid={self.cid}, socket={str(self.socket_path)!r})"

    # -- life cycle --

    def serve_forever(self) -> None:
        """Run the loop until ``stop()``; then release everything."""
        try:
            while not self._stopping:
                timeout = self._timeout()
                for key, events in self.sel.select(timeout):
                    try:
                        self._dispatch(key, events)
                    except Exception:
                        # A bug, not input we expected to refuse: log it, keep serving
                        # the other connections rather than take the guest's vsock down.
                        log.exception("unexpected error handling %s", key.data[0])
                if self._dump_asked:
                    self._dump_asked = False
                    self._dump()
                self._expire_lines()
                for index in sorted(self._again):
                    self._again.discard(index)
                    self._process(index)
                self._settle()
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask ``serve_forever`` to return (safe from any thread or a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def request_dump(self) -> None:
        """Have the loop log each queue's state and recent history (safe from a signal handler)."""
        self._dump_asked = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _dump(self) -> None:
        for vring in self.vrings:
            if vring.queue is None:
                log.info("queue %d: not running%s", vring.index, " (broken)" * vring.broken)
                continue
            try:
                log.info("%s", vring.queue.dump())
            except GuestMemoryError as exc:
                log.info("queue %d: cannot read it: %s", vring.index, exc)

    def _timeout(self) -> float | None:
        if self._again:
            return 0
        if self._lines:
            soonest = min(h.deadline for h in self._lines.values())
            return max(0.0, soonest - self.clock())
        return None

    def _shutdown(self) -> None:
        self._drop_frontend("backend stopping")
        for host in list(self._lines.values()):
            host.sock.close()
        self._lines.clear()
        for listener, path in (
            (self._vu_listener, self.socket_path),
            (self._uds_listener, self.uds_path),
        ):
            listener.close()
            with contextlib.suppress(OSError):
                path.unlink()
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- selector bookkeeping --

    def _watch(self, fileobj: object, mask: int, data: tuple[str, object]) -> None:
        old = self._masks.get(fileobj, 0)
        if mask == old:
            return
        if mask == 0:
            self._unwatch(fileobj)
        elif old == 0:
            self.sel.register(fileobj, mask, data)  # type: ignore[arg-type]
            self._masks[fileobj] = mask
        else:
            self.sel.modify(fileobj, mask, data)  # type: ignore[arg-type]
            self._masks[fileobj] = mask

    def _unwatch(self, fileobj: object) -> None:
        if self._masks.pop(fileobj, 0):
            self.sel.unregister(fileobj)  # type: ignore[arg-type]

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        kind, obj = key.data
        if kind == "wake":
            with contextlib.suppress(BlockingIOError):
                while self._wake_r.recv(4096):
                    pass
        elif kind == "vu-listen":
            self._accept_frontend()
        elif kind == "frontend":
            self._frontend_readable()
        elif kind == "kick":
            self._kicked(obj)  # type: ignore[arg-type]
        elif kind == "uds-listen":
            self._accept_host()
        elif kind == "line":
            self._read_line(obj)  # type: ignore[arg-type]
        elif kind == "host":
            self._host_ready(obj, events)  # type: ignore[arg-type]

    # -- the front-end (QEMU) --

    def _accept_frontend(self) -> None:
        try:
            sock, _ = self._vu_listener.accept()
        except OSError:
            return
        if self.frontend is not None:
            log.error("a second vhost-user front-end connected; refusing it")
            sock.close()
            return
        sock.settimeout(FRONTEND_TIMEOUT)
        self.frontend = sock
        self._watch(sock, selectors.EVENT_READ, ("frontend", None))
        log.info("vhost-user front-end connected")

    def _frontend_readable(self) -> None:
        assert self.frontend is not None
        try:
            msg = vu.receive(self.frontend)
        except (vu.ProtocolError, OSError) as exc:
            self._drop_frontend(f"bad message from the front-end: {exc}")
            return
        if msg is None:
            self._drop_frontend("the front-end closed the connection")
            return
        try:
            self._handle(msg)
        except OSError as exc:
            self._drop_frontend(f"cannot answer the front-end: {exc}")
        finally:
            close_fds(msg.fds)  # handlers take the ones they keep out of the list

    def _drop_frontend(self, reason: str) -> None:
        if self.frontend is not None:
            log.info("vhost-user front-end gone: %s", reason)
            self._unwatch(self.frontend)
            self.frontend.close()
            self.frontend = None
        for vring in self.vrings:
            self._stop_vring(vring)
            vring.close()
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        self._reset_connections()
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        self.features = self.protocol_features = 0

    def _send(self, msg: vu.Message) -> None:
        assert self.frontend is not None
        self.frontend.sendall(msg.encode())

    def _handle(self, msg: vu.Message) -> None:
        handler = self._HANDLERS.get(msg.request)
        if handler is None:
            log.error("unsupported vhost-user %s: ignored", msg.describe())
            ok, answer = False, None
        else:
            try:
                ok, answer = handler(self, msg)
            except (vu.ProtocolError, GuestMemoryError, QueueError, ValueError) as exc:
                log.error("vhost-user %s failed: %s", msg.describe(), exc)
                ok, answer = False, None
        if answer is not None:
            self._send(vu.reply(msg, answer))
        elif msg.need_reply:
            # REPLY_ACK: zero for success, anything else for failure.
            self._send(vu.reply(msg, vu.encode_u64(0 if ok else 1)))

    # Each handler returns (success, reply payload or None).

    def _get_features(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        return True, vu.encode_u64(FEATURES)

    def _set_features(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        features = vu.decode_u64(msg.payload)
        if features & ~FEATURES:
            log.error("front-end acked features we did not offer: %#x", features & ~FEATURES)
            return False, None
        self.features = features
        if not features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            # Without protocol features there is no SET_VRING_ENABLE: rings are enabled.
            for vring in self.vrings:
                vring.enabled = True
        return True, None

    def _get_protocol_features(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        return True, vu.encode_u64(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        features = vu.decode_u64(msg.payload)
        self.protocol_features = features & PROTOCOL_FEATURES
        if features & ~PROTOCOL_FEATURES:
            log.warning("front-end set protocol features we lack: %#x", features)
        return True, None

    def _set_owner(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        return True, None

    def _reset_owner(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        for vring in self.vrings:
            self._stop_vring(vring)
            vring.close()
        self.vrings = [Vring(i) for i in range(NUM_QUEUES)]
        self._reset_connections()
        self.features = 0
        return True, None

    def _set_mem_table(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        table = vu.decode_mem_table(msg.payload)
        memory = GuestMemory.map(table, msg.fds)
        old, self.memory = self.memory, memory
        log.info("guest memory: %s", memory.describe())
        for vring in self.vrings:
            if vring.queue is not None:
                # The rings stay where they were in guest-physical terms, but
                # must be read through the new mappings.
                self._build_queue(vring, keep=vring.queue)
        if old is not None:
            old.close()
        return True, None

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < NUM_QUEUES:
            raise ValueError(f"no queue {index}")
        return self.vrings[index]

    def _set_vring_num(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        state = vu.VringState.decode(msg.payload)
        self._vring(state.index).num = state.num
        return True, None

    def _set_vring_addr(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        addr = vu.VringAddr.decode(msg.payload)
        vring = self._vring(addr.index)
        vring.addr = addr
        vring.broken = False
        if vring.kick is not None:
            self._build_queue(vring, keep=vring.queue)
        return True, None

    def _set_vring_base(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        state = vu.VringState.decode(msg.payload)
        self._vring(state.index).base = state.num & 0xFFFF
        return True, None

    def _get_vring_base(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        state = vu.VringState.decode(msg.payload)
        vring = self._vring(state.index)
        if vring.queue is not None:
            vring.base = vring.queue.last_avail_idx
        log.info("queue %d stopped at available index %d", vring.index, vring.base)
        self._stop_vring(vring)
        if vring.index in (RX_QUEUE, TX_QUEUE):
            # The device is stopping (guest reset, VM stop): its connections are over.
            self._reset_connections()
        return True, vu.VringState(vring.index, vring.base).encode()

    def _take_fd(self, msg: vu.Message) -> tuple[Vring, int | None]:
        value = vu.decode_u64(msg.payload)
        vring = self._vring(value & vu.VRING_INDEX_MASK)
        if value & vu.VRING_NOFD_MASK:
            return vring, None
        if len(msg.fds) != 1:
            raise vu.ProtocolError(f"expected one descriptor, got {len(msg.fds)}")
        return vring, msg.fds.pop()

    def _set_vring_kick(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        vring, fd = self._take_fd(msg)
        self._stop_vring(vring)
        vring.kick = fd
        if fd is None:
            return True, None  # polling without kicks is not supported: the ring stays stopped
        os.set_blocking(fd, False)
        self._watch(fd, selectors.EVENT_READ, ("kick", vring.index))
        self._build_queue(vring)
        self._again.add(vring.index)  # buffers may be there already
        return True, None

    def _set_vring_call(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        vring, fd = self._take_fd(msg)
        if vring.call is not None:
            with contextlib.suppress(OSError):
                os.close(vring.call)
        vring.call = fd
        return True, None

    def _set_vring_err(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        # We never report ring errors through it (they are logged); just take it.
        _, fd = self._take_fd(msg)
        if fd is not None:
            os.close(fd)
        return True, None

    def _set_vring_enable(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        state = vu.VringState.decode(msg.payload)
        vring = self._vring(state.index)
        vring.enabled = bool(state.num)
        if vring.enabled:
            self._again.add(vring.index)
        return True, None

    def _get_queue_num(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        return True, vu.encode_u64(NUM_QUEUES)

    def _get_config(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        req = vu.ConfigSpace.decode(msg.payload)
        if req.size > MAX_CONFIG_SIZE or req.offset > MAX_CONFIG_SIZE - req.size:
            log.error("config read of %d bytes at %d is out of range", req.size, req.offset)
            return False, vu.ConfigSpace(req.offset, 0, req.flags).encode()
        # virtio-vsock's configuration is the guest CID (le64); the rest reads as zero.
        space = self.cid.to_bytes(8, "little").ljust(MAX_CONFIG_SIZE, b"\0")
        data = space[req.offset : req.offset + req.size]
        return True, vu.ConfigSpace(req.offset, req.size, req.flags, data).encode()

    def _set_config(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        log.error("the vsock configuration is read-only; SET_CONFIG refused")
        return False, None

    def _get_max_mem_slots(self, msg: vu.Message) -> tuple[bool, bytes | None]:
        return True, vu.encode_u64(MAX_MEM_SLOTS)

    _HANDLERS: dict[int, Callable[[Backend, vu.Message], tuple[bool, bytes | None]]] = {
        vu.Request.GET_FEATURES: _get_features,
        vu.Request.SET_FEATURES: _set_features,
        vu.Request.GET_PROTOCOL_FEATURES: _get_protocol_features,
        vu.Request.SET_PROTOCOL_FEATURES: _set_protocol_features,
        vu.Request.SET_OWNER: _set_owner,
        vu.Request.RESET_OWNER: _reset_owner,
        vu.Request.SET_MEM_TABLE: _set_mem_table,
        vu.Request.SET_VRING_NUM: _set_vring_num,
        vu.Request.SET_VRING_ADDR: _set_vring_addr,
        vu.Request.SET_VRING_BASE: _set_vring_base,
        vu.Request.GET_VRING_BASE: _get_vring_base,
        vu.Request.SET_VRING_KICK: _set_vring_kick,
        vu.Request.SET_VRING_CALL: _set_vring_call,
        vu.Request.SET_VRING_ERR: _set_vring_err,
        vu.Request.SET_VRING_ENABLE: _set_vring_enable,
        vu.Request.GET_QUEUE_NUM: _get_queue_num,
        vu.Request.GET_CONFIG: _get_config,
        vu.Request.SET_CONFIG: _set_config,
        vu.Request.GET_MAX_MEM_SLOTS: _get_max_mem_slots,
    }

    # -- rings --

    def _build_queue(self, vring: Vring, keep: Virtqueue | None = None) -> None:
        """(Re)create ``vring.queue`` from its address and the memory table, if both are there."""
        vring.queue = None
        if self.memory is None or vring.addr is None or vring.kick is None:
            return
        a, num, mem = vring.addr, vring.num, self.memory
        try:
            queue = Virtqueue(
                mem,
                num,
                mem.user_to_guest(a.desc, 16 * num),
                mem.user_to_guest(a.avail, 6 + 2 * num),
                mem.user_to_guest(a.used, 6 + 8 * num),
                last_avail_idx=keep.last_avail_idx if keep else vring.base,
                index=vring.index,
            )
        except (QueueError, GuestMemoryError) as exc:
            log.error("queue %d cannot be used: %s", vring.index, exc)
            vring.broken = True
            return
        if keep is not None:
            queue.used_idx = keep.used_idx
            queue.held = keep.held
        vring.queue = queue
        vring.broken = False
        # Rare (set-up, reset, memory changes) and what to look at when a ring goes wrong.
        log.info(
            "queue %d: %d entries, next available %d, used index %d%s",
            vring.index, num, queue.last_avail_idx, queue.used_idx,
            " (kept)" if keep is not None else "",
        )  # fmt: skip

    def _stop_vring(self, vring: Vring) -> None:
        if vring.kick is not None:
            self._unwatch(vring.kick)
            with contextlib.suppress(OSError):
                os.close(vring.kick)
            vring.kick = None
        vring.queue = None
        self._again.discard(vring.index)

    def _kicked(self, index: int) -> None:
        vring = self.vrings[index]
        if vring.kick is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(vring.kick)
        self._process(index)

    def _notify(self, vring: Vring) -> None:
        if vring.call is None or vring.queue is None:
            return
        try:
            if vring.queue.wants_interrupt():
                os.eventfd_write(vring.call, 1)
        except (OSError, GuestMemoryError) as exc:
            log.error("cannot interrupt the guest on queue %d: %s", vring.index, exc)

    def _process(self, index: int) -> None:
        vring = self.vrings[index]
        if vring.queue is None or vring.broken:
            return
        try:
            if index == TX_QUEUE:
                self._process_tx(vring, vring.queue)
            elif index == RX_QUEUE:
                self._fill_rx(vring, vring.queue)
            # The event queue is QEMU's own (it sends transport resets): nothing to do.
        except (QueueError, GuestMemoryError) as exc:
            log.error("queue %d is broken, not using it until it is set up again: %s", index, exc)
            vring.broken = True

    def _process_tx(self, vring: Vring, queue: Virtqueue) -> None:
        used = 0
        for _ in range(queue.size):
            try:
                chain = queue.pop()
            except ChainError as exc:
                log.warning("dropping a guest tx buffer: %s", exc)
                if exc.head is not None:
                    queue.push(exc.head, 0)
                    used += 1
                continue
            if chain is None:
                break
            try:
                pkt = parse(chain.read(queue.memory, HEADER_SIZE + MAX_PAYLOAD))
            except (ChainError, PacketError, GuestMemoryError) as exc:
                log.warning("dropping a guest tx packet: %s", exc)
                pkt = None
            queue.push(chain.head, 0)
            used += 1
            if pkt is not None and vring.enabled:
                self.mux.on_guest_packet(pkt)
        else:
            self._again.add(vring.index)  # a full batch: there may be more
        if used:
            self._notify(vring)

    def _fill_rx(self, vring: Vring, queue: Virtqueue) -> None:
        if not vring.enabled:
            return
        used = 0
        for _ in range(queue.size):
            if not self.mux.has_output():
                break
            try:
                chain = queue.pop()
            except ChainError as exc:
                log.warning("dropping a guest rx buffer: %s", exc)
                if exc.head is not None:
                    queue.push(exc.head, 0)
                    used += 1
                continue
            if chain is None:
                break  # the guest's kick on the rx queue brings us back
            pkt = self.mux.next_packet(chain.writable_len)
            if pkt is None:
                if chain.writable_len < HEADER_SIZE:
                    log.warning("dropping a guest rx buffer of %d bytes", chain.writable_len)
                    queue.push(chain.head, 0)
                    used += 1
                    continue
                queue.unpop(chain)
                break
            try:
                written = chain.write(queue.memory, pkt.encode())
            except (ChainError, GuestMemoryError) as exc:
                log.warning("lost a packet for the guest: %s", exc)
                written = 0
            queue.push(chain.head, written)
            used += 1
        else:
            self._again.add(vring.index)
        if used:
            self._notify(vring)

    def _reset_connections(self) -> None:
        self.mux.reset_all()
        self._settle()

    # -- host side --

    def _accept_host(self) -> None:
        try:
            sock, _ = self._uds_listener.accept()
        except OSError:
            return
        if len(self._lines) >= MAX_PENDING_LINES:
            log.warning("too many host connections waiting to send CONNECT; refusing one")
            sock.close()
            return
        sock.setblocking(False)
        host = HostSocket(sock, deadline=self.clock() + CONNECT_LINE_TIMEOUT)
        self._lines[sock] = host
        self._watch(sock, selectors.EVENT_READ, ("line", host))

    def _expire_lines(self) -> None:
        if not self._lines:
            return
        now = self.clock()
        for host in [h for h in self._lines.values() if h.deadline <= now]:
            log.warning("host connection sent no CONNECT line within %ss", CONNECT_LINE_TIMEOUT)
            self._close_line(host)

    def _close_line(self, host: HostSocket) -> None:
        self._unwatch(host.sock)
        self._lines.pop(host.sock, None)
        host.sock.close()

    def _read_line(self, host: HostSocket) -> None:
        # Byte by byte would be slow; the client sends nothing after the line
        # until it has our answer, so a bounded read is safe (extra bytes are kept).
        try:
            data = host.sock.recv(MAX_CONNECT_LINE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_line(host)
            return
        host.line += data
        if b"\n" not in host.line:
            if len(host.line) >= MAX_CONNECT_LINE:
                log.warning("host sent an over-long CONNECT line; closing it")
                self._close_line(host)
            return
        line, _, rest = bytes(host.line).partition(b"\n")
        words = line.strip().split()
        port = None
        if len(words) == 2 and words[0] == b"CONNECT" and words[1].isdigit():
            port = int(words[1])
        self._unwatch(host.sock)
        self._lines.pop(host.sock, None)
        if port is None:
            log.warning("bad hybrid vsock request %r; closing it", line[:MAX_CONNECT_LINE])
            host.sock.close()
            return
        try:
            conn = self.mux.host_connect(port)
        except MuxError as exc:
            log.warning("cannot connect to guest port %d: %s", port, exc)
            host.sock.close()
            return
        host.conn = conn
        host.early = rest
        self._hosts[conn] = host
        self._settle_conn(conn)

    def _open_for_guest(self, conn: Connection) -> None:
        """A guest REQUEST to host port P: connect to ``<uds_path>_P``."""
        path = f"{self.uds_path}_{conn.host_port}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                log.info("guest connection to host port %d: %s: %s", conn.host_port, path, exc)
            self.mux.guest_refused(conn)
            return
        self._hosts[conn] = HostSocket(sock, conn)
        self.mux.guest_accepted(conn)

    def _host_ready(self, host: HostSocket, events: int) -> None:
        conn = host.conn
        assert conn is not None
        if events & selectors.EVENT_WRITE:
            self._write_host(conn, host)
        if events & selectors.EVENT_READ and conn.state is State.CONNECTING:
            # Watched only to notice a client that gives up waiting for the guest.
            try:
                data = host.sock.recv(MAX_EARLY - len(host.early))
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                host.early += data
            else:
                self.mux.host_eof(conn)  # gives up on the connection (RST to the guest)
        elif events & selectors.EVENT_READ and not conn.closed:
            budget = conn.host_read_budget()
            if budget:
                try:
                    data = host.sock.recv(min(budget, _READ_CHUNK))
                except BlockingIOError:
                    return
                except OSError as exc:
                    self.mux.host_failed(conn, f"host socket: {exc}")
                    return
                if data:
                    self.mux.host_data(conn, data)
                else:
                    self.mux.host_eof(conn)
        self.mux.touch(conn)

    def _write_host(self, conn: Connection, host: HostSocket) -> None:
        try:
            while conn.greeting:
                n = host.sock.send(conn.greeting)
                conn.greeting = conn.greeting[n:]
            while conn.to_host and not conn.closed:
                n = host.sock.send(conn.to_host)
                self.mux.host_delivered(conn, n)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.mux.host_failed(conn, f"host socket: {exc}")

    def _settle(self) -> None:
        """Act on every connection that changed, then give the guest what is ready.

        Filling the rx queue changes connections (room for more host data,
        a SHUTDOWN after the last data) and acting on them can queue packets,
        so the two alternate until neither has anything left to do.
        """
        for _ in range(100):
            self._process(RX_QUEUE)
            dirty = self.mux.take_dirty()
            if not dirty:
                return
            for conn in dirty:
                self._settle_conn(conn)
        log.warning("connections still changing after 100 rounds; going on next round")

    def _settle_conn(self, conn: Connection) -> None:
        host = self._hosts.get(conn)
        if conn.open_requested and host is None and not conn.closed:
            self._open_for_guest(conn)
            host = self._hosts.get(conn)
        if host is None:
            return
        if not conn.closed:
            if host.early and conn.state is State.ESTABLISHED:
                # Sent right after the CONNECT line, before our answer: the guest's now.
                early, host.early = host.early, b""
                self.mux.host_data(conn, early)
            if conn.greeting or conn.to_host:
                self._write_host(conn, host)
            if conn.host_shutdown_due and not conn.closed:
                with contextlib.suppress(OSError):
                    host.sock.shutdown(socket.SHUT_WR)
                self.mux.host_shut_down(conn)
        if conn.closed:
            self._unwatch(host.sock)
            host.sock.close()
            del self._hosts[conn]
            return
        mask = 0
        if conn.host_read_budget() or (
            conn.state is State.CONNECTING and conn.from_host and len(host.early) < MAX_EARLY
        ):
            mask |= selectors.EVENT_READ
        if conn.greeting or conn.to_host:
            mask |= selectors.EVENT_WRITE
        self._watch(host.sock, mask, ("host", host))


def _listen(path: Path) -> socket.socket:
    """A listening unix socket at ``path`` (a stale socket there is replaced), mode 0600."""
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # chmod rather than umask: the umask is the whole process's, threads included.
        os.chmod(path, 0o600)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
