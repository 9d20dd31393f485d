"""Attach: one process's stdio over a bidirectional stream, lossless.

Output. The session sends each stream's buffered bytes from the host's resume offsets on, as
``Output{offset, data}`` chunks of at most 64 KiB, then live data as it comes. Bytes stay in
the agent until the host acknowledges them (``ack_stdout``/``ack_stderr``, and the resume
offsets, which say "I have everything below"), so a host that detaches or loses its
connection and attaches again with its offsets misses nothing and gets nothing twice. A
stream holds at most 1 MiB unacknowledged; past that the process blocks in write(). The host
must therefore acknowledge as it goes (e.g. every few hundred KiB): a host that never does
stalls the process, by design, rather than losing output.

Input. ``stdin`` bytes queue for the process and are written as it reads (see
``containers.stdio.StdinSink``). While more than STDIN_LIMIT is queued, requests are not read,
so gRPC's flow control holds the host back. One exception: the host's acknowledgements travel
on the same request stream, behind its stdin. When an output stream is full (the process is
blocked writing, so it reads no stdin either) requests keep being read to reach those
acknowledgements, and stdin queues past the limit, up to STDIN_HARD_LIMIT; a host that gets
there is sending stdin and never acknowledging, and its stream ends with RESOURCE_EXHAUSTED.

After an agent restart. A process adopted from an agent that died numbers each stream on from
where that agent got to (``containers.offsets``); what it had read and not delivered is lost.
A host resuming below that point first gets ``gap`` (from its offset to where output resumes)
for the stream, so the loss is visible, never papered over; at or above it, nothing was lost
and the stream simply goes on.

End. Once the process has exited, both streams reached end of file and everything was sent,
the session sends ``exit`` and the stream ends. A newer Attach to the same process takes over:
the older stream ends with ABORTED. Removing the container ends it with NOT_FOUND.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from bulkhead_agent.containers.buffer import CHUNK
from bulkhead_agent.containers.errors import Failure
from bulkhead_agent.containers.process import (
    EXITED,
    SIGNALED,
    START_FAILED,
    ExitInfo,
    ProcessRecord,
)
from bulkhead_proto.v1 import agent_pb2

COALESCE_S = 0.002
STDIN_LIMIT = 1024 * 1024
STDIN_HARD_LIMIT = 16 * 1024 * 1024
_STREAMS = ("stdout", "stderr")


class AttachSession:
    def __init__(self, record: ProcessRecord, context: grpc.aio.ServicerContext) -> None:
        self._record = record
        self._context = context
        self._sent = {"stdout": 0, "stderr": 0}  # next offset to send, per stream
        self._taken_over = False
        self._error: Failure | None = None  # from the request side, ends the stream
        self._reader: asyncio.Task[None] | None = None
        self._coalesced = False  # the next message already waited for more data

    # called by the record when a newer session attaches
    def replaced(self) -> None:
        self._taken_over = True
        if self._reader is not None:
            self._reader.cancel()  # its acknowledgements and stdin no longer count

    async def run(self, first: agent_pb2.AttachRequest) -> None:
        record = self._record
        offsets = {"stdout": first.stdout_offset, "stderr": first.stderr_offset}
        for name, offset in offsets.items():
            problem = record.stdio.buffer(name).check_offset(offset)
            if problem is not None:
                raise Failure("OUT_OF_RANGE", f"{name}_offset: {problem}")
        record.take_stdio(self)
        try:
            for name, offset in offsets.items():
                self._sent[name] = offset
                self._ack(name, offset)  # what the host has, it no longer needs kept
            self._apply(first)
            self._reader = asyncio.create_task(self._read_requests())
            for name, offset in offsets.items():
                resume = record.stdio.buffer(name).acked
                if offset < resume:  # below what this agent has: lost with an earlier one
                    gap = agent_pb2.OutputGap(stream=name, from_offset=offset, to_offset=resume)
                    await self._context.write(agent_pb2.AttachResponse(gap=gap))
            await self._send()
        finally:
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._reader
            record.release_stdio(self)

    # --- output ----------------------------------------------------------------------------

    async def _send(self) -> None:
        record = self._record
        turn = 0  # alternate between the streams so neither starves the other
        while True:
            if self._taken_over:
                raise Failure("ABORTED", f"another Attach took over the stdio of {record.name}")
            if record.forgotten:
                raise Failure("NOT_FOUND", f"container {record.container_id!r} was removed")
            if self._error is not None:
                raise self._error
            if await self._gather_more():
                continue  # the state may have changed meanwhile: check it all again
            message = self._next_output(turn)
            if message is not None:
                turn ^= 1
                await self._context.write(message)
                continue
            if record.finished.is_set():
                assert record.exit is not None
                await self._context.write(agent_pb2.AttachResponse(exit=exit_message(record.exit)))
                return
            await record.changed.wait()

    async def _gather_more(self) -> bool:
        """Give a busy writer a moment to fill a whole chunk before a small one goes out.

        When the agent keeps up with a process that writes in small pieces, each piece would
        travel as a message of its own and per-message costs dominate (measured: 5 KiB
        messages on average, a fifth of the throughput). So a partial chunk waits up to
        COALESCE_S for more, only while the process runs and only once per message: an
        interactive echo is late by that much at most. Returns whether it waited.
        """
        record = self._record
        if self._coalesced or record.exit is not None:
            return False
        unsent = [self._unsent(name) for name in _STREAMS]
        if not any(0 < n < CHUNK for n in unsent) or any(n >= CHUNK for n in unsent):
            return False
        self._coalesced = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(COALESCE_S):
                while not record.finished.is_set():
                    await record.changed.wait()
                    if any(self._unsent(name) >= CHUNK for name in _STREAMS):
                        break
        return True

    def _unsent(self, name: str) -> int:
        buffer = self._record.stdio.buffer(name)
        return buffer.end - max(self._sent[name], buffer.acked)

    def _next_output(self, turn: int) -> agent_pb2.AttachResponse | None:
        for i in range(2):
            name = _STREAMS[(turn + i) % 2]
            buffer = self._record.stdio.buffer(name)
            # Acknowledged is received: never send below it again.
            offset = max(self._sent[name], buffer.acked)
            data = buffer.read(offset)
            if data:
                self._coalesced = False
                self._sent[name] = offset + len(data)
                output = agent_pb2.Output(offset=offset, data=data)
                return agent_pb2.AttachResponse(**{name: output})
        return None

    # --- input -----------------------------------------------------------------------------

    async def _read_requests(self) -> None:
        record = self._record
        stdio = record.stdio
        while True:
            sink = stdio.stdin
            while sink.pending > STDIN_LIMIT and not stdio.stalled and not sink.closed:
                await record.changed.wait()
            if sink.pending > STDIN_HARD_LIMIT:
                self._fail(
                    Failure(
                        "RESOURCE_EXHAUSTED",
                        f"{sink.pending} bytes of stdin are waiting for {record.name}, which is "
                        "blocked on output nobody acknowledges",
                    )
                )
                return
            request = await self._context.read()
            if request is grpc.aio.EOF:
                return  # the host closed its side; output still flows until the exit
            try:
                self._apply(request)
            except Failure as exc:
                self._fail(exc)
                return

    def _apply(self, request: agent_pb2.AttachRequest) -> None:
        if request.ack_stdout:
            self._ack("stdout", request.ack_stdout)
        if request.ack_stderr:
            self._ack("stderr", request.ack_stderr)
        if request.stdin:
            self._record.stdio.stdin.feed(request.stdin)
        if request.stdin_eof:
            self._record.stdio.stdin.end()

    def _ack(self, name: str, offset: int) -> None:
        record = self._record
        try:
            changed = record.stdio.buffer(name).ack(offset)
        except ValueError as exc:
            raise Failure("OUT_OF_RANGE", f"ack_{name}: {exc}") from None
        if changed:
            record.stdio.resume()
            record.changed.fire()

    def _fail(self, failure: Failure) -> None:
        self._error = failure
        self._record.changed.fire()


_KINDS = {
    EXITED: agent_pb2.ProcessExit.EXITED,
    SIGNALED: agent_pb2.ProcessExit.SIGNALED,
    START_FAILED: agent_pb2.ProcessExit.START_FAILED,
}


def exit_message(info: ExitInfo) -> agent_pb2.ProcessExit:
    message = agent_pb2.ProcessExit(
        kind=_KINDS[info.kind],
        exit_code=info.exit_code,
        signal=info.signal,
        oom_killed=info.oom_killed,
        pid=info.pid,
    )
    if info.kind == START_FAILED:
        message.start_failure.CopyFrom(
            agent_pb2.StartFailure(step=info.step, errno=info.errno, message=info.message)
        )
    return message
