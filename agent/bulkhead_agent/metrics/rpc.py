"""Counting the agent's RPCs: a grpc.aio server interceptor and the plain tallies it keeps.

Nothing here imports prometheus_client: the interceptor runs from the agent's start, on every
call, so it only adds to dicts and lists; ``metrics.collectors`` turns them into metric
families when someone scrapes. Streaming calls are timed from start to end, like unary ones.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc

# Upper bounds (seconds) of the latency histogram's buckets; +Inf is implied.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MethodStats:
    __slots__ = ("buckets", "codes", "in_flight", "seconds")

    def __init__(self) -> None:
        self.codes: dict[str, int] = {}  # status code name -> calls ended with it
        self.buckets = [0] * (len(BUCKETS) + 1)  # not cumulative; the last one is +Inf
        self.seconds = 0.0
        self.in_flight = 0


class RpcStats:
    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.methods: dict[str, MethodStats] = {}
        self.clock = clock

    def begin(self, method: str) -> MethodStats:
        stats = self.methods.get(method)
        if stats is None:
            stats = self.methods[method] = MethodStats()
        stats.in_flight += 1
        return stats

    @staticmethod
    def end(stats: MethodStats, code: str, seconds: float) -> None:
        stats.in_flight -= 1
        stats.codes[code] = stats.codes.get(code, 0) + 1
        stats.buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        stats.seconds += seconds


def _code(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"  # the client went away (or the server is stopping)
    code = context.code()  # set by abort() or set_code(); None when the handler just returned
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code is not None:  # some grpc versions hand back the raw number
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status.name
    return "OK" if exc is None else "UNKNOWN"


class RpcInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every async handler to time it and note how it ended."""

    def __init__(self, stats: RpcStats) -> None:
        self.stats = stats

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: grpc answers UNIMPLEMENTED itself
        method = handler_call_details.method.lstrip("/")
        return _wrap(handler, method, self.stats)


def _wrap(handler: grpc.RpcMethodHandler, method: str, stats: RpcStats) -> grpc.RpcMethodHandler:
    if handler.request_streaming and handler.response_streaming:
        kind, make = handler.stream_stream, grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        kind, make = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        kind, make = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    else:
        kind, make = handler.unary_unary, grpc.unary_unary_rpc_method_handler
    if inspect.isasyncgenfunction(kind):
        behavior: Any = _timed_generator(kind, method, stats)
    elif inspect.iscoroutinefunction(kind):
        behavior = _timed_coroutine(kind, method, stats)
    else:
        return handler  # a synchronous handler (none in the agent): left as it is
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _timed_coroutine(behavior: Any, method: str, stats: RpcStats) -> Any:
    async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tally = stats.begin(method)
        started = stats.clock()
        failure: BaseException | None = None
        try:
            return await behavior(request, context)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            stats.end(tally, _code(context, failure), stats.clock() - started)

    return timed


def _timed_generator(behavior: Any, method: str, stats: RpcStats) -> Any:
    async def timed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        tally = stats.begin(method)
        started = stats.clock()
        failure: BaseException | None = None
        try:
            async for response in behavior(request, context):
                yield response
        except BaseException as exc:
            failure = exc
            raise
        finally:
            stats.end(tally, _code(context, failure), stats.clock() - started)

    return timed
