"""Agent entry point: settings, gRPC server, transport bridges, then SERVING.

Started by PID 1 as ``python3 -I -S`` with ``/usr/lib/bulkhead`` on sys.path.
Only the standard library and a few tiny modules are imported at first; grpc
and protobuf come in with ``server`` once logging works, so an import failure
is reported on the console rather than lost.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from bulkhead_agent.bridge import Bridge
from bulkhead_agent.settings import Settings, from_config
from bulkhead_init import cmdline
from bulkhead_init.log import Logger, boottime_ms

OOM_SCORE_ADJ = -997  # like the kernel's own helpers: killed last, but still killable
STOP_GRACE_S = 1.0  # init waits 3 s before SIGKILL; leave it room to sync and unmount


def main() -> None:
    started_ms = boottime_ms()
    config, warnings = cmdline.read()
    settings, env_warnings = from_config(config)
    log = Logger("agent", settings.log)
    for warning in (*warnings, *env_warnings):
        log.warning(warning)
    _protect_from_oom(log)
    try:
        code = asyncio.run(_run(settings, started_ms, log))
    except Exception as exc:
        log.error(f"agent failed: {type(exc).__name__}: {exc}")
        raise
    sys.exit(code)


def _protect_from_oom(log: Logger) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_ADJ))
    except OSError as exc:
        log.debug(f"cannot set oom_score_adj: {exc}")


async def _run(settings: Settings, started_ms: float, log: Logger) -> int:
    # grpc and protobuf come in here, after logging works.
    from bulkhead_agent.server import AgentServer
    from bulkhead_agent.state import AgentState

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    state = AgentState(settings=settings, started_ms=started_ms)
    server = AgentServer(state, log)
    await server.start()

    bridges, features = await _start_bridges(settings, log)
    state.features = ["health", "reflection", *features]
    await server.set_serving()
    state.ready_ms = boottime_ms()
    log.info(
        f"ready in {state.ready_ms - started_ms:.0f} ms on {server.socket_path}"
        f" (transports: {', '.join(features) or 'none'})"
    )

    await stop.wait()
    log.info("stopping")
    for bridge in bridges:
        bridge.stop_accepting()
    await server.stop(STOP_GRACE_S)
    for bridge in bridges:
        bridge.close()
    log.info("stopped")
    return 0


async def _start_bridges(settings: Settings, log: Logger) -> tuple[list[Bridge], list[str]]:
    """Start each configured transport; one that cannot start is logged and skipped."""
    bridges: list[Bridge] = []
    features: list[str] = []
    sock = settings.socket_path

    if settings.vsock_port:
        from bulkhead_agent.bridge.vsock import VsockBridge

        vsock = VsockBridge(settings.vsock_port, sock, log)
        if await vsock.start():
            bridges.append(vsock)
            features.append("vsock")

    if settings.serial_device or settings.serial_port:
        from bulkhead_agent.bridge.serial import SerialBridge, find_port

        path = settings.serial_device or find_port(settings.serial_port)
        if path is None:
            log.warning(f"serial: no virtio-serial port named {settings.serial_port!r}; serial off")
        else:
            serial = SerialBridge(path, sock, log)
            if serial.start():
                bridges.append(serial)
                features.append("serial")

    if settings.tcp_port:
        from bulkhead_agent.bridge.tcp import TcpBridge

        tcp = TcpBridge(settings.tcp_port, sock, log)
        if await tcp.start():
            bridges.append(tcp)
            features.append("tcp")

    return bridges, features
